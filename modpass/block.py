"""``RoutedBlock``: the module that replaces a routed transformer block.

It keeps the original block's submodules, parameters and buffers under their
original names (so the model's ``state_dict`` is unchanged apart from the
routers) and adds ``mod_routers.<task>`` (``Linear(D, 1)``, zero-initialised).

Its forward runs the routed FX graph that ``pipeline`` builds from the
original block. Graphs are cached per call structure (train/eval mode, which
arguments are tensors or None, dtypes, devices, size-1 axes, flag values),
because export bakes those in; a new structure is captured on first use, in
about a second, unless another block of the model that traces alike has
captured it (see :mod:`modpass.capture_sharing`). The dispatch for a
whole-batch task is plain Python over tuples, so
``torch.compile(fullgraph=True)`` traces straight through to the
routed graph; so does a mixed-task batch given as task ids, split in the
graph (see ``RoutingState.split_in_graph``). A batch of one runs the graphs
of the prepared call it is a row of. Any other structure first seen under
compile is captured through a graph break (run the model once eagerly with
such inputs to avoid it).
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.utils import skip_init

from . import _compat, _structure, kv_cache, part_changes
from ._compat import disable_compile
from ._export import CALL_HOOKS, hooked_weight, resolve, set_weight_name
from .errors import RouterError, RoutingInputError, UnroutableBlockError
from .hints import torchscript_refusal
from .passes.token_axes import user_inputs
from .plan import BlockPlan
from .routing import capacity, row_capacities
from .tasks import RoutingState, TaskGroup

#: Where transformers' output-recording hooks come from (see :mod:`modpass.output_recording`).
OUTPUT_RECORDER_MODULE = "transformers.utils.output_capturing"
#: The per-module dicts of hook functions (the others of CALL_HOOKS hold flags about them).
HOOK_FUNCTIONS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")

#: How to train routers beside a PEFT adapter, which :meth:`RoutedBlock.router` reads through.
PEFT_ROUTERS_HINT = (
    " With PEFT: LoraConfig(..., exclude_modules=['mod_routers.{task}'], modules_to_save=['mod_routers.{task}']) "
    "(one entry per task), which trains a copy of each router that modpass reads, and an adapter name that no task "
    "has (get_peft_model(..., adapter_name='lora')): PEFT's save_pretrained cuts the adapter's name out of the names "
    "it saves, a task's included."
)

#: A routed block's graphs by call structure: dropped by pickling, shared by a deep copy, emptied by a recapture.
GRAPH_CACHES = ("_analyses", "_routes", "_row_of")

#: Under torch.compile, the rows of a route-masked group share one call with a slot count rounded up
#: to a multiple of this (at most the sequence length; see :meth:`RoutedBlock.share_one_call`).
SLOT_MULTIPLE = 8


@dataclass
class Route:
    """A routed graph and how to feed it: ``inputs[i] = (role, target)``."""

    graph: torch.fx.GraphModule
    inputs: tuple[tuple[str, object], ...]
    outputs: object  # output template of _structure.Slot markers
    constants: dict[str, torch.Tensor]


@dataclass
class RoutingRecord:
    """What one routed call decided, for auxiliary losses and inspection.

    ``logits`` carry gradient only when the plan has an auxiliary loss
    (``aux_loss_weight > 0``) or the STRing gate; otherwise the router trains
    through the gate alone and the full scores are detached (see
    ``passes/rewrite.py``: that saves a ``(B, T, D)`` activation per block).
    """

    task: str
    logits: torch.Tensor
    index: torch.Tensor
    rows: torch.Tensor | None
    route_mask: torch.Tensor | None = None
    #: ``(B, T)`` bool, True for padding (read from the block's attention mask); None if unmasked.
    padding: torch.Tensor | None = None
    #: ``(B, k)`` bool, True for slots that only pad a row to the group's largest capacity
    #: (rows of different capacities under a route mask, in one call under torch.compile).
    extra: torch.Tensor | None = None

    @property
    def selected(self) -> torch.Tensor:
        """``(B, T)`` bool: the tokens this call ran the block on and updated (not extra slots, not padding)."""
        chosen = torch.zeros_like(self.logits, dtype=torch.bool)
        chosen = chosen.scatter(1, self.index, True if self.extra is None else ~self.extra)
        return chosen if self.padding is None else chosen & ~self.padding


def capturing(reason: str):
    """Decorate a method that captures a block's graphs: it runs outside Dynamo's graph (``reason`` is what the graph
    break says) and outside the saved-tensor hooks of a checkpoint around the call. Tracing saves tensors too, and a
    non-reentrant checkpoint counts what its forward saved against what its recomputation saves, which finds the
    graphs built (torch's CheckpointError on the first call of a new structure)."""

    def decorate(method):
        @functools.wraps(method)
        def unhooked(*args, **kwargs):
            with torch.autograd.graph.saved_tensors_hooks(_as_it_is, _as_it_is):
                return method(*args, **kwargs)

        return disable_compile(reason)(unhooked)

    return decorate


def _as_it_is(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


# What torch.compile(fullgraph=True) says when a routed block meets a call it has no graph for.
capture_outside_the_graph = capturing(
    "modpass: a routed block met a call structure it has no graph for (train/eval mode, autocast, "
    "dtypes, devices, size-1 axes, which arguments are given) and captures it here, outside the "
    "compiled graph. Prepare it before compiling: under torch.autocast call "
    "modpass.prepare_autocast(model, dtype); otherwise run the model once with such inputs, eagerly "
    "and compiled without fullgraph (Dynamo passes blocks other arguments than eager mode does)."
)

recapture_outside_the_graph = capturing(
    "modpass: a part of a routed block was replaced or added (an adapter such as PEFT's LoRA, a swapped module), or "
    "its adapters' state, attention implementation or dropout rates changed, so its graphs are captured again, here, outside the "
    "compiled graph. Call the model once eagerly after changing it, then compile."
)

# Reading each row's capacity in Python breaks the graph; said once here, where it happens.
split_outside_the_graph = disable_compile(
    "modpass: under a route mask, rows of one task with different capacities run one call per "
    "capacity, split here outside the compiled graph: the block's attention could see the slots "
    "that one shared call would add (its shared_call_refusal says how), or this torch (2.6) cannot "
    "compile that call."
)


class RoutedBlock(nn.Module):
    def __init__(self, block: nn.Module, plan: BlockPlan, *, gate: str, state: RoutingState, examples: list | None = None,
                 score_gradients: bool = True):
        super().__init__()
        # Share the block's own tensors and children, so names, devices and
        # loaded weights stay in one place; the block object itself is kept
        # outside the module tree to capture its forward on new structures.
        self._parameters = block._parameters
        self._buffers = block._buffers
        self._non_persistent_buffers_set = block._non_persistent_buffers_set
        for name, child in block.named_children():
            self._modules[name] = child
        reference = next(block.parameters(), None)
        factory = {"dtype": reference.dtype, "device": reference.device} if reference is not None else {}
        # skip_init: zeros need no random draw, so routing leaves the caller's random stream where it was.
        self.mod_routers = nn.ModuleDict({task: skip_init(nn.Linear, plan.hidden_size, 1, **factory) for task in plan.routed_tasks()})
        for router in self.mod_routers.values():
            nn.init.zeros_(router.weight)
            nn.init.zeros_(router.bias)
        self.training = block.training
        if hasattr(block, "gradient_checkpointing"):
            # Hugging Face's gradient_checkpointing_enable() finds layers by this attribute.
            self.gradient_checkpointing = block.gradient_checkpointing
        self.__dict__["_block"] = block
        self.adopt_plan(plan)
        self.__dict__["_gate"] = gate
        # Whether the full per-token logits train (the auxiliary loss); see passes/rewrite.py.
        self.__dict__["_score_gradients"] = score_gradients
        self.__dict__["_state"] = state
        self.__dict__["_analyses"] = {}
        self.__dict__["_routes"] = {}
        # Structure of a batch of one -> the prepared structure it is a row of (see prepare).
        self.__dict__["_row_of"] = {}
        # Set by set_ratios: per task, the ratio carried as tensor sizes (see capacity_carriers).
        self.__dict__["_capacity_carriers"] = None
        self.__dict__["last_routing"] = []
        # Why rows of different capacities cannot share one call here (see share_one_call), or None.
        self.__dict__["shared_call_refusal"] = None
        self.__dict__["_hidden_name"] = first_parameter_name(block)
        # Calls this block is known to receive, to prepare its graphs ahead of
        # use in each train/eval mode (torch.compile cannot capture mid-trace).
        self.__dict__["_examples"] = [self.hidden_first(*call) for call in examples or []]
        # Autocast dtypes to prepare those calls under as well (modpass.prepare_autocast).
        self.__dict__["_autocast_dtypes"] = []
        self.note_parts()

    # -- module plumbing ---------------------------------------------------------------------------
    @property
    def plan(self) -> BlockPlan:
        return self._plan

    def adopt_plan(self, plan: BlockPlan) -> None:
        """Route by ``plan`` from now on. Its ratios are read through a plain dict (``_ratios``): the plan's own are
        read-only, a dict subclass, on whose lookups torch 2.6's Dynamo guards with the next call's task as key
        (a ``KeyError`` in the guard, not a recompile)."""
        self.__dict__["_plan"] = plan
        self.__dict__["_ratios"] = dict(plan.ratios)

    def adopt_hooks(self) -> None:
        """Take over the block's call hooks (the user's, or transformers' output recorder).

        They run around the routed block from then on, with its inputs and
        outputs; the block itself, which modpass captures (with fake tensors)
        and runs for ``modpass.dense``, keeps none.
        """
        block, empty = self._block, vars(nn.Module())
        for name in (*CALL_HOOKS, "_is_full_backward_hook"):
            if name in vars(block):
                self.__dict__[name], block.__dict__[name] = vars(block)[name], empty[name]

    def warn_of_hooks_on_parts(self) -> None:
        """Say once, in eager mode, which of the block's parts (its attention, its MLP) carry hooks: an uncached routed
        call runs the block's captured graph, which runs none of them (transformers' own output recorders aside,
        whose outputs :func:`~modpass.tasks.refuse_unrecorded_outputs` refuses to leave short, and hooks that set a
        weight, which :func:`~modpass._export.hooked_weight` takes)."""
        if self.__dict__.get("_warned_of_hooks_on_parts"):
            return
        hooked = [name for name, part in self._parts if any(
            getattr(hook, "__module__", None) != OUTPUT_RECORDER_MODULE and set_weight_name(hook) is None
            for hooks in HOOK_FUNCTIONS for hook in getattr(part, hooks).values())]
        if hooked:
            self.__dict__["_warned_of_hooks_on_parts"] = True
            warnings.warn(
                f"modpass: {self._plan.path}: hooks on {', '.join(hooked)} do not run in its routed calls, which run the "
                "block's captured graph over its selected tokens; hooks on the block itself do (with its inputs and "
                "outputs). Hook the block, or run the dense model (modpass.dense(model)) where the hooks must run.",
                stacklevel=3,
            )

    def __getattr__(self, name: str):
        # Model code reads its layers' settings (ModernBERT picks each layer's mask by layer.attention_type):
        # the block's public attributes answer for it. Private ones stay the routed block's own.
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_block")
            if block is None or name.startswith("_"):
                raise
            return getattr(block, name)

    def train(self, mode: bool = True):
        changed = mode != self.training
        if changed:
            others = sum(b.training != mode for b in self._state.blocks if b is not self)
            self._state.switching.block_starts("train" if mode else "eval", pending=others + 1,
                                               stage="preparing the routed graphs for this mode")
        self._block.training = mode
        super().train(mode)
        if changed:
            try:
                self.prepare()
            finally:
                self._state.switching.block_done()
        return self

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update({cache: {} for cache in GRAPH_CACHES}, last_routing=[])
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.note_parts()

    def __deepcopy__(self, memo):
        # A deep copy shares the graphs built so far, in dicts of its own: they take the block's tensors as inputs
        # and never change once built. So the copy runs, and compiles with fullgraph=True, without capturing them
        # again; a pickled block, which cannot carry them, captures them on first use.
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        for cache in GRAPH_CACHES:
            copied.__dict__[cache] = dict(self.__dict__[cache])
        return copied

    def note_parts(self) -> None:
        """Watch the block's parts for replacements (:mod:`modpass.part_changes`); note them and their adapters' state."""
        part_changes.watch(self)
        self.__dict__["_parts"] = [(name, part) for name, part in self._block.named_modules() if name]
        # Where each part sits (its parent and name), and the block's children as this routed block's: compared at
        # each call by parts_swapped, a list of lookups that Dynamo traces as fast as eager code runs it.
        self.__dict__["_part_slots"] = [(parent, name, child) for parent in (self._block, *(part for _, part in self._parts))
                                        for name, child in parent._modules.items()]
        self._part_slots.extend((self, name, child) for name, child in self._block._modules.items())
        self.__dict__["_adapter_layers"] = {name: part for name, part in self._parts if hasattr(part, "_disable_adapters")}
        self.__dict__["_adapter_state"] = self.adapter_state()
        configs = (getattr(module, "config", None) for module in (self._block, *(part for _, part in self._parts)))
        self.__dict__["_configs"] = list({id(c): c for c in configs if hasattr(c, "_attn_implementation")}.values())
        self.__dict__["_attention_implementations"] = self.attention_implementations()
        self.__dict__["_dropouts"] = [part for _, part in self._parts if isinstance(part, _DropoutNd)]
        self.__dict__["_dropout_rates"] = self.dropout_rates()

    def attention_implementations(self) -> tuple:
        """The attention implementation that the block's transformers configs name, which its attention reads in its
        forward and a capture bakes in (``model.set_attn_implementation()`` changes it)."""
        return tuple(config._attn_implementation for config in self._configs)

    def dropout_rates(self) -> tuple:
        """The rates of the block's dropout layers, which a capture bakes in: setting them after ``transform`` (TRL's
        ``disable_dropout_in_model`` sets them to 0) must reach the routed calls."""
        return tuple(part.p for part in self._dropouts)

    def adapter_state(self) -> tuple:
        """What the block's adapter layers (PEFT's, by their attributes) compute with, which a capture bakes in:
        whether adapters are disabled, which are active, which merged."""
        return tuple((m._disable_adapters, tuple(m.active_adapters), tuple(m.merged_adapters)) for m in self._adapter_layers.values())

    def refuse_mixed_adapters(self) -> None:
        """PEFT runs a batch that mixes adapters (``adapter_names=``) by hooking its adapter layers for that call; a
        routed call runs a graph captured with one adapter state, so every row would get the active adapter."""
        hooked = [name for name, layer in self._adapter_layers.items() if layer._forward_pre_hooks]
        if hooked:
            raise RoutingInputError(
                f"{self._plan.path}: its adapter layers ({', '.join(hooked[:3])}{', ...' if len(hooked) > 3 else ''}) "
                "carry forward pre-hooks, as PEFT sets them for a batch that mixes adapters (adapter_names=). A routed "
                "call runs the block's graph captured with one adapter state, so every row would get the active "
                "adapter. Run each adapter's rows as a batch of their own after set_adapter(), or run the dense model "
                "(modpass.dense(model))."
            )

    def parts_swapped(self) -> bool:
        """Whether a part was put in place without torch's registration hook (``module._modules[name] = new``, as
        torch.ao's ``prepare_qat`` and ``quantize_dynamic`` swap layers), which :mod:`~modpass.part_changes` does not
        see: a part of the block other than the one noted, or a child of this routed block other than its block's."""
        return any(parent._modules.get(name) is not child for parent, name, child in self._part_slots)

    def adopt_swapped_children(self) -> None:
        """Give the block the children put in place on this routed block by :meth:`parts_swapped`'s way."""
        for name in list(self._block._modules):
            if self._modules.get(name) is not self._block._modules[name]:
                self._block._modules[name] = self._modules.get(name)

    def parts_changed(self) -> bool:
        return (bool(self.__dict__.get("_parts_changed")) or self.parts_swapped() or self.adapter_state() != self._adapter_state
                or self.attention_implementations() != self._attention_implementations
                or self.dropout_rates() != self._dropout_rates)

    @recapture_outside_the_graph
    def recapture(self) -> None:
        """Capture the graphs of every routed block of the model whose parts were replaced or added, or whose adapters,
        attention implementation or dropout rates changed, this one first. All at once: a forward need not call them all (a text
        batch skips the vision tower), and the progress bar counts them."""
        changed = [self, *(b for b in self._state.blocks if b is not self and b.parts_changed())]
        if any(b.adapter_state() != b._adapter_state for b in changed):
            warnings.warn(
                "modpass: the adapters of routed blocks changed state (PEFT's disable_adapter(), set_adapter() or a "
                "merge): their graphs, which bake it in, are captured again, about a second per block. Switching "
                "adapters at every step pays that every time.",
                stacklevel=4,
            )
        self._state.shared_captures.clear()  # what a capture shared by identity may have changed (see capture_sharing)
        switching = self._state.switching
        for block in changed:
            block.__dict__.pop("_parts_changed", None)  # absent, as before any change: what a compiled call guards on
            for cache in GRAPH_CACHES:
                block.__dict__[cache].clear()
            block.adopt_swapped_children()
            block.note_parts()  # the new parts too
            switching.block_starts("recapture", pending=len(changed), stage="capturing the blocks whose parts changed")
            try:
                block.prepare()
            finally:
                switching.block_done()

    def extra_repr(self) -> str:
        ratios = {t: (None if r is None else float(r)) for t, r in self._ratios.items()}
        return f"block={type(self._block).__name__}, ratios={ratios}, gate={self._gate!r}"

    def __prepare_scriptable__(self):
        raise RoutingInputError(torchscript_refusal(self._plan.path, "script"))

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if torch.jit.is_tracing():
            raise RoutingInputError(torchscript_refusal(self._plan.path, "trace"))
        args, kwargs = self.hidden_first(args, kwargs)
        if (missing := self.hidden_state_missing(args, kwargs)) is not None:
            raise RoutingInputError(missing + ".")
        state = self._state
        if not state.in_forward:
            state.start_call(state.default_task, state.default_route_mask, (True, True))
        if state.dense:
            return self._block(*args, **kwargs)
        if self.parts_changed():
            self.recapture()
        self.refuse_mixed_adapters()
        cache = kv_cache.cache_argument(kwargs)
        # Not read for a cached call: its route mask is the prompt's, which a compiled decoding step must not guard on.
        task = None if cache is not None else state.whole_batch_task()
        if cache is None and not torch.compiler.is_compiling():
            self.warn_of_hooks_on_parts()

        def route(args, kwargs):
            # The records leave as an output, not by appending to last_routing: a checkpointed
            # function must not change state outside it (Dynamo refuses that under fullgraph).
            records = []
            if cache is not None:
                output = kv_cache.run(self, cache, args, kwargs, records)
            elif task is None:
                output = self.run_groups(args, kwargs, records)
            else:
                output = self.run(TaskGroup(task, None), args, kwargs, records)
            return output, tuple(records)

        if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
            checkpoint = getattr(self, "_gradient_checkpointing_func", None)
            call = state.call()

            def recomputable(args, kwargs):
                with state.routing_call(*call):
                    return route(args, kwargs)

            # Compiled, the recomputation is the graph's own and reads no Python state.
            checkpointed = route if torch.compiler.is_compiling() else recomputable
            if checkpoint is None:
                output, records = torch.utils.checkpoint.checkpoint(checkpointed, args, kwargs, use_reentrant=False)
            elif getattr(checkpoint, "keywords", {}).get("use_reentrant", True):
                output, records = checkpoint_reentrant(checkpoint, checkpointed, args, kwargs)
            else:
                output, records = checkpoint(checkpointed, args, kwargs)
        else:
            output, records = route(args, kwargs)
        routing = [RoutingRecord(*fields) for fields in records]
        # Within one forward of the model, a shared or looped block's later calls add to its earlier ones.
        self.last_routing = [*self.last_routing, *routing] if state.in_forward else routing
        return output

    def hidden_first(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The call with a hidden state given by name (``block(hidden_states=h)``, as diffusers calls its blocks) moved
        to the front, the form every routed path reads."""
        if args or self._hidden_name not in kwargs:
            return args, kwargs
        kwargs = dict(kwargs)
        return (kwargs.pop(self._hidden_name),), kwargs

    def hidden_state_missing(self, args: tuple, kwargs: dict) -> str | None:
        """None when the call (as :meth:`hidden_first` leaves it) has a tensor first, else why it cannot be routed:
        which argument a routed block takes as the hidden state."""
        if args and isinstance(args[0], torch.Tensor):
            return None
        by_name = (f"by the name of the block's first parameter, {self._hidden_name!r}" if self._hidden_name is not None
                   else "not by keyword: its forward's first parameter takes no keyword")
        return (f"{self._plan.path}: a routed block takes the hidden state as its first argument (by position, or "
                f"{by_name}); this call gave it {'keywords ' + ', '.join(map(repr, kwargs)) if kwargs else 'no argument'}")

    def run(self, group: TaskGroup, args: tuple, kwargs: dict, records: list):
        """Route one group of sequences (the whole batch unless ``group.rows``); its record's fields go to ``records``."""
        ratio = self._ratios.get(group.task)
        if ratio is None:
            if group.rows is not None and torch.compiler.is_compiling():
                return self.run_captured(args, kwargs)
            return self._block(*args, **kwargs)
        k = group.capacity
        if k is None and self._capacity_carriers is not None:
            k = capacity(args[0].shape[1], *self.ratio_terms(group.task))
        form = "per_row" if group.row_capacity is not None else "given" if k is not None else "ratio"
        route = self.route(form, group.task, args, kwargs)
        mask = self.group_route_mask(group, *args[0].shape[:2])
        inputs = self.graph_inputs(route.inputs, route.constants, args, kwargs, router=self.router(group.task), capacity=k,
                                   route_mask=mask, row_capacity=group.row_capacity)
        # Its forward, not the module call: the graph is modpass's own, and module hooks on it (FlopCounterMode's
        # module tracker hooks every call) would see inputs no block call shows, such as a parameter's view made
        # under no_grad, on which that tracker fails (requires grad, no grad_fn).
        *outputs, logits, index, padding, extra = route.graph.forward(*inputs)
        records.append((group.task, logits, index, group.rows, mask, padding, extra))
        return _structure.fill(route.outputs, outputs)

    def router(self, task: str) -> nn.Linear:
        """The ``Linear`` that scores ``task``'s tokens here, whose weight and bias routed calls read: a router is never
        called as a module. PEFT's ``modules_to_save`` wrapper stands for the copy it runs. Any other wrapper (PEFT's
        LoRA layer, which answers for its base layer's ``weight``) or a hook on a router would be left out, and is
        refused rather than ignored."""
        if task not in self.mod_routers:
            raise RouterError(f"{self.router_place(task)} is missing: mod_routers holds {sorted(self.mod_routers)}. Put the "
                              "router back, or route the model again (modpass.transform) for another set of tasks.")
        module = self.mod_routers[task]
        while True:
            if any(getattr(module, hooks) for hooks in HOOK_FUNCTIONS):
                raise RouterError(
                    f"{self.router_place(task)} has hooks, which would never run: routed calls read a router's weight and bias and do not "
                    "call it. Read its scores from the block's routing records (block.last_routing) instead; PEFT hooks "
                    "its layers for a batch that mixes adapters (adapter_names=), which a routed model cannot run."
                )
            if type(module).forward is nn.Linear.forward:
                if module.bias is None or tuple(module.weight.shape) != (1, self._plan.hidden_size):
                    raise RouterError(
                        f"{self.router_place(task)} is a Linear({module.in_features}, {module.out_features}, "
                        f"bias={module.bias is not None}); a router is a Linear({self._plan.hidden_size}, 1) with a bias, "
                        "one score per token from its hidden state, as transform makes it. Set its weight and bias in "
                        "place (router.weight.copy_(...)) rather than replacing the router."
                    )
                return module
            if hasattr(module, "original_module") and hasattr(module, "modules_to_save"):
                # PEFT's wrapper runs, and answers attribute reads for, its active adapter's copy (or the original).
                adapters = module.active_adapters
                self.warn_of_adapters_named_as_tasks(module.modules_to_save)
                module = module.original_module if module.disable_adapters or not adapters else module.modules_to_save[adapters[0]]
                continue
            raise RouterError(
                f"{self.router_place(task)} is a {type(module).__module__}.{type(module).__qualname__}, not a torch.nn.Linear: routed calls read a "
                "router's weight and bias and do not call it, so what the module adds (a LoRA adapter's update, a "
                "quantization) would be left out, and its parameters would not train. Leave the routers (mod_routers) "
                "out of adapters, quantization and other module swaps, and train them as they are."
                + (PEFT_ROUTERS_HINT.format(task=task) if type(module).__module__.startswith("peft") else "")
            )

    def router_place(self, task: str) -> str:
        """Where ``task``'s router is, for messages (built only for them: routers are read at every call)."""
        return f"{self._plan.path}: the router of task {task!r} (mod_routers.{task})"

    def warn_of_adapters_named_as_tasks(self, adapters) -> None:
        """Say once, before training, what would fail only at loading: PEFT's ``save_pretrained`` cuts an adapter's
        name out of the names it saves, so a router copy of an adapter named as a task is saved under another name."""
        state = self._state
        clash = sorted(set(adapters) & set(state.tasks))
        if clash and not torch.compiler.is_compiling():
            state.warn_once(
                "adapter named as a task",
                f"modpass: PEFT adapter {clash[0]!r} has the name of a task of this model: PEFT's save_pretrained cuts "
                f"the adapter's name out of the names it saves, so it would save the router copies of task "
                f"{clash[0]!r} under other names, and loading them would fail. Name the adapter otherwise "
                "(get_peft_model(..., adapter_name='lora')).",
                stacklevel=5,
            )

    def route(self, form: str, task: str, args: tuple, kwargs: dict) -> Route | None:
        """The routed graph of this call structure for ``task``, built on first use.

        ``form`` says where k comes from: ``"ratio"`` (the plan's ratio of
        T), ``"given"`` (an input, with an optional route mask) or
        ``"per_row"`` (the largest of per-row capacities, see
        :func:`modpass.routing.select_tokens_per_row`). None when a ``"per_row"``
        call would let the block's attention see the extra slots.
        """
        key = (task, form, *self.structure(args, kwargs))
        if key not in self._routes:
            self.build_route(key, self._ratios[task], args, kwargs)
        return self._routes[key]

    def ratio_terms(self, task: str):
        """The task's ratio as ``(numerator, denominator)``: ints, or symbolic sizes after ``set_ratios``."""
        carriers = self._capacity_carriers
        if carriers is None:
            ratio = self._ratios[task]
            return ratio.numerator, ratio.denominator
        numerator, denominator = carriers[task]
        return numerator.shape[0] - CARRIER_OFFSET, denominator.shape[0] - CARRIER_OFFSET

    def run_captured(self, args: tuple, kwargs: dict):
        """The block's captured graph, unrouted: a task that is dense here, on a group of a mixed batch under compile.

        The group's size is data-dependent and may be 0 (the task is absent).
        The block's own code cannot take that (a ``view(..., -1, ...)`` is
        ambiguous for an empty tensor); the captured graph has its sizes
        written out (see ``capture_block``).
        """
        gm = self.analysis(args, kwargs)[0]
        inputs = self.graph_inputs(gm.meta["modpass_inputs"], gm.meta["modpass_constants"], args, kwargs)
        return _structure.fill(gm.meta["modpass_output_template"], gm.forward(*inputs))  # as in run()

    def graph_inputs(self, roles, constants: dict, args: tuple, kwargs: dict, *, router=None, capacity=None, route_mask=None,
                     row_capacity=None) -> list:
        """The inputs of a captured or routed graph of this block, in the order its ``roles`` name them."""
        leaves = _structure.tensors((args, kwargs))
        inputs = []
        for role, target in roles:
            if role == "input":
                inputs.append(leaves[target])
            elif role in ("parameter", "buffer"):
                inputs.append(resolve(self, target))
            elif role == "hooked":
                inputs.append(hooked_weight(self, target))
            elif role == "constant":
                inputs.append(constants[target].to(args[0].device))
            elif role == "router":
                inputs.append(getattr(router, target))
            elif role == "capacity":
                inputs.append(capacity)
            elif role == "row_capacity":
                inputs.append(row_capacity)
            else:
                inputs.append(route_mask)
        return inputs

    def run_groups(self, args: tuple, kwargs: dict, records: list):
        """Mixed-task batches and route masks: route each group of alike rows separately.

        Group membership depends on tensor values. Under torch.compile a
        LongTensor of task ids splits in the graph (see
        :meth:`RoutingState.split_in_graph`), and the rows of a group keep
        one call under a route mask (see :meth:`share_one_call`).
        """
        hidden = args[0]
        groups = self.split_by_capacity(self._state.groups(hidden.shape[0]), args, kwargs)
        if len(groups) == 1 and groups[0].rows is None:
            return self.run(groups[0], args, kwargs, records)
        analysed, batch_leaves = self.analysis(args, kwargs)
        if analysed.meta["modpass_batch_mixing"]:
            raise UnroutableBlockError(
                f"{self._plan.path}: this batch is routed in groups of rows (its tasks or route-mask capacities differ), "
                "one call of the block per group, but the block combines different sequences of its batch: "
                + "; ".join(analysed.meta["modpass_batch_mixing"])
                + ". Give it batches of one task, by name (task='...'; a tensor of task ids is split in groups under "
                "torch.compile), without a route mask of differing capacities, or leave this block dense with layers=."
            )
        template = analysed.meta["modpass_output_template"]
        leaves = _structure.tensors((args, kwargs))
        row_outputs = (0, *analysed.meta["modpass_row_outputs"])
        assembled = {}
        for group in groups:
            rows = group.rows.to(hidden.device)
            sub = [leaf.index_select(0, rows) if is_batch else leaf for leaf, is_batch in zip(leaves, batch_leaves)]
            sub_args, sub_kwargs = _structure.replace((args, kwargs), sub)
            output = self.run(group, sub_args, sub_kwargs, records)
            outputs = _structure.collect(template, output)
            for j in row_outputs:
                part = outputs[j]
                if j not in assembled:
                    assembled[j] = part.new_empty((hidden.shape[0], *part.shape[1:]))
                assembled[j] = assembled[j].index_copy(0, rows, part)
        # Outputs that follow the batch are assembled row by row; inputs passed through are returned whole; the
        # rest are the same in every group. (Item by item: torch 2.6's Dynamo cannot trace `|` on dicts.)
        for j in row_outputs:
            outputs[j] = assembled[j]
        for j, i in analysed.meta["modpass_passthrough_outputs"].items():
            outputs[j] = leaves[i]
        return _structure.fill(template, [outputs[j] for j in range(len(outputs))])

    def split_by_capacity(self, groups: list[TaskGroup], args: tuple, kwargs: dict) -> list[TaskGroup]:
        """Under a route mask, split each routed task group into rows of equal capacity.

        Tokens outside the mask are always processed, so a row's capacity is
        ``#outside + ceil(ratio * #inside)``; rows of one group must share it
        to be gathered into one tensor. The capacities are read in Python,
        which would break a compiled graph in every routed block, so under
        torch.compile a group stays whole where :meth:`share_one_call` can run it.
        """
        batch, tokens = args[0].shape[:2]
        mask = self._state.checked_route_mask(batch, tokens, self._plan.path)
        if mask is None:
            return groups
        if torch.compiler.is_compiling():
            groups = [self.share_one_call(group, mask, args, kwargs) for group in groups]
        if all(self.stays_whole(group) for group in groups):
            return groups
        return self.split_rows_by_capacity(groups, mask)

    def stays_whole(self, group: TaskGroup) -> bool:
        """Whether a group under a route mask is one call: its rows share one call already, or its task is dense here."""
        return group.row_capacity is not None or self._ratios.get(group.task) is None

    @split_outside_the_graph
    def split_rows_by_capacity(self, groups: list[TaskGroup], mask: torch.Tensor) -> list[TaskGroup]:
        batch = mask.shape[0]
        refined = []
        for group in groups:
            if self.stays_whole(group):
                refined.append(group)
                continue
            capacities = row_capacities(mask, *self.ratio_terms(group.task)).tolist()
            by_capacity: dict[int, list[int]] = {}
            for row in range(batch) if group.rows is None else group.rows.tolist():
                by_capacity.setdefault(capacities[row], []).append(row)
            for k, members in by_capacity.items():
                whole = group.rows is None and len(by_capacity) == 1
                refined.append(TaskGroup(group.task, None if whole else torch.tensor(members, dtype=torch.long), k))
        return refined

    def share_one_call(self, group: TaskGroup, mask: torch.Tensor, args: tuple, kwargs: dict) -> TaskGroup:
        """``group`` as one call whose rows keep their own capacities, where the block allows it.

        The call has as many slots per row as the group's largest capacity,
        rounded up to a multiple of :data:`SLOT_MULTIPLE` (at most T), and the
        slots a row does not fill hold tokens it skips (see
        :func:`modpass.routing.select_tokens_per_row`), hidden from attention. That
        needs the largest capacity as a size: under torch.compile it is an
        unbacked symbol with ``torch._dynamo.config.capture_scalar_outputs = True``
        (without it Dynamo breaks the graph here and says so). The group is
        returned unchanged for a task that is dense here and for a block
        whose attention could see the extra slots, and on torch 2.6
        (``_compat.DYNAMO_CANNOT_SHARE_ONE_CALL``).
        """
        if _compat.DYNAMO_CANNOT_SHARE_ONE_CALL or self._ratios.get(group.task) is None:
            return group
        if self.route("per_row", group.task, args, kwargs) is None:
            return group
        row_capacity = row_capacities(group.rows_of(mask), *self.ratio_terms(group.task))
        # At least two slots (where there are two tokens): attention cannot broadcast over an unbacked
        # size that may be 1, and the floor also defines the maximum for a group with no rows (a task
        # absent from the batch). A slot beyond every row's capacity is an extra slot like any other.
        tokens = mask.shape[1]
        least = min(2, tokens)
        largest = torch.cat([row_capacity, row_capacity.new_full((1,), least)]).max()
        # Slots in multiples of SLOT_MULTIPLE (at most T): a (B, H, k, k) attention mask over them then
        # has the strides CUDA's memory-efficient attention requires. Eager SDPA pads an unaligned mask
        # itself; Inductor pads it for the forward but, with an unbacked k, hands the backward a
        # contiguous one ("attn_bias is not correctly aligned (strideH)", torch 2.11, H200).
        k = torch.clamp((largest + SLOT_MULTIPLE - 1) // SLOT_MULTIPLE * SLOT_MULTIPLE, max=tokens).item()
        torch._check(k >= least)
        torch._check(k >= 1)  # what least says where sizes are size-oblivious (the ONNX exporter's torch.export)
        torch._check(k <= tokens)
        return TaskGroup(group.task, group.rows, k, row_capacity)

    def structure(self, args: tuple, kwargs: dict) -> tuple:
        """The key of this call's structure: the graphs built for it are cached under it.

        A batch of one whose own structure was never captured takes the
        structure of the prepared call it is one row of (see :meth:`prepare`).
        """
        key = self.own_structure(args, kwargs)
        if key not in self._analyses:
            return self._row_of.get(key, key)
        return key

    def own_structure(self, args: tuple, kwargs: dict) -> tuple:
        return (self.mode_key(args[0]), _structure.signature(args), _structure.signature(kwargs))

    def mode_key(self, hidden: torch.Tensor) -> tuple:
        """What besides the arguments changes a captured graph: train/eval, of the block and of each part set apart
        from it (MC dropout puts a model's dropout layers back in training after ``model.eval()``), and autocast."""
        device = hidden.device.type
        autocast = torch.is_autocast_enabled(device)
        apart = tuple(name for name, part in self._parts if part.training != self.training)
        return (self.training, apart, autocast, torch.get_autocast_dtype(device) if autocast else None)

    def group_route_mask(self, group: TaskGroup, sequences: int, tokens) -> torch.Tensor | None:
        """The route mask of the call of ``group``, ``sequences`` long (the forward's batch, for a group of some of
        its rows)."""
        mask = self._state.route_mask_over(sequences if group.rows is None else self._state.batch, tokens)
        if mask is None or group.capacity is None:
            return None
        return group.rows_of(mask)

    # -- capture and rewrite ----------------------------------------------------------------------
    def analysis(self, args: tuple, kwargs: dict) -> tuple[torch.fx.GraphModule, tuple[bool, ...]]:
        """The analysed (not yet routed) graph of this call structure, and which inputs follow the batch."""
        key = self.structure(args, kwargs)
        found = self._analyses.get(key)
        if found is None:
            found = self.capture_analysis(key, args, kwargs)
        return found

    @capture_outside_the_graph
    def capture_analysis(self, key: tuple, args: tuple, kwargs: dict) -> tuple[torch.fx.GraphModule, tuple[bool, ...]]:
        from .pipeline import capture_block_graph

        self._block.training = self.training
        captures = self._state.shared_captures
        gm = captures.find(key, self._block)
        if gm is None:
            gm = capture_block_graph(self._block, args, kwargs, where=self._plan.where)
            captures.add(key, gm)
        batch = tuple(node.meta["modpass_batch_axis"] == 0 for node in user_inputs(gm))
        found = self._analyses[key] = (gm, batch)
        return found

    @capture_outside_the_graph
    def build_route(self, key: tuple, ratio: Fraction, args: tuple, kwargs: dict) -> None:
        from .pipeline import route_block_graph

        analysed, _ = self.analysis(args, kwargs)
        form = key[1]
        try:
            graph = route_block_graph(copy_graph_module(analysed, where=self._plan.where), ratio=ratio, gate=self._gate, explicit_capacity=form != "ratio",
                                       row_capacities=form == "per_row", score_gradients=self._score_gradients)
        except UnroutableBlockError as refusal:
            if form != "per_row":
                raise
            self._routes[key] = None  # rows of different capacities go one call per capacity
            self.__dict__["shared_call_refusal"] = str(refusal)
            return
        route = Route(
            graph=graph,
            inputs=tuple(graph.meta["modpass_inputs"]),
            outputs=graph.meta["modpass_output_template"],
            constants=graph.meta["modpass_constants"],
        )
        self._routes[key] = route

    def prepare(self) -> None:
        """Build the routed graphs of every routed task for the known calls, in the current mode.

        That includes the form that keeps rows of different capacities in
        one call, which only torch.compile uses (see :meth:`share_one_call`):
        a graph first built while Dynamo traces would break the graph.
        """
        form = "given" if self._capacity_carriers is not None else "ratio"
        for args, kwargs in self._examples:
            if (missing := self.hidden_state_missing(args, kwargs)) is not None:
                raise UnroutableBlockError(missing + ". Have the model pass it first by position, or leave this block "
                                           "dense with layers=.")
            for dtype in (None, *self._autocast_dtypes):
                with torch.autocast(args[0].device.type, dtype=dtype, enabled=dtype is not None):
                    for task in self._plan.routed_tasks():
                        self.route(form, task, args, kwargs)
                        self.route("per_row", task, args, kwargs)
                    self.serve_rows_of(args, kwargs)

    def prepare_autocast(self, dtype: torch.dtype) -> None:
        """Prepare the known calls under ``torch.autocast(dtype=dtype)`` too, now and after each train/eval switch."""
        if dtype not in self._autocast_dtypes:
            self._autocast_dtypes.append(dtype)
        self.prepare()

    def serve_rows_of(self, args: tuple, kwargs: dict) -> None:
        """Let a batch of one use the graphs of the call ``(args, kwargs)``, whose batch is symbolic.

        Export specialises size-1 axes, so one row of a prepared call has a
        structure of its own, and under torch.compile a structure first seen
        would be captured through a graph break (``fullgraph=True`` fails).
        The prepared graph takes one row as it is: it was traced with a
        symbolic batch (export assumes a graph traced at sizes >= 2 holds
        for size 1, as it does for any dynamic dimension), and it already
        serves groups of any size, 0 and 1 included, of a mixed batch split
        in a compiled graph. A batch whose first axis is not symbolic has
        nothing to lend.
        """
        key = self.structure(args, kwargs)
        analysed, batch_leaves = self.analysis(args, kwargs)
        hidden = user_inputs(analysed)[0]
        if not isinstance(hidden.meta["val"].shape[0], torch.SymInt):
            return
        leaves = _structure.tensors((args, kwargs))
        row = [leaf[:1] if follows_batch else leaf for leaf, follows_batch in zip(leaves, batch_leaves)]
        row_args, row_kwargs = _structure.replace((args, kwargs), row)
        row_key = self.own_structure(row_args, row_kwargs)
        if row_key != key and row_key not in self._analyses:
            self._row_of[row_key] = key

    def set_ratios(self, plan: BlockPlan) -> None:
        """Route with ``plan``'s ratios from now on (same tasks; called by ``modpass.set_ratios``).

        The capacity then reaches the routed graph as an input, computed from
        tensor sizes that Dynamo makes symbolic, so a compiled model
        recompiles once for the first change and then only for k == T.
        """
        self.adopt_plan(plan)
        reference = next(self.parameters(), None)
        self.carry_ratios(reference.device if reference is not None else torch.device("cpu"))
        self.prepare()

    def carry_ratios(self, device: torch.device) -> None:
        self.__dict__["_capacity_carriers"] = {
            task: capacity_carriers(ratio, device) for task, ratio in self._ratios.items() if ratio is not None
        }

    def _apply(self, fn, recurse=True):
        # Carriers follow .to(device) so that compiled graphs see no stray CPU inputs (CUDA graphs
        # skip those); they are rebuilt rather than converted, which would materialise their sizes.
        result = super()._apply(fn, recurse)
        if self._capacity_carriers is not None:
            self.carry_ratios(fn(torch.empty(())).device)
        self.follow_conversion(fn)
        return result

    def follow_conversion(self, fn) -> None:
        """Convert the known calls as the block's tensors were (``.to(device)``, ``.half()``) and prepare them.

        The block then receives calls of another dtype or device: new
        structures, which torch.compile would capture through graph breaks.
        Converting the recorded calls with the same function is a guess for
        side inputs (an fp32 mask that stays fp32 would be a new structure
        again, captured on first use), exact for the hidden state, and costs
        nothing when ``fn`` changes no structure.
        """
        if not self.converts_under(fn):
            return
        others = sum(block.converts_under(fn) for block in self._state.blocks if block is not self)
        self.__dict__["_examples"] = [_structure.replace(call, [fn(t) for t in _structure.tensors(call)]) for call in self._examples]
        self._state.switching.block_starts("to", pending=others + 1, stage="preparing the routed graphs for the converted calls")
        try:
            self.prepare()
        finally:
            self._state.switching.block_done()

    def converts_under(self, fn) -> bool:
        """Whether ``fn`` (a ``.to()``/``.half()`` conversion) changes the dtype or device type of a known call's tensors (their structure)."""
        for call in self._examples:
            for tensor in _structure.tensors(call):
                converted = fn(tensor.new_empty(0))
                if converted.dtype != tensor.dtype or converted.device.type != tensor.device.type:
                    return True
        return False


# Sizes 0 and 1 are always specialised by Dynamo; offsetting keeps a numerator of 1 symbolic.
CARRIER_OFFSET = 2


def checkpoint_reentrant(checkpoint, route, args: tuple, kwargs: dict):
    """``route(args, kwargs)`` through a reentrant checkpoint (``use_reentrant=True``, or a checkpoint function that
    does not say), which is an ``autograd.Function``: it tracks only tensors among its own arguments and results, not
    inside a tuple. So the positional arguments go in one by one (the hidden state first; tensors given by name get no
    gradient, as in transformers' own checkpointed layers), and the outputs and records come back as one flat tuple
    behind their structure."""

    def flat_route(*positional):
        leaves, structure = torch.utils._pytree.tree_flatten(route(positional, kwargs))
        return (structure, *leaves)

    structure, *leaves = checkpoint(flat_route, *args)
    return torch.utils._pytree.tree_unflatten(leaves, structure)


def capacity_carriers(ratio: Fraction, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ratio's numerator and denominator as the sizes of two storage-free tensors.

    Dynamo specialises Python ints read from modules or plain objects (a new
    value is a new graph every time) but treats tensor sizes as symbols once
    they are marked dynamic. The tensors are zero-stride views of one
    element, so a denominator of 10**12 costs nothing.
    """
    carriers = tuple(torch.empty((), device=device).expand(n + CARRIER_OFFSET) for n in (ratio.numerator, ratio.denominator))
    for carrier in carriers:
        torch._dynamo.maybe_mark_dynamic(carrier, 0)
    return carriers


def first_parameter_name(block: nn.Module) -> str | None:
    """The name of the first parameter of ``block.forward`` when a caller may pass it by name."""
    try:
        parameters = list(inspect.signature(block.forward).parameters.values())
    except (TypeError, ValueError):  # a forward without a signature (a builtin)
        return None
    first = parameters[0] if parameters else None
    return first.name if first is not None and first.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD else None


def copy_graph_module(gm: torch.fx.GraphModule, *, where: str | None = None) -> torch.fx.GraphModule:
    """A copy of ``gm`` to change; ``where`` names the block it is for in messages (an analysed capture may be another
    block's, see :mod:`modpass.capture_sharing`)."""
    copied = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    copied.meta.update(gm.meta)
    if where is not None:
        copied.meta["modpass_where"] = where
    return copied
