"""Which task each sequence of a batch belongs to, per forward call.

A routed model's forward accepts ``task=`` (a name for the whole batch, a
sequence of names or a LongTensor of task indices with one entry per
sequence) and ``route_mask=``; a forward pre-hook moves them from the call into
the model's :class:`RoutingState`, which every routed block reads.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import _compat
from .capture_sharing import SharedCaptures
from .errors import ConfigError, RoutingInputError
from .hints import torchscript_refusal
from .progress import ModeSwitchProgress


@dataclass
class TaskGroup:
    """Sequences routed alike: one task and, under a route mask, one capacity.

    ``rows`` is None when the group is the whole batch; ``capacity`` is None
    when it follows from the task's ratio and the sequence length. Under
    torch.compile a group under a route mask may keep rows of different
    capacities: ``row_capacity`` (``(rows,)``) holds them and ``capacity``
    is their maximum.
    """

    task: str
    rows: torch.Tensor | None
    capacity: int | None = None
    row_capacity: torch.Tensor | None = None

    def rows_of(self, batched: torch.Tensor) -> torch.Tensor:
        """The group's rows of a batch-first tensor (all of it for a whole-batch group)."""
        return batched if self.rows is None else batched.index_select(0, self.rows.to(batched.device))


class RoutingState:
    """Per-call routing inputs shared by the routed blocks of one model."""

    # Settings with class defaults, which states pickled before they existed read too.
    #: The route mask of calls that give none (see :func:`modpass.default_task` and :meth:`route_mask_over`).
    default_route_mask: torch.Tensor | None = None
    #: How cached generation runs generated tokens through routed layers (:data:`modpass.kv_cache.DECODING`).
    decoding = "all"
    #: Whether the current call's task and route mask are the defaults (see :meth:`start_call`).
    defaults_taken: tuple[bool, bool] = (False, False)
    #: The open :func:`modpass.default_task` contexts, oldest first: ``(context, thread, task, route_mask)``.
    default_contexts: tuple = ()
    #: How many :func:`modpass.dense` contexts are open, and whether the model's last forward ran inside one.
    dense_contexts = 0
    last_forward_dense = False
    #: The keys of the warnings this model has given, each once (see :meth:`warn_once`).
    warnings_given: frozenset[str] = frozenset()
    #: Outputs transformers records from parts of routed blocks, which routed calls leave out:
    #: ``{key: (block path, part class)}`` (see :func:`modpass.output_recording.part_recorded_outputs`).
    part_recorded_outputs: dict[str, tuple[str, str]] | None = None

    def __init__(self, tasks: Sequence[str], progress: bool | None = None):
        self.tasks = tuple(tasks)
        self.task: object = None
        #: The task of calls that give none (see :func:`modpass.default_task`).
        self.default_task: object = None
        #: The model's routed blocks, in plan order (set by ``apply_plan``), and the bar of a train/eval switch,
        #: shown as the ``progress=`` the model was routed with says.
        self.blocks: list = []
        self.switching = ModeSwitchProgress(progress)
        self.route_mask: torch.Tensor | None = None
        self.dense = False
        #: True from the model's pre-hook to its forward hook: routed blocks then add to ``last_routing``,
        #: which the pre-hook cleared, so a block called more than once in a forward keeps every call's records.
        self.in_forward = False
        #: ``(task, batch, groups)`` of the current forward (see :meth:`groups`).
        self.cached_groups: tuple | None = None
        #: The blocks' captures, which a block that traces alike takes (see :mod:`modpass.capture_sharing`).
        self.shared_captures = SharedCaptures()

    def __getstate__(self) -> dict:
        """A copy or pickle routes as the model does outside every context: what ``modpass.dense`` and
        ``modpass.default_task`` set inside their ``with`` blocks, and the current call, stay with this model. It
        shares no captures: the routed blocks' own graph caches say what a copy keeps."""
        state = dict(self.__dict__)
        state.update(dense=False, dense_contexts=0, default_task=None, default_route_mask=None, default_contexts=(),
                     task=None, route_mask=None, defaults_taken=(False, False), in_forward=False, cached_groups=None)
        state.pop("shared_captures", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.shared_captures = SharedCaptures()

    def start_call(self, task: object, route_mask: torch.Tensor | None, defaults_taken: tuple[bool, bool] = (False, False)) -> None:
        """Route the next call with ``task`` and ``route_mask``: a call of the model (its pre-hook), or of a routed
        block on its own, which takes the defaults (:func:`modpass.default_task`), not the last model call's.
        ``defaults_taken`` says whether each is the default rather than given with the call: a default covers each
        prompt's repeats, a value given with a call must fit its batch (an equal object given is no default)."""
        self.task, self.route_mask, self.defaults_taken = task, route_mask, defaults_taken
        # groups() would notice the new task anyway; clearing here keeps the last
        # call's groups out of what a compiled forward is traced (and guarded) on.
        self.cached_groups = None

    def call(self) -> tuple:
        """What :meth:`start_call` took for the current call, to route with again (:meth:`routing_call`)."""
        return self.task, self.route_mask, self.defaults_taken

    @contextlib.contextmanager
    def routing_call(self, task: object, route_mask: torch.Tensor | None, defaults_taken: tuple[bool, bool]):
        """Route as :meth:`call` said inside: a checkpointed block recomputes its call in the backward, after later
        calls of the model (a metric on another batch, a second forward of gradient accumulation) may have replaced
        it, and must select the tokens its forward did."""
        if task is self.task and route_mask is self.route_mask and defaults_taken == self.defaults_taken:
            yield
            return
        saved = *self.call(), self.cached_groups
        self.start_call(task, route_mask, defaults_taken)
        try:
            yield
        finally:
            self.task, self.route_mask, self.defaults_taken, self.cached_groups = saved

    def whole_batch_task(self) -> str | None:
        """The task of the whole batch when one name covers it and no route mask applies, else None."""
        if self.route_mask is not None:
            return None
        if self.task is None and len(self.tasks) == 1:
            return self.tasks[0]
        if isinstance(self.task, str):
            return self.check(self.task)
        return None

    def route_mask_over(self, batch: int, tokens) -> torch.Tensor | None:
        """The route mask of a call of ``batch`` sequences over ``tokens`` tokens.

        A default route mask shorter than that covers the first tokens, and
        the rest (appended by ``generate()``) are outside it; one with fewer
        rows covers each prompt's repeats (:func:`per_prompt`). A mask given
        with the call is taken as it is.
        """
        mask = self.route_mask
        if mask is None or not self.defaults_taken[1]:
            return mask
        if mask.shape[0] != batch and batch % mask.shape[0] == 0:
            mask = per_prompt(mask, batch)
        if mask.shape[1] >= tokens:
            return mask
        return torch.cat([mask, mask.new_zeros(mask.shape[0], tokens - mask.shape[1])], dim=1)

    def checked_route_mask(self, batch: int, tokens, where: str) -> torch.Tensor | None:
        """:meth:`route_mask_over` for a block's call of ``(batch, tokens)``, refused unless it is a bool mask of that shape."""
        mask = self.route_mask_over(batch, tokens)
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, tokens)):
            got = f"dtype {mask.dtype}, shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            other_length = (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch
                            and isinstance(tokens, int) and mask.shape[1] != tokens)
            raise RoutingInputError(
                f"{where}: route_mask must be a bool tensor of shape (batch, tokens) = {(batch, tokens)}, got {got}."
                + (" Under generate() without a KV cache each step is a token longer than the prompt: give the "
                   "prompt's mask as modpass.default_task(model, route_mask=...), which leaves the appended tokens "
                   "outside it, or generate with use_cache=True." if other_length and mask.shape[1] < tokens else "")
                + (f" If this block runs over another sequence than the mask's {mask.shape[1]} tokens (a vision "
                   "encoder's patches beside a language model's tokens), route only the blocks of the mask's sequence: "
                   "transform(..., within=<the module holding them>), or layers=." if other_length else "")
            )
        return mask

    def groups(self, batch: int) -> list[TaskGroup]:
        """The batch split by task; computed once per forward and shared by every routed block."""
        cached = self.cached_groups
        if cached is None or cached[0] is not self.task or cached[1] != batch:
            cached = self.cached_groups = (self.task, batch, self.split(batch))
        return cached[2]

    @property
    def batch(self) -> int:
        """The number of sequences of the forward that :meth:`groups` split."""
        return self.cached_groups[1]

    def split(self, batch: int) -> list[TaskGroup]:
        task = self.task
        if task is None:
            if len(self.tasks) == 1:
                return [TaskGroup(self.tasks[0], None)]
            raise RoutingInputError(
                f"this model routes several tasks {list(self.tasks)}; pass task=<name> (or one name per sequence), or, "
                "for calls that cannot pass it (generate(), a routed block called on its own), set one with "
                "modpass.default_task(model, <name>)."
            )
        if isinstance(task, str):
            return [TaskGroup(self.check(task), None)]
        if isinstance(task, torch.Tensor):
            if task.dtype in (torch.bool,) or task.is_floating_point() or task.dim() != 1:
                raise RoutingInputError(f"task tensor must be a 1-D integer tensor of task indices, got dtype {task.dtype} and shape {tuple(task.shape)}.")
        elif not isinstance(task, Sequence):
            raise RoutingInputError(f"task must be a name, a list of names or a LongTensor of indices, got {type(task).__name__}.")
        # Not len(): on a tensor it returns an int, which under torch.export fixes the batch to the example's.
        entries = task.shape[0] if isinstance(task, torch.Tensor) else len(task)
        if entries != batch and self.defaults_taken[0] and batch % entries == 0:
            task = per_prompt(task, batch)
            entries = batch
        if entries != batch:
            raise RoutingInputError(f"task lists {entries} entries but the batch has {batch} sequences; give one task per sequence.")
        if not isinstance(task, torch.Tensor):
            names = [self.check(t) for t in task]
        elif torch.compiler.is_compiling():
            return self.split_in_graph(task)
        elif task.is_meta:
            raise RoutingInputError(
                "task ids on the meta device have no values to split the batch by; give them on the device the model "
                "runs on (or one task name for the whole batch)."
            )
        else:
            indices = task.tolist()
            bad = [i for i in indices if not 0 <= i < len(self.tasks)]
            if bad:
                raise RoutingInputError(f"task index {bad[0]} is out of range; tasks are {dict(enumerate(self.tasks))}.")
            names = [self.tasks[i] for i in indices]
        if len(set(names)) == 1:
            return [TaskGroup(names[0], None)]
        groups = []
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], dtype=torch.long)
            groups.append(TaskGroup(name, rows))
        return groups

    def split_in_graph(self, task: torch.Tensor) -> list[TaskGroup]:
        """One group per task, of data-dependent size (empty when the task is absent).

        Used under torch.compile and torch.export (ONNX's included), where a
        split read in Python (the eager path) would graph-break in every
        routed block and specialise on each mix. With ``torch._dynamo.config.capture_dynamic_output_shape_ops``,
        ``nonzero`` keeps the split in the graph, with group sizes as unbacked
        symbols, so one graph serves every mix of tasks; without it Dynamo
        breaks the graph here, once per forward, and its message names that
        setting.
        """
        if _compat.EXPORT_FAILS_ON_TASK_ID_SPLIT and _compat.exporting_without_dynamo():
            raise ConfigError(
                f"exporting task ids as a program input needs torch >= 2.8: torch {torch.__version__}'s export fails on "
                "the data-dependent sizes of the tasks' groups. Export one program per task (a module that fixes task=, "
                "as examples/export_llama.py's ServeTask), or upgrade torch."
            )
        if _compat.DYNAMO_DROPS_UNBACKED_CHECKS:
            # There the check below does nothing: read the ids through a bounds-checked index instead.
            task = torch.arange(len(self.tasks), device=task.device)[task]
        groups = [TaskGroup(name, (task == i).nonzero().squeeze(1)) for i, name in enumerate(self.tasks)]
        # A row whose id is out of range is in no group. Checked on the group sizes, not the ids: the
        # sizes are host integers, so compiled this is a runtime assert in Inductor's Python wrapper
        # ("Eq(u0 + u1, 4)" for a batch of 4 and two tasks). A check on the ids (torch._assert_async)
        # lands in a C++ kernel, where a compiled forward without autograd aborts the process on CPU
        # (torch 2.13), torch 2.6-2.8 drop it (the row is left uninitialised), and on CUDA it is a
        # device-side assert, which ends the process's CUDA context.
        # (Without a message: torch 2.6's Dynamo takes none, and later ones drop it from runtime asserts.)
        torch._check(sum(group.rows.shape[0] for group in groups) == task.shape[0])
        return groups

    def warn_once(self, key: str, message: str, *, stacklevel: int) -> None:
        """Warn ``message`` the first time ``key`` comes up for this model, not again: once per model, where Python's
        own filter says once per source line across models."""
        if key in self.warnings_given:
            return
        self.warnings_given = self.warnings_given | {key}  # not add(): the class default is shared
        warnings.warn(message, stacklevel=stacklevel + 1)

    def check(self, name: object) -> str:
        if name not in self.tasks:
            raise RoutingInputError(f"unknown task {name!r}; this model routes tasks {list(self.tasks)}.")
        return name  # type: ignore[return-value]


