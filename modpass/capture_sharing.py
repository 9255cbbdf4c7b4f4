"""One block capture shared by the routed blocks that trace alike.

A model's layers are mostly one class built again with weights of the same shapes, and capturing each one
(``torch.export``, about a second, and twice for most blocks: the eager call and the traced one) was most of
``transform``'s time. What a capture depends on, besides the call's structure (the key it is cached under):

- the block's module tree: classes, train/eval flags, which parameters, buffers and children each part has, and the
  weights that forward pre-hooks set (a capture takes those anew at each call);
- its tensors' metadata, not their values: export traces fake tensors;
- the Python values its forward reads on the block's modules: a scale, a sliding window, a layer index where the
  code uses it (GPT-2's ``scale_attn_by_inverse_layer_idx`` divides by ``layer_idx + 1``).

The capture watches which attributes the forward reads (:class:`~modpass._export.AttributeReads`), and
:class:`TraceDependencies` keeps what they held then. A block whose tree, tensors and those values are the same now
takes that capture instead of exporting its own. Plain values (numbers, strings, dtypes, devices, None) and tuples,
lists, dicts and sets of them are compared by value, as they were at capture time; any other object (a config, a
function, a tensor attribute) by identity, so a layer with its own copy captures anew.

Not seen: what a forward reaches without reading an attribute of one of the block's modules the usual way (a global
table, the module's ``id``, ``object.__getattribute__(self, name)``), and a change, after the capture, inside an
object compared by identity. modpass watches the changes of that kind that a capture bakes in (a config's attention
implementation, adapters' state): they make the blocks capture again, which empties the shared captures
(``RoutedBlock.recapture``). A block with a parameter or buffer of a tensor subclass (a quantised weight, whose trace
depends on what it holds inside) shares no capture.

The compile backend's routing options (:mod:`modpass.graph_routing`) capture regions of Dynamo's graph instead of
modules. A region reads its weights as inputs, so it is all in its code: regions whose graphs match node for node,
names aside, on inputs of the same metadata share one capture (:class:`RegionCaptures`): the alike blocks of one graph,
the same graph traced again when Dynamo restarts a frame's analysis (it does when a float input cannot stay
symbolic), and the graphs of later recompiles.
"""

from __future__ import annotations

import functools
import operator
from collections import OrderedDict
from dataclasses import dataclass

import sympy
import torch
from torch._subclasses import FakeTensor

from ._export import CALL_HOOKS, MODULE_BOOKKEEPING, PLAIN_VALUES, set_weight_name


class _Same:
    """An object compared by identity, held so that its ``id`` is not reused."""

    __slots__ = ("value",)

    def __init__(self, value: object):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


#: What an attribute a forward read holds when it is not in the module's ``__dict__`` (a method, a class attribute, a
#: parameter): the same for every block of the class, whose parameters, buffers and children are compared apart.
_ABSENT = object()


def frozen(value: object, within: frozenset[int] = frozenset()) -> object:
    """``value`` as blocks are compared on it: plain values, and tuples, lists, dicts and sets of them, by what they hold
    now; a ``functools.partial`` by its function (by identity) and arguments; a module outside the block's tree that
    holds no tensors and runs no hooks (transformers keeps one per layer for each function a kernel may replace) by its
    class, attributes and children; any other object by identity. ``within``: the ids of the containers and modules
    being frozen around it (one met again is compared by identity)."""
    kind = type(value)
    if kind is float:
        return kind, value.hex()  # tells 0.0 from -0.0 (1 / x tells them apart), and matches NaN with NaN
    if kind in PLAIN_VALUES:
        return kind, value
    if id(value) in within:
        return _Same(value)
    within = within | {id(value)}
    if kind in (tuple, list):
        return kind, tuple(frozen(item, within) for item in value)
    if kind is dict:
        return kind, tuple((frozen(key, within), frozen(item, within)) for key, item in value.items())
    if kind in (set, frozenset):
        return kind, frozenset(frozen(item, within) for item in value)
    if kind is functools.partial:
        return kind, frozen(value.func, within), frozen(value.args, within), frozen(value.keywords, within)
    if isinstance(value, torch.nn.Module) and stateless(value):
        return (kind, value.training, frozen({name: item for name, item in vars(value).items() if name not in MODULE_BOOKKEEPING}, within),
                tuple((name, frozen(child, within)) for name, child in value._modules.items()))
    return _Same(value)


def stateless(module: torch.nn.Module) -> bool:
    """Whether ``module`` and its submodules hold no parameters or buffers and carry no call hooks."""
    return not any(m._parameters or m._buffers or any(getattr(m, hooks, None) for hooks in CALL_HOOKS) for m in module.modules())


