"""``RoutedBlock``: the module that replaces a routed transformer block.

It keeps the original block's submodules, parameters and buffers under their
original names (so the model's ``state_dict`` is unchanged apart from the
routers) and adds ``mod_routers.<task>`` (``Linear(D, 1)``, zero-initialised).

Its forward runs the routed FX graph that ``pipeline.BLOCK_STAGES`` build from
the original block. Graphs are cached per call structure (train/eval mode,
which arguments are tensors or None, dtypes, devices, size-1 axes and the
values of flags), because export bakes those in; a new structure is captured
on first use, in about a second.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import RoutingInputError
from .plan import BlockPlan
from .routing import capacity
from .tasks import RoutingState, TaskGroup

_CONSTANT_LEAVES = (type(None), bool, int, float, str, torch.dtype, torch.device)


@dataclass
class CapturedBlock:
    """A block graph annotated with token axes, before routing is inserted."""

    graph_module: torch.fx.GraphModule
    batch_leaves: tuple[bool, ...]


@dataclass
class RoutingRecord:
    """What one routed call decided, for auxiliary losses and inspection."""

    task: str
    logits: torch.Tensor
    index: torch.Tensor
    rows: torch.Tensor | None
    route_mask: torch.Tensor | None = None


class RoutedBlock(nn.Module):
    def __init__(self, block: nn.Module, plan: BlockPlan, *, gate: str, state: RoutingState):
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
        self.mod_routers = nn.ModuleDict({task: nn.Linear(plan.hidden_size, 1, **factory) for task in plan.routed_tasks()})
        for router in self.mod_routers.values():
            nn.init.zeros_(router.weight)
            nn.init.zeros_(router.bias)
        self.training = block.training
        self.__dict__["_block"] = block
        self.__dict__["_plan"] = plan
        self.__dict__["_gate"] = gate
        self.__dict__["_state"] = state
        self.__dict__["_captures"] = {}
        self.__dict__["_routes"] = {}
        self.__dict__["last_routing"] = []

    # -- module plumbing ---------------------------------------------------------------------------
    @property
    def plan(self) -> BlockPlan:
        return self._plan

    def train(self, mode: bool = True):
        self._block.training = mode
        return super().train(mode)

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_captures"], state["_routes"], state["last_routing"] = {}, {}, []
        return state

    def extra_repr(self) -> str:
        ratios = {t: (None if r is None else float(r)) for t, r in self._plan.ratios.items()}
        return f"block={type(self._block).__name__}, ratios={ratios}, gate={self._gate!r}"

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if not args or not isinstance(args[0], torch.Tensor):
            raise RoutingInputError(f"{self._plan.path}: a routed block takes the hidden state as its first positional argument.")
        if self._state.dense:
            return self._block(*args, **kwargs)
        hidden = args[0]
        groups = self.split_by_capacity(self._state.groups(hidden.shape[0]), hidden)
        self.last_routing = []
        if len(groups) == 1 and groups[0].rows is None:
            return self._run_group(groups[0], args, kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        batch_leaves = self.capture(args, kwargs).batch_leaves
        result, out_spec = None, None
        for group in groups:
            rows = group.rows.to(hidden.device)
            sub = [leaf.index_select(0, rows) if is_batch else leaf for leaf, is_batch in zip(tensor_leaves(leaves), batch_leaves)]
            sub_args, sub_kwargs = pytree.tree_unflatten(replace_tensors(leaves, sub), spec)
            flat_out, out_spec = pytree.tree_flatten(self._run_group(group, sub_args, sub_kwargs))
            if result is None:
                result = [hidden.new_empty(hidden.shape), *flat_out[1:]]
            result[0] = result[0].index_copy(0, rows, flat_out[0])
        return pytree.tree_unflatten(result, out_spec)

    def split_by_capacity(self, groups: list[TaskGroup], hidden: torch.Tensor) -> list[TaskGroup]:
        """Under a route mask, split each routed task group into rows of equal capacity.

        Tokens outside the mask are always processed, so a row's capacity is
        ``#outside + ceil(ratio * #inside)``; rows of one group must share it
        to be gathered into one tensor.
        """
        mask = self._state.route_mask
        if mask is None:
            return groups
        batch, tokens = hidden.shape[:2]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, tokens):
            got = f"dtype {mask.dtype}, shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise RoutingInputError(
                f"{self._plan.path}: route_mask must be a bool tensor of shape (batch, tokens) = {(batch, tokens)}, got {got}."
            )
        routable = mask.sum(1).tolist()
        refined = []
        for group in groups:
            ratio = self._plan.ratios.get(group.task)
            rows = list(range(batch)) if group.rows is None else group.rows.tolist()
            if ratio is None:
                refined.append(group)
                continue
            by_capacity: dict[int, list[int]] = {}
            for row in rows:
                n = routable[row]
                k = tokens - n + (capacity(n, ratio.numerator, ratio.denominator) if n else 0)
                by_capacity.setdefault(k, []).append(row)
            for k, members in by_capacity.items():
                whole = group.rows is None and len(by_capacity) == 1
                refined.append(TaskGroup(group.task, None if whole else torch.tensor(members, dtype=torch.long), k))
        return refined

    def _run_group(self, group: TaskGroup, args: tuple, kwargs: dict):
        ratio = self._plan.ratios.get(group.task)
        if ratio is None:
            return self._block(*args, **kwargs)
        explicit = group.capacity is not None
        graph = self.routed_graph(group.task, ratio, args, kwargs, explicit_capacity=explicit)
        leaves, _ = pytree.tree_flatten((args, kwargs))
        inputs = self.resolve_inputs(graph, group, tensor_leaves(leaves), args[0].device)
        *outputs, logits, index = graph(*inputs)
        self.last_routing.append(RoutingRecord(group.task, logits, index, group.rows, self.group_route_mask(group)))
        return pytree.tree_unflatten(outputs, graph.meta["modpass_out_spec"])

    def group_route_mask(self, group: TaskGroup) -> torch.Tensor | None:
        mask = self._state.route_mask
        if mask is None or group.capacity is None:
            return None
        return mask if group.rows is None else mask.index_select(0, group.rows.to(mask.device))

    def resolve_inputs(self, graph: torch.fx.GraphModule, group: TaskGroup, tensors: list, device) -> list:
        router = self.mod_routers[group.task]
        constants = graph.meta["modpass_constants"]
        resolved = []
        for role, target in graph.meta["modpass_inputs"]:
            if role == "input":
                resolved.append(tensors[target])
            elif role == "parameter":
                resolved.append(self.get_parameter(target))
            elif role == "buffer":
                resolved.append(self.get_buffer(target))
            elif role == "constant":
                resolved.append(constants[target].to(device))
            elif role == "capacity":
                resolved.append(group.capacity)
            elif role == "route_mask":
                resolved.append(self.group_route_mask(group))
            else:
                resolved.append(getattr(router, target))
        return resolved

    # -- capture and rewrite ----------------------------------------------------------------------
    def structure_key(self, args: tuple, kwargs: dict):
        with_paths, spec = pytree.tree_flatten_with_path((args, kwargs))
        signature = []
        for path, leaf in with_paths:
            if isinstance(leaf, torch.Tensor):
                signature.append((leaf.dtype, leaf.device.type, tuple(s == 1 for s in leaf.shape)))
            elif isinstance(leaf, _CONSTANT_LEAVES):
                signature.append((type(leaf), leaf))
            else:
                name = pytree.keystr(path)
                raise RoutingInputError(
                    f"{self._plan.path}: argument {name} is a {type(leaf).__name__}; routed blocks take tensors and "
                    "plain flags only. A KV cache cannot be shared by routed blocks yet: call the model with "
                    "use_cache=False (generation through routed blocks is not supported)."
                )
        return (self.training, spec, tuple(signature))

    def capture(self, args: tuple, kwargs: dict) -> CapturedBlock:
        from .pipeline import capture_block_graph

        key = self.structure_key(args, kwargs)
        captured = self._captures.get(key)
        if captured is None:
            self._block.training = self.training
            gm = capture_block_graph(self._block, args, kwargs, where=f"block {self._plan.index} ({self._plan.path})")
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            batch = tuple(
                p.meta["modpass_batch_axis"] == 0 for p, (role, _) in zip(placeholders, gm.meta["modpass_inputs"]) if role == "input"
            )
            captured = self._captures[key] = CapturedBlock(gm, batch)
        return captured

    def routed_graph(
        self, task: str, ratio: Fraction, args: tuple, kwargs: dict, *, explicit_capacity: bool = False
    ) -> torch.fx.GraphModule:
        from .pipeline import route_block_graph

        key = (task, explicit_capacity, self.structure_key(args, kwargs))
        graph = self._routes.get(key)
        if graph is None:
            captured = self.capture(args, kwargs)
            graph = self._routes[key] = route_block_graph(
                copy_graph_module(captured.graph_module), ratio=ratio, gate=self._gate, explicit_capacity=explicit_capacity
            )
        return graph


def tensor_leaves(leaves: list) -> list[torch.Tensor]:
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def replace_tensors(leaves: list, tensors: list) -> list:
    it = iter(tensors)
    return [next(it) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    copied = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    copied.meta.update(gm.meta)
    return copied