def per_prompt(rows, batch: int):
    """``rows`` (a default task list or route mask, a row per prompt) for a call of ``batch`` sequences that repeats
    each prompt ``batch // len(rows)`` times in a row, as ``generate()`` does for beams and ``num_return_sequences``."""
    if isinstance(rows, torch.Tensor):  # its size, not len(), which would fix an exported batch
        return rows.repeat_interleave(batch // rows.shape[0], dim=0)
    return [row for row in rows for _ in range(batch // len(rows))]


def take_routing_arguments(module: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a routed model: move ``task``/``route_mask`` into its RoutingState."""
    state: RoutingState = module._modpass_state
    if not torch.compiler.is_compiling():
        refuse_concurrent_calls(module, state)
    # Read by iterating over the keys: Dynamo then guards on the whole key set. For `pop(key, default)`
    # or `key in kwargs` it guards only on keys that are there (torch 2.7.1 to 2.13), so a forward compiled
    # without a route mask would have dropped one given later, silently.
    routing, flags = {}, {}
    for key in list(kwargs):
        if key in ("task", "route_mask"):
            routing[key] = kwargs.pop(key)
        elif key.startswith("output_"):
            flags[key] = kwargs[key]
    if not state.dense:
        refuse_unrecorded_outputs(module, state, flags)
    state.start_call(routing.get("task", state.default_task), routing.get("route_mask", state.default_route_mask),
                     ("task" not in routing, "route_mask" not in routing))
    state.in_forward = True
    state.last_forward_dense = state.dense
    for block in state.blocks:
        block.last_routing = []
    return args, kwargs


class ForwardTakingRoutingArguments:
    """A routed model's ``forward``: the model's own, whose signature also names ``task`` and ``route_mask``.

    The model's pre-hook (:func:`take_routing_arguments`) takes those two out of each call; the forward itself is
    unchanged. Its signature matters to callers that pick what to pass by reading it: Hugging Face's ``Trainer``
    drops every dataset column the forward does not name (``remove_unused_columns``), so a route mask or task ids in
    the data never reached the model, silently; ``generate()`` refuses keyword arguments it does not name.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        #: A forward set on the instance before routing (accelerate's hooks set one), else the class's runs.
        self.own_forward = model.__dict__.get("forward")

    @property
    def wrapped(self):
        """The forward this one runs, bound: the instance's own, else the class's."""
        return self.own_forward or type(self.model).forward.__get__(self.model)

    def __call__(self, *args, **kwargs):
        if torch.jit.is_tracing():  # before the call: the ONNX exporter's tracer passes task and route_mask by position
            raise RoutingInputError(torchscript_refusal(type(self.model).__name__, "trace"))
        # Not through `wrapped`: called so (function.__get__), a compiled model whose graph breaks recursed into this
        # call (torch 2.13, tests/test_backend.py's route masks split by capacity).
        if self.own_forward is not None:
            return self.own_forward(*args, **kwargs)
        return type(self.model).forward(self.model, *args, **kwargs)

    @property
    def __code__(self):
        # The forward's code, which torch 2.6's export reads (forward.__code__) to name the model in its messages. An
        # instance's own forward may be a functools.partial (accelerate's hooks), which has none.
        return getattr(self.wrapped, "__code__", type(self.model).forward.__code__)

    @property
    def __signature__(self) -> inspect.Signature:
        signature = inspect.signature(self.wrapped)
        parameters = list(signature.parameters.values())
        named = {parameter.name for parameter in parameters}
        at = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters))
        routing = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
                   for name in ("task", "route_mask") if name not in named]
        return signature.replace(parameters=[*parameters[:at], *routing, *parameters[at:]])


def refuse_unrecorded_outputs(module: torch.nn.Module, state: RoutingState, flags: dict) -> None:
    """Refuse a call that asks (by ``output_<key>=True``, or the model config's) for an output that transformers
    records from a part of a routed block: a routed call runs the block's captured graph, which runs no hook on a part,
    so the output would leave the routed layers out."""
    config = getattr(module, "config", None)
    for key in dict.fromkeys(("attentions", *(state.part_recorded_outputs or {}))):
        flag = f"output_{key}"
        if not (flags[flag] if flag in flags else getattr(config, flag, False)):
            continue
        if key == "attentions":  # whatever records them: a routed block's attention runs on its selected tokens alone
            raise RoutingInputError(
                "output_attentions=True: a routed block's attention runs inside its captured graph, over its selected "
                "tokens, and no attention weights are recorded for it; the model would return fewer maps than it has "
                "layers. Call without output_attentions (or inside modpass.dense(model) for the dense model's)."
            )
        path, part = state.part_recorded_outputs[key]
        raise RoutingInputError(
            f"{flag}=True: transformers records {key} with a hook on a part of each layer ({part}; routed block "
            f"{path} holds one), and a routed call runs the block's captured graph, which runs no such hook; the "
            f"model's {key} (and what it computes from them, such as a sparse-MoE load-balancing loss) would leave the "
            f"routed layers out. Call with {flag}=False (and the config's {flag} off), route only layers without "
            f"{part} (layers=), or call inside modpass.dense(model) for the dense model's."
        )


def end_forward(module: torch.nn.Module, args: tuple, output) -> None:
    """Forward hook of a routed model (run on errors too): routed blocks called on their own replace their records."""
    state: RoutingState = module._modpass_state
    if not torch.compiler.is_compiling():
        if state.__dict__.get("forward_thread") != threading.get_ident():
            return  # a call refused by refuse_concurrent_calls: the forward under way is another thread's
        del state.forward_thread
    state.in_forward = False


def refuse_concurrent_calls(module: torch.nn.Module, state: RoutingState) -> None:
    """Refuse an eager call of a routed model while another thread is inside one: the task, route mask and routing
    records of a call are the model's (its RoutingState, which every routed block reads), so concurrent calls would
    route with each other's tasks, silently. A dense model serves threads; a routed one serves one call at a time.
    The thread inside is ``state.forward_thread`` until the model's forward hook (:func:`end_forward`) removes it.
    Compiled calls are not checked: Dynamo would break the graph on the thread's identity."""
    me = threading.get_ident()
    inside = state.__dict__.setdefault("forward_thread", me)  # one atomic step: two threads cannot both take it
    if inside != me:
        raise RoutingInputError(
            f"{type(module).__name__} was called from one thread while another was inside its forward. A routed "
            "model's routing state (the call's task, route mask and routing records) belongs to the model, so "
            "concurrent calls would route with each other's tasks. Serialise the calls (a threading.Lock around "
            "each), or give each thread its own copy (copy.deepcopy shares the captured graphs). nn.DataParallel runs "
            "its replicas in threads: use DistributedDataParallel."
        )