def module_layout(block: torch.nn.Module) -> tuple:
    """Per module of ``block`` (by path, repeats included): its class, the path it first appears under, its train/eval
    flag, the names of its parameters, buffers and children (and which are None), the weights its forward pre-hooks set,
    and whether it is compiled on its own (``module.compile()``)."""
    first_path: dict[int, str] = {}
    layout = []
    for path, module in block.named_modules(remove_duplicate=False):
        first = first_path.setdefault(id(module), path)
        layout.append((
            path, type(module), first, module.training,
            tuple((name, value is None) for name, value in module._parameters.items()),
            tuple((name, value is None) for name, value in module._buffers.items()),
            tuple((name, value is None) for name, value in module._modules.items()),
            tuple(set_weight_name(hook) for hook in module._forward_pre_hooks.values()),
            frozen(vars(module).get("_compiled_call_impl")),
        ))
    return tuple(layout)


def tensor_layout(block: torch.nn.Module) -> tuple | None:
    """Per parameter and buffer of ``block`` (repeats included): what a trace reads of it (class, dtype, device, shape,
    strides, ``requires_grad``, the Python attributes it carries) and the name it first appears under. None where one
    is of a tensor subclass, whose trace also depends on what it holds inside."""
    first_name: dict[int, str] = {}
    layout = []
    for name, tensor in (*block.named_parameters(remove_duplicate=False), *block.named_buffers(remove_duplicate=False)):
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            return None
        layout.append((name, first_name.setdefault(id(tensor), name), type(tensor), tensor.dtype, tensor.device,
                       tuple(tensor.shape), tensor.stride(), tensor.requires_grad, frozen(vars(tensor))))
    return tuple(layout)


def attribute_value(module: torch.nn.Module, name: str) -> object:
    if name == "__dict__":  # read as a whole: the names it holds (each one's value is compared too)
        return frozenset(vars(module).keys() - MODULE_BOOKKEEPING)
    return vars(module).get(name, _ABSENT)


@dataclass(frozen=True)
class TraceDependencies:
    """What one block's capture depended on besides its call's structure (see the module docstring)."""

    modules: tuple
    tensors: tuple
    #: ``((module path, attribute name), frozen value)`` for each attribute the capture read.
    values: tuple

    @classmethod
    def of(cls, block: torch.nn.Module, reads: dict[str, frozenset[str]] | None) -> TraceDependencies | None:
        """What the capture of ``block`` that read ``reads`` (by module path, see :class:`~modpass._export.AttributeReads`)
        depended on, taken now; None where it cannot be told (reads not watched, a tensor subclass)."""
        tensors = tensor_layout(block)
        if reads is None or tensors is None:
            return None
        modules = dict(block.named_modules(remove_duplicate=False))
        keys = sorted({(path, name) for path, names in reads.items()
                       for name in (names | vars(modules[path]).keys() if "__dict__" in names else names)
                       if name not in MODULE_BOOKKEEPING})
        return cls(module_layout(block), tensors, tuple(((path, name), frozen(attribute_value(modules[path], name))) for path, name in keys))

    def hold_for(self, block: torch.nn.Module) -> bool:
        """Whether capturing ``block`` now would trace what the capture did: its tree and tensors as the captured
        block's were, and each attribute the capture read holding what it held then."""
        if module_layout(block) != self.modules or tensor_layout(block) != self.tensors:
            return False
        modules = dict(block.named_modules(remove_duplicate=False))
        return all(frozen(attribute_value(modules[path], name)) == value for (path, name), value in self.values)


class SharedCaptures:
    """The analysed captures of one model's routed blocks (``meta["modpass_trace_dependencies"]`` set), by call
    structure: a block whose call has a structure captured for another block that traced alike takes that capture."""

    def __init__(self):
        self.by_structure: dict[tuple, list[torch.fx.GraphModule]] = {}

    def find(self, structure: tuple, block: torch.nn.Module) -> torch.fx.GraphModule | None:
        return next((gm for gm in self.by_structure.get(structure, ())
                     if gm.meta["modpass_trace_dependencies"].hold_for(block)), None)

    def add(self, structure: tuple, gm: torch.fx.GraphModule) -> None:
        if gm.meta.get("modpass_trace_dependencies") is not None:
            self.by_structure.setdefault(structure, []).append(gm)

    def clear(self) -> None:
        self.by_structure.clear()


class _Position(int):
    """A node argument, by the position of the node in its graph."""


