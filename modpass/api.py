"""Public verbs: ``transform``, ``list_blocks``, ``set_ratios`` and ``default_task`` (save/load, aux_loss and flops live in their own modules)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from . import _structure
from ._compat import uncompiled
from ._export import RandomStates, first_calls
from .block import RoutedBlock
from .config import Layers, RoutingConfig, resolve_ratios
from .errors import CaptureError, ConfigError, ModpassError, PlanError, RoutingInputError, UnroutableBlockError
from .hints import batch_wide_experts_hint
from .inputs import call_with, capture_inputs
from .kv_cache import DECODING
from .output_recording import owners, part_recorded_outputs, record_hidden_states
from .passes import token_mixing
from .passes.capture import capture
from .passes.find_blocks import BlockInfo, find_blocks
from .passes.plan import plan as plan_stage
from .plan import RoutingPlan
from .progress import Progress
from .tasks import ForwardTakingRoutingArguments, RoutingState, end_forward, take_routing_arguments


def transform(
    model: nn.Module,
    ratios: float | Mapping[str, Any],
    *,
    layers: Layers = "every_other",
    within: str | None = None,
    inplace: bool = False,
    gate: str = "tanh",
    aux_loss_weight: float = 0.0,
    example_inputs: Mapping[str, Any] | tuple | None = None,
    unroutable: Literal["raise", "dense"] = "raise",
    progress: bool | None = None,
) -> nn.Module:
    """Return ``model`` with its transformer blocks routed Mixture-of-Depths style.

    Args:
        model: any ``nn.Module`` whose blocks are repeated residual layers.
        ratios: capacity in (0, 1] for a single task, or ``{task: ratio}``
            where a ratio is a float, a list with one ratio per block, or a
            schedule from :mod:`modpass.schedules`.
        layers: ``"every_other"`` (blocks 1, 3, 5, ...), ``"all"``,
            ``"last_half"`` or a list of block indices.
        within: the module path whose blocks are routed, for a model with
            several block stacks (``"model.language_model"`` beside a vision
            encoder); ``layers``, per-block lists and schedules then count only
            its blocks, from 0. ``None``: every block the model has.
        inplace: modify ``model`` itself instead of a deep copy.
        gate: ``"tanh"``, ``"sigmoid"`` or ``"string"`` (see ``modpass.routing.GATES``).
        aux_loss_weight: weight of the router BCE loss returned by ``modpass.aux_loss``.
        example_inputs: inputs to capture the model with (a dict of keyword
            arguments or a tuple of positional ones); guessed for Hugging Face
            models and token-id models when omitted.
        unroutable: ``"raise"`` (default) refuses blocks that cannot be routed
            safely; ``"dense"`` leaves them dense with a warning.
        progress: a progress bar on stderr, one step per routed block (each
            takes seconds to capture): ``None`` shows it on a terminal only,
            ``True`` always, ``False`` never.

    Returns:
        A model of the same class whose ``state_dict`` is the original one plus
        ``<block>.mod_routers.<task>.{weight,bias}``. Its forward accepts
        ``task=`` and ``route_mask=`` in addition to the original arguments.
    """
    if unroutable not in ("raise", "dense"):
        raise ConfigError(f"unroutable={unroutable!r}; use 'raise' or 'dense'.")
    if not isinstance(inplace, bool):
        raise ConfigError(f"inplace must be True or False, got {inplace!r}.")
    refuse_unrunnable(model, "transform")
    config = RoutingConfig.from_arguments(ratios, layers=layers, gate=gate, aux_loss_weight=aux_loss_weight,
                                          within="" if within is None else within)
    if routing_plan_of(model) is not None:
        raise ConfigError(
            f"{type(model).__name__} is already routed by modpass; transform the original model again with "
            "new ratios (or load a saved plan with modpass.load) instead of routing twice."
        )
    with Progress(progress, "transform") as steps:
        target = model if inplace else deep_copy(model, "transform")
        inputs = capture_inputs(target, example_inputs)
        steps.stage(f"capturing {type(model).__name__}")
        gm = capture(target, inputs)
        gm = find_blocks(gm)
        gm = plan_stage(gm, config, model_class=f"{type(model).__module__}.{type(model).__qualname__}")
        return apply_plan(target, gm.meta["modpass_plan"], inputs, gm.meta["modpass_traced_calls"], steps,
                          unroutable=unroutable)


def list_blocks(model: nn.Module, *, example_inputs: Mapping[str, Any] | tuple | None = None) -> list[BlockInfo]:
    """The transformer blocks ``transform`` finds in ``model``, in the order they run: what ``layers=`` indices count.

    Each entry's ``stack`` is the module holding it and its siblings, the
    ``within=`` that routes that stack alone (a vision encoder's blocks and a
    language model's are two stacks). Captures the model once (seconds) and
    leaves it unchanged; ``example_inputs`` as for ``transform``.
    """
    refuse_unrunnable(model, "list_blocks")
    if routing_plan_of(model) is not None:
        raise ConfigError(f"{type(model).__name__} is already routed; its routed blocks are modpass.routing_plan_of(model).blocks.")
    inputs = capture_inputs(model, example_inputs)
    return find_blocks(capture(model, inputs)).meta["modpass_blocks"]


def require_module(model: object, verb: str | None = None) -> nn.Module:
    """``model``, where it is an ``nn.Module``: every verb's first check, named after ``verb`` (the public function)."""
    if not isinstance(model, nn.Module):
        caller = f"modpass.{verb}()" if verb else "modpass"
        raise ConfigError(f"{caller} takes a model (an nn.Module) as its first argument, got {type(model).__name__}.")
    return model


def refuse_unrunnable(model: nn.Module, verb: str) -> None:
    """Refuse what the verb could not run on example inputs: not a module, a torch.compile wrapper, or weights on the
    meta device."""
    require_module(model, verb)
    if uncompiled(model) is not model:
        raise ConfigError(
            f"{verb}() takes the model itself, not its torch.compile wrapper: route first, then compile "
            f"(modpass.{verb}(model, ...), then torch.compile(routed, backend='modpass')); the wrapper's original "
            "model is its ._orig_mod."
        )
    on_meta = next((name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta), None)
    if on_meta is not None:
        raise ConfigError(
            f"{verb}() runs {type(model).__name__} on example inputs, which needs real weights, but {on_meta!r} is on "
            "the meta device (a model built under torch.device('meta') or init_empty_weights). Materialise it first "
            f"(model.to_empty(device=...), then load or initialise its weights), then call modpass.{verb}"
            + ("; the routers it adds start at zero, so the routed model begins as the dense one." if verb in ("transform", "load")
               else ".")
        )


def apply_plan(
    model: nn.Module, routing_plan: RoutingPlan, example_inputs, traced_calls: dict, steps: Progress, *,
    unroutable: str = "raise",
) -> nn.Module:
    """Install routed blocks into ``model`` per ``routing_plan`` (all or nothing).

    Each block is prepared for the calls it receives in eager mode and while
    traced (what torch.compile will show it), so both run without capture.
    """
    state = RoutingState(routing_plan.tasks, progress=steps.enabled)
    steps.expect(len(routing_plan.blocks))
    steps.stage("running the example inputs")
    calls = record_block_calls(model, [b.path for b in routing_plan.blocks], example_inputs)
    routed: dict[str, RoutedBlock] = {}
    refused: list[str] = []
    for block_plan in routing_plan.blocks:
        steps.stage(block_plan.where)
        block = model.get_submodule(block_plan.path)
        examples = [calls[block_plan.path]]
        if block_plan.path in traced_calls:
            examples.append(_structure.realize(traced_calls[block_plan.path]))
        candidate = RoutedBlock(block, block_plan, gate=routing_plan.gate, state=state, examples=examples,
                                score_gradients=routing_plan.aux_loss_weight > 0)
        try:
            candidate.prepare()
        except (UnroutableBlockError, CaptureError) as exc:
            refused.append(str(exc) + batch_wide_experts_hint(block))
            continue
        finally:
            steps.block_done()
        routed[block_plan.path] = candidate
    if refused and unroutable == "raise":
        raise UnroutableBlockError(
            f"{len(refused)} block(s) cannot be routed safely:\n  - " + "\n  - ".join(refused)
            + "\nPass layers= without them, or unroutable='dense' to leave them dense."
        )
    for message in refused:
        warnings.warn(f"modpass: leaving a block dense: {message}", stacklevel=3)
    kept = tuple(b for b in routing_plan.blocks if b.path in routed)
    if not kept:
        raise UnroutableBlockError("no block could be routed; nothing to do.")
    for path, block in routed.items():
        parent, _, name = path.rpartition(".")
        block.adopt_hooks()
        setattr(model.get_submodule(parent), name, block)
    # Off by default: a cached generation decodes causally (generated tokens run every routed layer, see
    # kv_cache.py), where the uncached one selects among all tokens at each step as training did; use_cache=True
    # asks for it. Composite models keep the setting in their parts' configs (Llava's language model).
    for part in model.modules():
        for config in (getattr(part, "config", None), getattr(part, "generation_config", None)):
            if getattr(config, "use_cache", False):
                config.use_cache = False
    owned = owners(model, routed)
    record_hidden_states(owned, routed)
    state.part_recorded_outputs = part_recorded_outputs(owned, routed)
    state.blocks = list(routed.values())
    model._modpass_state = state
    model._modpass_plan = RoutingPlan(**{**routing_plan.__dict__, "blocks": kept})
    model.register_forward_pre_hook(take_routing_arguments, with_kwargs=True)
    model.register_forward_hook(end_forward, always_call=True)
    model.forward = ForwardTakingRoutingArguments(model)
    return model


def routing_state(model: nn.Module, verb: str) -> RoutingState:
    """The routing state of a model routed by modpass (or of a wrapper of it); ``verb`` names the caller."""
    state = getattr(routed_model(model, verb), "_modpass_state", None)
    if state is None:
        raise ConfigError(f"{verb}() takes a model routed by modpass.transform or modpass.load.")
    return state


def declare_position_wise(*ops: str | torch._ops.OpOverload | torch._ops.OpOverloadPacket) -> None:
    """Declare custom ops that compute each token's values from that token's alone (a fused norm, activation or MLP
    kernel), so that blocks running them on their tokens can be routed.

    modpass reads what aten ops do to tokens, but not an op outside aten, and refuses a block that runs one on its
    tokens until it is declared here, before ``transform``. Each op is ``"namespace::name"`` or the op itself
    (``torch.ops.mylib.rms_norm``). An op that mixes tokens (a convolution over the sequence, attention with a
    window) declared here is routed wrong, silently: declare only what holds for every call.
    """
    for op in ops:
        name = token_mixing.qualified_op_name(op)
        if not isinstance(name, str) or "::" not in name or name.startswith(("aten::", "prims::")):
            raise ConfigError(
                f"declare_position_wise takes custom ops as 'namespace::name' or torch.ops.<namespace>.<name>, not "
                f"{op!r} (modpass reads aten's ops itself)."
            )
        token_mixing.POSITION_WISE_OPS.add(name)


def set_decoding(model: nn.Module, decoding: str) -> nn.Module:
    """How a cached generation (``use_cache=True``) runs the tokens after the prompt through routed layers.

    ``"all"`` (the default): every generated token runs every routed layer, as
    p-MoD and UniMoD decode. ``"router"``: a generated token runs a routed layer
    only when its router predicts top-k membership, ``sigmoid(logit) > 0.5``
    (MoD's causal sampling; train the routers with ``aux_loss_weight > 0`` for
    that prediction to mean anything); it skips the layer otherwise, and the
    layer skips its whole call when every token of the batch does. The prompt
    is routed by top-k either way. Returns ``model``.
    """
    state = routing_state(model, "set_decoding")
    if not isinstance(decoding, str) or decoding not in DECODING:
        raise ConfigError(f"decoding must be one of {list(DECODING)}, got {decoding!r}: " + "; ".join(f"{k}: {v}" for k, v in DECODING.items()))
    state.decoding = decoding
    return model


def set_ratios(model: nn.Module, ratios: float | Mapping[str, Any], *, progress: bool | None = None) -> nn.Module:
    """Change the capacities of a routed model in place, keeping its routers and their weights.

    ``ratios`` takes the forms ``transform`` takes and applies to the blocks
    the model already routes (a scalar ratio routes all of them). The tasks
    must be the plan's, and a task can only be routed at a block where it
    has a router: a block that was dense for it needs a new ``transform``.
    The plan (what ``modpass.save`` writes) follows. Under ``torch.compile``
    the first change recompiles once, with the capacity symbolic; later
    changes reuse that graph. Each block builds its graphs for the new
    capacities (seconds per block); ``progress`` is as for ``transform``.
    """
    given, model = model, routed_model(model, "set_ratios")
    plan = routing_plan_of(model)
    if plan is None:
        raise ConfigError("set_ratios() takes a model routed by modpass.transform or modpass.load.")
    if not isinstance(ratios, Mapping):  # one ratio, list or schedule for every task the model routes
        ratios = dict.fromkeys(plan.tasks, ratios)
    config = RoutingConfig.from_arguments(ratios, layers=[b.index for b in plan.blocks], within=plan.within)
    if set(config.tasks) != set(plan.tasks):
        raise ConfigError(f"ratios name tasks {list(config.tasks)}; this model routes {list(plan.tasks)}. Give a ratio for each.")
    new_ratios = resolve_ratios(config, plan.num_blocks, routed=True)
    blocks = routed_blocks(model)
    updated = []
    for block_plan in plan.blocks:
        ratios_here = {task: new_ratios.get(block_plan.index, {}).get(task) for task in plan.tasks}
        updated.append(dataclasses.replace(block_plan, ratios=ratios_here))
    # A router made dense by an earlier set_ratios is still there: only a block dense from the start lacks one.
    lacking = [(b, [t for t, r in b.ratios.items() if r is not None and t not in blocks[b.path].mod_routers]) for b in updated]
    lacking = [(b, gained) for b, gained in lacking if gained]
    if lacking:
        block_plan, gained = lacking[0]
        task = gained[0]
        where = sorted(b.index for b, tasks in lacking if task in tasks)
        # The list that keeps the change wherever a router exists: 1.0 where the task has none (or the model routes nothing).
        suggested = [1.0] * plan.num_blocks
        for b in updated:
            ratio = b.ratios[task]
            if ratio is not None and b.index not in where:
                suggested[b.index] = float(ratio)
        raise PlanError(
            f"{block_plan.where} has no router for task(s) {gained}: it was dense for "
            f"them at transform. Transform the original model again to route them there, or keep {task!r} dense "
            f"there: a per-block list with 1.0 at block(s) {where}, such as {{{task!r}: {suggested}}}."
        )
    with Progress(progress, "set_ratios", blocks=len(updated)) as steps:
        for block_plan in updated:
            steps.stage(block_plan.where)
            blocks[block_plan.path].set_ratios(block_plan)
            steps.block_done()
    model._modpass_plan = dataclasses.replace(plan, blocks=tuple(updated))
    return given


def deep_copy(model: nn.Module, verb: str) -> nn.Module:
    """The copy of ``model`` that ``verb`` (``transform`` or ``load``) routes when not ``inplace``."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # whatever an attribute's __deepcopy__ or __reduce__ raises (TypeError, RuntimeError, ...)
        raise ConfigError(
            f"{verb}() routes a deep copy of {type(model).__name__} (inplace=False), which copy.deepcopy refused "
            f"({type(exc).__name__}: {exc}). Pass inplace=True to route the model itself (it is then changed), or make the "
            "model copyable (torch.nn.utils.parametrizations.weight_norm copies where the older "
            "torch.nn.utils.weight_norm does not)."
        ) from exc


@contextlib.contextmanager
def side_effects_undone(model: nn.Module) -> Iterator[None]:
    """While open, ``model`` runs for what a verb reads from the run (the calls its blocks receive, its FLOPs); on
    exit its buffers are what they were, and the random streams of CPU and of the devices its tensors are on, and
    Python's and numpy's global generators, are where they were. A model in training mode changes both: a batch norm
    updates its running statistics, dropout draws from the streams (a LayerDrop, from Python's)."""
    # The run gets copies of the buffers, which it may change: written back, the originals would move their version,
    # and a backward pending from the caller's forward (flops between a forward and its backward) that saved them (a
    # batch norm's statistics) would refuse to run. A routed block holds its block's buffers: one copy for both.
    held = [(where, dict(where)) for where in {id(m._buffers): m._buffers for m in model.modules()}.values()]
    copies: dict[int, torch.Tensor] = {}
    for where, buffers in held:
        for name, tensor in buffers.items():
            if tensor is not None:
                where[name] = copies.setdefault(id(tensor), tensor.detach().clone())
    devices: dict[str, set[torch.device]] = {}
    for tensor in (*model.parameters(), *copies.values()):
        if tensor.device.type != "cpu":
            devices.setdefault(tensor.device.type, set()).add(tensor.device)
    generators = RandomStates()
    try:
        with contextlib.ExitStack() as streams:
            for device_type, on in (devices or {"cpu": set()}).items():  # each fork takes CPU's stream too
                streams.enter_context(torch.random.fork_rng(devices=list(on), device_type=device_type))
            yield
    finally:
        generators.restore()
        for where, buffers in held:
            where.update(buffers)


def record_block_calls(model: nn.Module, paths: list[str], example_inputs: Mapping | tuple) -> dict[str, tuple[tuple, dict]]:
    """The ``(args, kwargs)`` each block receives when ``model`` runs on ``example_inputs`` (keyword or positional),
    leaving the model and the random streams as they were."""
    blocks = [(path, model.get_submodule(path)) for path in paths]
    try:
        with first_calls(blocks) as calls, side_effects_undone(model), torch.no_grad():
            call_with(model, example_inputs)
    except ModpassError:
        raise
    except Exception as exc:
        raise CaptureError(f"running {type(model).__name__} on the example inputs failed: {type(exc).__name__}: {exc}") from exc
    missing = [p for p in paths if p not in calls]
    if missing:
        raise CaptureError(f"blocks {missing} were not called when the model ran on the example inputs.")
    return calls


def routed_model(model: nn.Module, verb: str | None = None) -> nn.Module:
    """The module that ``transform`` routed, whose plan it carries: ``model``, or the one inside a wrapper of it
    (torch.compile's, PEFT's). The plan's block paths are relative to it. ``model`` itself where nothing is routed.
    ``verb`` names the public function in the message for what is not a module."""
    model = uncompiled(require_module(model, verb))
    return next((m for m in model.modules() if "_modpass_plan" in vars(m)), model)


def routing_plan_of(model: nn.Module) -> RoutingPlan | None:
    """The routing plan of a routed model (or of a wrapper of it), or None for a model modpass has not routed."""
    return vars(routed_model(model, "routing_plan_of")).get("_modpass_plan")


def routed_blocks(model: nn.Module) -> dict[str, RoutedBlock]:
    """A routed model's ``RoutedBlock`` modules by their paths in the routed model (the plan's paths, also through a
    wrapper of it)."""
    return {name: m for name, m in routed_model(model, "routed_blocks").named_modules() if isinstance(m, RoutedBlock)}


@contextlib.contextmanager
def default_task(
    model: nn.Module, task: str | Sequence[str] | torch.Tensor | None = None, *, route_mask: torch.Tensor | None = None
) -> Iterator[nn.Module]:
    """Route the calls of ``model`` that give no ``task=`` as ``task`` inside the ``with`` block.

    For callers that cannot pass ``task=``: Hugging Face's ``generate()``
    refuses keyword arguments its model's signature does not name. ``task``
    takes the forms ``task=`` takes (a name, one name per sequence, or a
    LongTensor of task indices); it is checked on each call, against that
    call's batch, and a list or tensor of one task per prompt covers each
    prompt's repeats in a batch that is a multiple of it (``generate()``'s
    beams and ``num_return_sequences``). None leaves calls without a default
    task, as outside.

    ``route_mask`` (``(batch, tokens)`` bool) is the same for calls that give
    no ``route_mask=``, with two differences: on a longer sequence it covers
    the first tokens and the rest are outside it (always processed), and a
    row per prompt covers its repeats, as a task list does. So it marks the
    prompt's routable tokens for ``generate()``, which appends the generated
    tokens, with or without a KV cache: both give the same tokens.
    """
    state = routing_state(model, "default_task")
    if isinstance(task, str):
        state.check(task)
    elif isinstance(task, Sequence):
        for name in task:
            state.check(name)
    elif task is not None and not isinstance(task, torch.Tensor):  # task ids are checked per call, as task= ids are
        raise RoutingInputError(f"default_task: task must be a name, a list of names or a LongTensor of indices, got {type(task).__name__}.")
    if route_mask is not None and (not isinstance(route_mask, torch.Tensor) or route_mask.dtype != torch.bool or route_mask.dim() != 2):
        got = f"dtype {route_mask.dtype}, shape {tuple(route_mask.shape)}" if isinstance(route_mask, torch.Tensor) else type(route_mask).__name__
        raise RoutingInputError(f"default_task: route_mask must be a (batch, tokens) bool tensor, got {got}.")
    if route_mask is not None:
        # Compiled decoding passes it on from call to call without reading it: one graph for every prompt length.
        torch._dynamo.maybe_mark_dynamic(route_mask, 1)
    thread = threading.get_ident()
    if held := [entry for entry in state.default_contexts if entry[1] != thread]:
        raise RoutingInputError(
            f"default_task: another thread holds a default_task context on this model (task {held[-1][2]!r}). The "
            "default is the model's, read by the calls of every thread, so each thread would route with the other's "
            "task. Give each thread its own copy of the model (copy.deepcopy shares the graphs built so far), or pass "
            "task= with each call."
        )
    # A stack rather than a saved previous value: contexts that close out of order (generators, coroutines) would
    # restore a stale default, which would route later calls without task= silently.
    context = object()
    state.default_contexts = (*state.default_contexts, (context, thread, task, route_mask))
    state.default_task, state.default_route_mask = task, route_mask
    try:
        yield model
    finally:
        state.default_contexts = tuple(entry for entry in state.default_contexts if entry[0] is not context)
        state.default_task, state.default_route_mask = state.default_contexts[-1][2:] if state.default_contexts else (None, None)


AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def prepare_autocast(model: nn.Module, dtype: torch.dtype = torch.bfloat16, *, progress: bool | None = None) -> nn.Module:
    """Prepare a routed model's blocks for calls under ``torch.autocast(device, dtype=dtype)``.

    A routed block keeps a graph per call structure, autocast included
    (model code may read dtypes that autocast changes), and prepares the
    structures ``transform`` saw, without autocast. Under ``torch.compile``
    a structure it has no graph for is captured through a graph break, which
    ``fullgraph=True`` refuses; call this once before compiling a model that
    runs under autocast (mixed-precision training). The routed blocks keep
    preparing both after every ``train()``/``eval()`` switch. ``progress`` is
    as for ``transform``. Returns ``model``.
    """
    require_module(model, "prepare_autocast")
    if dtype not in AUTOCAST_DTYPES:
        raise ConfigError(f"prepare_autocast: dtype must be one of {list(AUTOCAST_DTYPES)}, got {dtype!r}.")
    blocks = routed_blocks(model)
    if not blocks:
        raise ConfigError(f"prepare_autocast: {type(model).__name__} has no routed blocks; call modpass.transform or modpass.load first.")
    with Progress(progress, "prepare_autocast", blocks=len(blocks)) as steps:
        for path, block in blocks.items():
            steps.stage(path)
            block.prepare_autocast(dtype)
            steps.block_done()
    return model