def graph_structure(gm: torch.fx.GraphModule) -> tuple | None:
    """What a self-contained graph computes, with its node names left out: per node its kind, target and arguments
    (nodes by position in the graph's order, but for arithmetic on constants, which is placed right before its first
    use; floats by their bits, other plain values by value, anything else by identity); per input its
    fake tensor's class, dtype, device, sizes, strides and ``requires_grad``, symbolic sizes renamed in order of first
    appearance and given with their example values. None where the graph reads its module (``get_attr``,
    ``call_module``: contents not compared) or an input is not a fake tensor."""
    positions: dict[torch.fx.Node, _Position] = {}
    symbols: dict[sympy.Symbol, sympy.Symbol] = {}
    structure = []
    for node in _in_canonical_order(gm.graph):
        positions[node] = _Position(len(positions))
        if node.op in ("get_attr", "call_module"):
            return None
        if node.op == "placeholder":
            value = node.meta.get("val")
            if type(value) is not FakeTensor:
                return None
            structure.append((type(value), value.dtype, value.device, value.requires_grad,
                              tuple(_size(size, symbols) for size in value.shape),
                              tuple(_size(stride, symbols) for stride in value.stride())))
        else:
            arguments = torch.fx.node.map_arg((node.args, node.kwargs), positions.__getitem__)
            structure.append((node.op, _literal(node.target), _literal(arguments)))
    return tuple(structure)


#: Arithmetic on plain numbers, besides the ``math`` module's functions: Python's operators and torch's symbolic
#: forms of ``math`` (the ones that constrain nothing).
PURE_ARITHMETIC = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.neg, operator.pos, operator.abs, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    *filter(None, (getattr(torch, name, None) for name in (
        "sym_float", "sym_int", "sym_ite", "sym_max", "sym_min", "sym_not", "sym_sqrt", "sym_sum", "_sym_sqrt", "_sym_cos",
        "_sym_sin", "_sym_tan", "_sym_cosh", "_sym_sinh", "_sym_tanh", "_sym_acos", "_sym_asin", "_sym_atan", "_sym_log2"))),
})


def _in_canonical_order(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The graph's nodes, with arithmetic on constants (no tensor behind it) right before its first use: it can run
    anywhere before then, and where a graph has it varies (Dynamo traces a float global such as ``math.pi`` once per
    graph, and :func:`~modpass.graph_routing.unshare_scalar_arithmetic` gives each later block a copy where it uses
    it). Such arithmetic that nothing uses is left out."""
    movable: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if (node.op == "call_function" and (node.target in PURE_ARITHMETIC or getattr(node.target, "__module__", None) == "math")
                and all(argument in movable for argument in node.all_input_nodes)):
            movable.add(node)
    order: dict[torch.fx.Node, None] = {}

    def place(node: torch.fx.Node) -> None:
        for argument in node.all_input_nodes:
            if argument in movable and argument not in order:
                place(argument)
        order[node] = None

    for node in graph.nodes:
        if node not in movable:
            place(node)
    return list(order)


def _size(size: int | torch.SymInt, symbols: dict[sympy.Symbol, sympy.Symbol]) -> object:
    if not isinstance(size, torch.SymInt):
        return int(size)
    expr = size.node.expr
    for symbol in sorted(expr.free_symbols, key=str):  # s12 and u3 become s_0 and u_1: Dynamo numbers them per trace
        symbols.setdefault(symbol, sympy.Symbol(f"{str(symbol).rstrip('0123456789')}_{len(symbols)}"))
    return str(expr.xreplace(symbols)), size.node.hint


def _literal(value: object) -> object:
    kind = type(value)
    if kind is _Position:
        return kind, int(value)
    if kind is float:
        return kind, value.hex()
    if kind in PLAIN_VALUES:
        return kind, value
    if kind is slice:
        return kind, _literal(value.start), _literal(value.stop), _literal(value.step)
    if isinstance(value, (tuple, list)):  # torch.fx's immutable lists and named tuples too
        return kind, tuple(_literal(item) for item in value)
    if isinstance(value, dict):
        return kind, tuple((_literal(key), _literal(item)) for key, item in value.items())
    return _Same(value)


class RegionCaptures:
    """Analysed captures of regions of Dynamo's graphs by what they compute (a :func:`graph_structure` and whatever
    else the analysis reads, see :func:`modpass.graph_routing.region_key`), the ``limit`` used most recently."""

    def __init__(self, limit: int = 16):
        self.limit = limit
        self.by_key: OrderedDict[tuple, torch.fx.GraphModule] = OrderedDict()

    def find(self, key: tuple | None) -> torch.fx.GraphModule | None:
        if key is None or key not in self.by_key:
            return None
        self.by_key.move_to_end(key)
        return self.by_key[key]

    def add(self, key: tuple | None, gm: torch.fx.GraphModule) -> None:
        if key is None:
            return
        self.by_key[key] = gm
        while len(self.by_key) > self.limit:
            self.by_key.popitem(last=False)
