"""Block stage 4, ``token_mixing``: refuse blocks that mix tokens outside attention.

Expects: a graph annotated by ``token_axes`` (``meta["modpass_token_symbol"]``)
whose nodes carry ``val`` metadata.
Guarantees: the graph is unchanged and every op that combines values from
different token positions is attention-like, so running the block on a subset
of tokens is the MoD semantics; otherwise ``UnroutableBlockError`` lists each
offending op with the source line that created it.
``gm.meta["modpass_batch_mixing"]`` lists where the block combines different
sequences of the batch (the same rules, read along the batch axis). Such a
block cannot run a mixed-task batch, which it would see one task's rows at a
time; that is refused when it happens, since one task per batch is fine.

A tensor *carries tokens* along the axes whose size mentions ``T``. An op
mixes tokens when it combines positions along such an axis:

* attention kernels (``scaled_dot_product_attention`` and its fused variants)
  and products of two token-carrying tensors contracted over ``T`` (scores
  times values) are attention: allowed;
* an einsum that sums over a token axis only one of its operands carries
  (``"btd->bd"``) pools tokens, like a reduction;
* reductions and softmax over a token axis are allowed only on tensors with
  two token axes (attention scores); on a plain sequence they pool tokens;
* any other op whose ``dim``/``dims`` argument names a token axis (cat, split,
  roll, flip, cumsum, sort, select, gather, unflatten...) mixes or shifts tokens;
  a slice along a token axis is allowed only when it keeps the whole axis;
* resampling a fixed-size tensor (a position table) to the token count, or
  reading it there with ``as_strided``, gives rows of slots, not positions;
* convolutions, pooling, resampling, padding, and normalisations whose
  statistics span a token axis (layer norm over T, group norm, batch norm in
  training or without running statistics) mix tokens;
* ``tril``/``triu``, ``diagonal`` and ``eye`` relate an index along one axis to
  an index along another: over two token axes they may only compare order
  (a causal mask, a token with itself), which the gather, in position order,
  keeps; a distance (a sliding window, ``diagonal=-3``) or a token index
  against a feature index counts slots, not positions;
* indexing *into* a token axis, to read or to write (``y[:, idx] = v``),
  mixes tokens (indexing with token-indexed positions, like a rotary lookup,
  does not, nor does writing where a per-token mask says);
* an op's axis is read with its default (``x.sort()`` sorts along the last axis), and an op with no
  axis to name whose result keeps no token axis (a global median, a histogram, a loss) reduced
  the tokens away;
* data-dependent ops (nonzero, unique, masked_select, masked_scatter) and flat indexing (take, put)
  on tokens are refused;
* ops outside aten (custom ops: a fused kernel, ``flash_attn``'s) on tokens are refused, since modpass
  cannot read what they compute, unless declared position-wise (``POSITION_WISE_OPS``,
  ``modpass.declare_position_wise``); torchao's quantization ops are read by their ``block_size``;
* code the block runs under ``torch.no_grad()`` or ``torch.autocast``, which export keeps as a
  subgraph, is read in line (:func:`modpass._subgraphs.inlined`); other higher-order ops on tokens
  (``cond``, ``while_loop``, ``flex_attention``) are refused, their subgraphs unread;
* ``repeat_interleave`` by a fixed count copies each token in place (an MoE's
  token-per-expert rows) and is position-wise;
* a block that numbers its tokens itself (``arange`` over ``T``) would number
  the k routed tokens ``0..k-1``: allowed only where positions are compared
  with positions (a causal mask), which the gather, in position order, keeps;
  likewise a pattern it makes over ``T`` from sizes alone (``ones``, ``eye``, a
  mask) may be compared and applied, but not summed or multiplied along a
  token axis (``ones(T, T).tril().sum(-1)`` numbers the tokens,
  ``ones(B, 1, T) @ x`` pools them);
* a block that computes with the token count as a number (``x / T``, a
  ``T ** -0.5`` or ``log T`` scale, ``full_like(x, T)``) would compute with
  ``k``; the count may size tensors (views, expands, slice bounds), nothing more;
* attention whose queries run along the batch axis rather than ``T`` belongs to
  a sequence-first ``(T, B, D)`` block, whose ``T`` here is its batch: an
  attention kernel's, or a product of two activations (``bmm``, ``matmul``,
  ``baddbmm``, ``einsum``) pairing rows along the batch axis, as attention
  written by hand does, or summing over it (linear attention's keys times
  values); likewise a reduction or scan along the batch axis that keeps the
  token axis (a running key-value sum, ``x - x.mean(0)``) relates position j of
  one row to position j of another, which routing fills with other tokens.

Everything else (pointwise math, views, linear layers over features,
feature-wise norms, batch norm in eval) is position-wise, provided each token's position stays
one coordinate of one axis. Shapes alone do not show that once a view merges
the token axis with others: ``(B, T, D)`` viewed as ``(T, B, D)`` or
``(D, B*T)`` keeps sizes that mention ``T`` while spreading a token's values
over rows of other tokens. So ``token_layouts`` follows each merged axis
through the graph: an axis of size ``a*T*b`` holds token ``t`` at
``(i*T + t)*b + j``; a view must keep that factor ``T`` whole inside one
output axis, and an op must not combine two axes of one size laid out
differently (``(B*T)`` against ``(T*B)``).
"""

from __future__ import annotations

import inspect
import operator
import os
from collections import Counter
from typing import NamedTuple

import sympy
import torch

from .._subgraphs import inlined, is_higher_order
from ..errors import UnroutableBlockError
from .token_axes import mentions, size_expr

ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")
CONTRACTIONS = {"matmul", "bmm", "mm", "baddbmm", "addmm", "addbmm", "einsum", "linear"}
REDUCTIONS = {
    "sum", "mean", "amax", "amin", "max", "min", "logsumexp", "softmax", "_softmax", "log_softmax",
    "_log_softmax", "_safe_softmax", "var", "std", "var_mean", "std_mean", "norm", "linalg_vector_norm",
    "prod", "argmax", "argmin", "all", "any", "count_nonzero",
}
_AXIS_ONLY = {"unsqueeze", "squeeze", "transpose", "permute", "movedim", "stack", "sym_size", "sym_stride", "size", "stride"}
_CONVOLUTIONS = {"convolution", "conv1d", "conv2d", "conv3d", "_convolution", "conv_transpose1d"}
_SPANNING_NORMS = {"group_norm", "native_group_norm", "instance_norm"}
#: Batch norms, read by their ``training`` flag: with it, statistics over the batch and its tokens; without it (eval,
#: running statistics kept), a scale and shift per channel, so each token's values are its own.
_BATCH_NORMS = {"batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
                "_native_batch_norm_legit_no_training", "cudnn_batch_norm", "miopen_batch_norm"}
_DATA_DEPENDENT = {"nonzero", "unique", "_unique2", "unique_consecutive", "masked_select", "masked_scatter"}
_INDEXED_WRITES = {"index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"}
#: Ops that index a tensor as if flattened: an element's flat index runs across tokens.
_FLAT_INDEXING = {"take", "put", "put_"}
_SCANS = {"cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"}
_PADS = {"constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "replication_pad2d"}
_INT_MAX = 2**63 - 1
_COMPARISONS = {"ge", "gt", "le", "lt", "eq", "ne"}
_MAKES_POSITIONS = {"arange", "linspace", "logspace"}
#: Ops whose values come from their arguments' sizes and constants alone (with ``*_like`` and ``new_*``).
_FACTORIES = {"ones", "zeros", "full", "empty", "empty_strided", "eye", "scalar_tensor"}
_VIEWS = {"view", "_unsafe_view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
_KEEPS_VALUES = _VIEWS | {"unsqueeze", "squeeze", "expand", "slice", "to", "_to_copy", "clone", "contiguous", "transpose", "permute",
                          "alias", "lift_fresh_copy", "detach"}


def token_dims(value, symbol) -> list[int]:
    if not isinstance(value, torch.fx.Node) or not isinstance(value.meta.get("val"), torch.Tensor):
        return []
    return token_dims_of_value(value.meta["val"], symbol)


def token_dims_of_value(value: torch.Tensor, symbol) -> list[int]:
    return [d for d, s in enumerate(value.shape) if mentions(s, symbol)]


def named_arguments(node: torch.fx.Node) -> dict:
    """A call's arguments by name, defaults included (``x.sort()`` sorts along ``dim=-1``): an op's by its schema, a
    Python function's by its signature."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    named = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    named.update({a.name: v for a, v in zip(schema.arguments, node.args)})
    named.update(node.kwargs)
    return named


def normalise(dims, rank: int) -> list[int]:
    if dims is None:
        return list(range(rank))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return [d % rank for d in dims] if dims else list(range(rank))


def aten_name(node: torch.fx.Node) -> str | None:
    """The op's name without its overload (``"slice"`` for ``aten.slice.Tensor``), or None for anything else."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return node.target.overloadpacket.__name__
    return None


def copies_tokens(args: dict) -> bool:
    """``repeat_interleave`` by a fixed count along one axis: each row becomes that many copies of itself, in place."""
    return isinstance(args.get("repeats"), int) and args.get("dim") is not None


#: Ops outside aten that modpass has read, each computing a token's values from that token's alone: a tensor
#: subclass's parts (torchao's quantized weights), transformers' grouped expert products (rows sorted by expert),
#: torchao's float8 casts by a given scale. ``modpass.declare_position_wise`` adds to them.
POSITION_WISE_OPS = {
    "export::access_subclass_inner_tensor",
    "transformers::grouped_mm_fallback",
    "torchao::quantize_affine_float8_non_decomposed",
    "torchao::dequantize_affine_float8_non_decomposed",
}


def qualified_op_name(op):
    """``"namespace::name"`` of an op (``torch.ops.mylib.norm`` or one of its overloads); anything else as it is."""
    packet = op.overloadpacket if isinstance(op, torch._ops.OpOverload) else op
    return getattr(packet, "_qualified_op_name", op)


def outside_aten_reason(node: torch.fx.Node, source, dims: list[int], args: dict) -> str | None:
    """Why an op outside aten mixes tokens, or None: a declared position-wise op, or a quantization op whose
    ``block_size`` (torchao's) keeps each token in blocks of its own."""
    op = qualified_op_name(node.target)
    if op in POSITION_WISE_OPS:
        return None
    block_size = args.get("block_size")
    if isinstance(block_size, (list, tuple)) and dims and len(block_size) == source.meta["val"].dim():
        if all(block_size[d] == 1 for d in dims):
            return None
        return f"quantizes with parameters shared across tokens (block_size={list(block_size)})"
    return (f"runs {op}, an op modpass cannot read, on tokens; if it computes each token's values from that token's "
            f"alone (a fused norm or MLP), declare it: modpass.declare_position_wise({op!r})")


class RowWindow(NamedTuple):
    """``T`` consecutive rows of ``source`` along ``axis``, from row ``start`` (a constant)."""

    source: torch.fx.Node
    axis: int
    start: int


def window_of_rows(node: torch.fx.Node, symbol) -> RowWindow | None:
    """Where ``node`` cuts ``T`` consecutive rows from a constant start off its source (``source[:T]``,
    ``source[1 : T + 1]``, ``source.narrow(axis, s, T)``), that window, else None."""
    if node.op != "call_function" or node.target not in (torch.ops.aten.slice.Tensor, torch.ops.aten.narrow.default):
        return None
    args = named_arguments(node)
    source, start = args.get("self"), args.get("start") or 0
    if node.target is torch.ops.aten.slice.Tensor:
        end, step = args.get("end"), args.get("step", 1)
    else:
        end, step = args.get("length"), 1
    end = end.meta.get("val") if isinstance(end, torch.fx.Node) else end
    if not isinstance(source, torch.fx.Node) or not isinstance(start, int) or start < 0 or step != 1:
        return None
    if not isinstance(end, torch.SymInt):
        return None
    length = size_expr(end) - (start if node.target is torch.ops.aten.slice.Tensor else 0)
    return RowWindow(source, args["dim"] % source.meta["val"].dim(), start) if length == symbol else None


def mixing_reason(node: torch.fx.Node, symbol) -> str | None:
    """Why ``node`` mixes tokens, or None when it is position-wise or attention."""
    name = aten_name(node)
    carries_tokens = any(token_dims(value, symbol) for value in node.all_input_nodes)
    if is_higher_order(node) and carries_tokens:
        return f"runs {node.target.__name__}, a higher-order op whose subgraphs modpass does not read, on tokens"
    if name is None:
        return None
    args = named_arguments(node)
    source = args.get("self", args.get("input", node.args[0] if node.args else None))
    if isinstance(source, (list, tuple)):
        source = source[0] if source else None
    dims = token_dims(source, symbol)
    rank = source.meta["val"].dim() if dims else 0
    if node.target.namespace not in ("aten", "prims") and carries_tokens:
        return outside_aten_reason(node, source, dims, args)
    if any(key in name for key in ATTENTION):
        return causal_attention_reason(args, symbol)
    if name in CONTRACTIONS:
        if name == "linear" and dims and rank - 1 in dims:
            return "applies a linear layer across the token axis"
        if name == "einsum":
            return einsum_reason(args["equation"], args["tensors"], symbol)
        return None
    if name in _DATA_DEPENDENT and dims:
        return "selects tokens depending on their values"
    if name in _FLAT_INDEXING and dims:
        return "indexes the tensor flattened, across its tokens"
    if name in _CONVOLUTIONS and any(d >= 2 for d in dims):
        return "convolves along the token axis"
    if _is_pooling(name) and set(dims) & set(range(rank - _spatial_rank(name), rank)):
        return "pools or resamples along the token axis"
    if name == "as_strided" and dims:
        return "reinterprets the memory of a token axis (as_strided)"
    if (_is_pooling(name) or name == "as_strided") and not dims and token_dims(node, symbol):
        return f"reads a fixed-size tensor at the token count ({name}): routed, it would read it for k tokens, not at the selected ones' positions"
    if (cut := window_of_rows(node, symbol)) is not None and not mentions(cut.source.meta["val"].shape[cut.axis], symbol):
        # A table the batch shares is read at the positions instead (token_tables); this one is the sequences'.
        return ("cuts an axis of another length (a mask's keys beyond the tokens, features) to the token count: routed, "
                "it would keep k entries in a row, not those at the selected tokens' positions; cut it outside the block")
    if name in _INDEX_RELATIONS:
        return index_relation_reason(name, args, node, dims, rank, symbol)
    if name in _PADS and dims:
        pads = list(args.get("pad", node.args[1]))
        padded = {rank - 1 - i // 2 for i, p in enumerate(pads) if p != 0}
        return "pads the token axis" if padded & set(dims) else None
    if name in {"layer_norm", "native_layer_norm"} and dims:
        normalized = range(rank - len(args["normalized_shape"]), rank)
        return "normalises across the token axis" if set(normalized) & set(dims) else None
    if name in _SPANNING_NORMS and dims:
        return "normalises with statistics over tokens"
    if name in _BATCH_NORMS and dims and args.get("training", False):
        return "normalises with statistics over tokens (batch norm in training; in eval it routes)"
    if name in _INDEXED_WRITES and dims:
        return "writes into the token axis at given indices" if set(indexed_axes(args["indices"])) & set(dims) else None
    if name == "index" and dims:
        indexed = [d for d, i in enumerate(args.get("indices", [])) if i is not None]
        return "indexes into the token axis" if set(indexed) & set(dims) else None
    if name == "embedding":
        return None
    if name == "repeat_interleave" and copies_tokens(args):
        return None
    if name in _AXIS_ONLY or name in _VIEWS or not dims:  # views: token_layouts follows the token's position
        return None
    dim_args = [args[k] for k in ("dim", "dims", "dimension") if k in args]
    if not dim_args and name not in REDUCTIONS:
        outputs = tensors_of(node)
        # Without an axis to name, an op whose result carries no token of its tokens reduced them all (a median, a
        # histogram, a loss); ``new_*`` factories read only the dtype and device.
        if outputs and not any(token_dims_of_value(t, symbol) for t in outputs) and not name.startswith("new_"):
            return f"reduces the token axis away ({name})"
        return None
    hit = set(dims) & set(normalise(dim_args[0] if dim_args else None, rank))
    if not hit:
        return None
    if name in REDUCTIONS:
        if name in {"max", "min"} and "other" in args:  # torch.max(a, b): elementwise
            return None
        return None if len(dims) >= 2 else f"reduces over the token axis ({name})"
    if name == "slice":
        start, end, step = args.get("start"), args.get("end"), args.get("step", 1)
        end = end.meta.get("val") if isinstance(end, torch.fx.Node) else end  # x[:, :T] ends at a size node
        dim = args["dim"] % rank
        whole = size_expr(source.meta["val"].shape[dim])
        keeps_all = start in (None, 0) and step == 1 and (end is None or end == _INT_MAX or size_expr(end) == whole)
        # Scores with extra keys appended after the tokens (see appends_extra_keys), cut back to the tokens.
        drops_extra_keys = len(dims) >= 2 and start in (None, 0) and step == 1 and size_expr(node.meta["val"].shape[dim]) == symbol
        if keeps_all or drops_extra_keys:
            return None
        if size_expr(source.meta["val"].shape[dim]) != symbol:  # tokens joined with other rows, T + S
            return "slices an axis holding the tokens and other rows (made by a concatenation: joint attention, register tokens)"
        return "slices the token axis (a token shift)"
    if name == "cat" and appends_extra_keys(args, symbol):
        return None
    return f"operates along the token axis ({name})"


def causal_attention_reason(args: dict, symbol) -> str | None:
    """Why an attention kernel's ``is_causal=True`` would pair the routed tokens wrong, or None. The kernel makes the
    mask from the sizes alone, query i seeing keys up to i: where queries and keys are the same tokens, gathered
    together in position order, that is the causal mask over their positions; where only one side is the tokens
    (causal attention to a memory of its own, kept whole), a routed query would see the keys up to its slot, not up
    to its position."""
    query, key = args.get("query"), args.get("key")
    if not args.get("is_causal") or not isinstance(query, torch.fx.Node) or not isinstance(key, torch.fx.Node):
        return None
    if mentions(query.meta["val"].shape[-2], symbol) == mentions(key.meta["val"].shape[-2], symbol):
        return None
    return ("attends causally (is_causal=True) between the tokens and keys or queries of another sequence: the "
            "kernel's mask would match a routed token with the others by its slot among the selected tokens, not by "
            "its position")


def indexed_axes(indices: list) -> list[int]:
    """The axes that integer indices pick along (``y[:, idx] = v``). A boolean mask picks along as many axes as it
    has, element by element (``y[mask] = v`` writes each token where its own mask says), so its axes are not listed."""
    axes, axis = [], 0
    for index in indices:
        if index is not None and index.meta["val"].dtype == torch.bool:
            axis += index.meta["val"].dim()
            continue
        if index is not None:
            axes.append(axis)
        axis += 1
    return axes


def einsum_labels(equation: str, ranks: list[int]) -> tuple[list[list[str]], set[str]]:
    """Each operand's label per axis, and the labels the output keeps. An ellipsis's axes are labelled by their place
    from the right (``...1`` last), as einsum aligns them; without ``->``, the output is einsum's implicit one."""
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")

    def labels(subscripts: str, rank: int) -> list[str]:
        before, ellipsis, after = subscripts.partition("...")
        covered = rank - len(before) - len(after) if ellipsis else 0
        return [*before, *(f"...{covered - i}" for i in range(covered)), *after]

    operands = [labels(subscripts, rank) for subscripts, rank in zip(inputs.split(","), ranks)]
    counts = Counter(label for axes in operands for label in axes)
    broadcast = {label for label in counts if label.startswith("...")}
    if arrow:
        return operands, set(output.replace("...", "")) | (broadcast if "..." in output else set())
    return operands, {label for label, n in counts.items() if n == 1} | broadcast


def einsum_reason(equation: str, tensors: list, symbol) -> str | None:
    """An einsum sums over a token axis that leaves the output: attention when another operand carries tokens along
    it too (scores times values), pooling when only one does (``"btd->bd"``)."""
    operands, output = einsum_labels(equation, [t.meta["val"].dim() for t in tensors])
    carriers = Counter(labels[d] for labels, t in zip(operands, tensors) for d in token_dims(t, symbol))
    pooled = [label for label, n in carriers.items() if n == 1 and label not in output]
    return f"reduces over the token axis (einsum {equation!r})" if pooled else None


def appends_extra_keys(args: dict, symbol) -> bool:
    """``cat([scores, sinks], -1)``: attention scores over the T keys, then columns that are no token's (GPT-OSS's
    per-head sink logit), which a softmax sees and a slice drops again. Each token's row keeps its own keys."""
    first, *extras = args["tensors"]
    rank = first.meta["val"].dim()
    dim = args.get("dim", 0) % rank
    return (len(token_dims(first, symbol)) >= 2 and size_expr(first.meta["val"].shape[dim]) == symbol
            and all(dim not in token_dims(extra, symbol) for extra in extras))


def _is_pooling(name: str) -> bool:
    return "pool" in name or name.startswith(("upsample", "_upsample")) or name in {"im2col", "col2im"}


def _spatial_rank(name: str) -> int:
    """How many trailing axes a pooling or resampling op works over: 1d, 2d or 3d (im2col: 2)."""
    return next((int(n) for n in "321" if f"{n}d" in name), 2 if name in {"im2col", "col2im"} else 1)


# For each op relating indices of two axes: the offsets (``diagonal=``/``offset=``) that compare
# only order; routed, slot order is position order, so those still hold on the k tokens.
_INDEX_RELATIONS = {"tril": (0, -1), "triu": (0, 1), "diagonal": (0,), "eye": ()}


def index_relation_reason(name: str, args: dict, node: torch.fx.Node, dims: list[int], rank: int, symbol) -> str | None:
    if name == "eye":  # eye(T) pairs each token with itself; eye(T, D) a token with a feature
        return "relates token indices to the indices of another axis (eye)" if len(token_dims(node, symbol)) == 1 else None
    axes = {args.get("dim1", 0) % rank, args.get("dim2", 1) % rank} if name == "diagonal" else {rank - 2, rank - 1}
    related = axes & set(dims)
    if not related:
        return None
    if len(related) == 1:
        return f"relates token indices to the indices of another axis (features, or a memory's keys) ({name})"
    offset = args.get("offset" if name == "diagonal" else "diagonal", 0)
    if offset in _INDEX_RELATIONS[name]:
        return None
    return f"relates tokens by their distance in the sequence ({name} with offset {offset}): routed, that counts slots, not positions"


Layout = dict  # a merged token size (sympy) -> the stride b of T inside an axis of that size


def divides(divisor, dividend) -> bool:
    """Whether ``divisor`` divides ``dividend`` for every value of the size symbols."""
    return sympy.fraction(sympy.cancel(sympy.sympify(dividend) / divisor))[1] == 1


def tensors_of(node) -> list[torch.Tensor]:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    values = val if isinstance(val, (list, tuple)) else [val]
    return [v for v in values if isinstance(v, torch.Tensor)]


def merged_sizes(node, symbol) -> set:
    return {size_expr(s) for t in tensors_of(node) for s in t.shape if mentions(s, symbol) and size_expr(s) != symbol}


def token_positions(shape, layout: Layout, symbol) -> list | str:
    """For each token factor ``T`` of ``shape``: the product of everything before it in row-major order."""
    positions, before = [], sympy.Integer(1)
    for size in map(size_expr, shape):
        if isinstance(size, int) or symbol not in size.free_symbols:
            before *= size
            continue
        inner = 1 if size == symbol else layout.get(size)
        outer = None if inner is None else sympy.cancel(size / (symbol * inner))
        if outer is None or not divides(1, outer) or symbol in outer.free_symbols:
            return f"reshapes a token axis of size {size} whose order of tokens modpass cannot follow"
        positions.append(before * outer)
        before *= size
    return positions


def follow_view(source: torch.Tensor, result: torch.Tensor, layout: Layout, symbol) -> Layout | str:
    """The layout of a view's result, or why it breaks a token's position apart."""
    positions = token_positions(source.shape, layout, symbol)
    if isinstance(positions, str):
        return positions
    sizes = [size_expr(s) for s in result.shape]
    prefix = [sympy.Integer(1)]
    for size in sizes:
        prefix.append(prefix[-1] * size)
    viewed: Layout = {}
    for before in positions:
        # The factor T lies whole in axis j when the axes before j split only what precedes T
        # and axis j ends no earlier than T does.
        axis = next((j for j in range(len(sizes)) if divides(prefix[j], before) and divides(before * symbol, prefix[j + 1])), None)
        if axis is None:
            return f"views {tuple(source.shape)} as {tuple(result.shape)}, which spreads one token's position over several axes"
        if sizes[axis] != symbol:
            inner = sympy.cancel(prefix[axis + 1] / (before * symbol))
            if viewed.setdefault(sizes[axis], inner) != inner:
                return f"views {tuple(source.shape)} as {tuple(result.shape)}, two axes of one size with tokens laid out differently"
    return viewed


def token_layouts(gm: torch.fx.GraphModule, symbol) -> list[tuple[torch.fx.Node, str]]:
    """Follow every merged token axis through the graph; the nodes that lose a token's position, and why."""
    layouts: dict[torch.fx.Node, Layout] = {}
    problems = []
    for node in gm.graph.nodes:
        name = aten_name(node)
        if name in _VIEWS and token_dims(node.args[0], symbol):
            viewed = follow_view(tensors_of(node.args[0])[0], tensors_of(node)[0], layouts.get(node.args[0], {}), symbol)
            if isinstance(viewed, str):
                problems.append((node, viewed))
            else:
                layouts[node] = viewed
            continue
        sizes = merged_sizes(node, symbol)
        if not sizes:
            continue
        inherited: Layout = {}
        for source in node.all_input_nodes:
            for size, inner in layouts.get(source, {}).items():
                if size in sizes and inherited.setdefault(size, inner) != inner:
                    problems.append((node, f"combines axes of size {size} whose tokens are laid out differently"))
        if name == "repeat_interleave" and copies_tokens(args := named_arguments(node)):
            source, repeats = args["self"], args["repeats"]
            size = size_expr(tensors_of(source)[0].shape[args["dim"]])
            inner = 1 if size == symbol else layouts.get(source, {}).get(size)
            if inner is not None:
                inherited[size * repeats] = inner * repeats
        layouts[node] = inherited
    return problems


def contracted_operands(name: str, args: dict) -> list[tuple[torch.fx.Node, int]]:
    """The operands of a matrix product with the axis each sums over (``a @ b``: ``a``'s last, ``b``'s second to last)."""
    first, second = {"mm": ("self", "mat2"), "bmm": ("self", "mat2"), "matmul": ("self", "other"),
                     "addmm": ("mat1", "mat2"), "baddbmm": ("batch1", "batch2"), "addbmm": ("batch1", "batch2")}[name]
    a, b = args[first], args[second]
    b_rank = b.meta["val"].dim()
    return [(a, a.meta["val"].dim() - 1), (b, b_rank - 2 if b_rank >= 2 else 0)]


def sums_a_pattern_over_tokens(node: torch.fx.Node, name: str, made: set[torch.fx.Node], symbol) -> bool:
    """Whether ``node`` reduces or contracts a tensor in ``made`` along one of its token axes."""
    args = named_arguments(node)
    if name in REDUCTIONS:
        source = args.get("self", args.get("input"))
        dims = token_dims(source, symbol) if source in made else []
        dim_args = [args[k] for k in ("dim", "dims") if k in args]
        return bool(dims) and bool(set(dims) & set(normalise(dim_args[0] if dim_args else None, source.meta["val"].dim())))
    if name == "einsum":
        operands, output = einsum_labels(args["equation"], [t.meta["val"].dim() for t in args["tensors"]])
        return any(labels[d] not in output for labels, t in zip(operands, args["tensors"]) if t in made for d in token_dims(t, symbol))
    if name in CONTRACTIONS and name != "linear":
        return any(operand in made and axis in token_dims(operand, symbol) for operand, axis in contracted_operands(name, args))
    return False


def aliased_base(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose memory ``node`` shares: through views (``x[:, 0]``, ``x.view(...)``, an item of ``x.split()``)
    and in-place ops, which return their input."""
    while node.op == "call_function":
        if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
            node = node.args[0]
            continue
        returns = node.target._schema.returns if isinstance(node.target, torch._ops.OpOverload) else ()
        if not (returns and returns[0].alias_info is not None and isinstance(node.args[0], torch.fx.Node)):
            break
        node = node.args[0]
    return node


def written_arguments(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The tensors an op writes in place (``copy_``'s ``self``, an ``out=``), by its schema."""
    values = named_arguments(node)
    return [values[a.name] for a in node.target._schema.arguments
            if a.alias_info is not None and a.alias_info.is_write and isinstance(values.get(a.name), torch.fx.Node)]


def patterns_made_inside(gm: torch.fx.GraphModule, symbol) -> list[tuple[torch.fx.Node, str]]:
    """Uses of what the block makes from its token count alone, with no input's values: positions it counts out
    (``arange`` over ``T``), used other than by comparing them with each other, and patterns over positions (``ones``,
    ``eye``, a causal mask built inside the block) summed or multiplied along a token axis, which counts positions or
    the tokens themselves (``ones(T, T).tril().sum(-1)`` numbers them, ``ones(B, 1, T) @ x`` pools them). A pattern
    that only compares order (a causal mask, applied) holds on the k routed tokens, which keep their order.
    (``token_tables`` reads the positions of tokens for the counts that :func:`positions_read_as_values` finds,
    before this stage.)"""
    return [(node, reason) for node, reason, _ in _uses_of_made_values(gm, symbol)]


def counts_positions(count: torch.fx.Node) -> str:
    """Why a use of the positions ``count`` numbers (an ``arange`` that ``token_tables`` did not read) is refused."""
    return (f"uses token positions that the block counts out itself (arange over the token count, at "
            f"[{model_source_line(count)}]) in a way modpass cannot read per sequence: routed, its k tokens would be "
            "numbered by their slots among the selected, not by their positions; pass positions in from outside the block")


def positions_read_as_values(gm: torch.fx.GraphModule, symbol) -> set[torch.fx.Node]:
    """The ``arange`` nodes over ``T`` whose positions the block uses as numbers (rotary angles, a bias by position),
    not only compared with each other."""
    return {count for _, _, counts in _uses_of_made_values(gm, symbol) for count in counts}


def _uses_of_made_values(gm: torch.fx.GraphModule, symbol) -> list[tuple[torch.fx.Node, str, list[torch.fx.Node]]]:
    """:func:`patterns_made_inside`'s uses, each with the counts (``arange`` nodes) whose positions it uses."""
    counted_from: dict[torch.fx.Node, torch.fx.Node] = {}  # a value holding positions -> the arange counting them
    patterns: set[torch.fx.Node] = set()
    problems = []
    for node in gm.graph.nodes:
        name = aten_name(node)
        if name is None:
            continue
        if name in _MAKES_POSITIONS and token_dims(node, symbol):
            counted_from[node] = node
            continue
        if name in _FACTORIES or name.endswith("_like") or name.startswith("new_"):
            patterns.add(node)  # its values come from sizes and constants alone
            continue
        tensors = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        if not all(a in patterns for a in tensors):
            # A pattern written in place with other values (``buf[:, :] = scores``, through a view) holds those now.
            patterns -= {aliased_base(value) for value in written_arguments(node)}
        counts = list(dict.fromkeys(counted_from[a] for a in tensors if a in counted_from))
        if counts:
            if name in _KEEPS_VALUES:
                counted_from[node] = counts[0]
            elif name in _COMPARISONS and len(tensors) == 2 and all(a in counted_from for a in tensors):
                patterns.add(node)
            else:
                problems.append((node, counts_positions(counts[0]), counts))
        elif sums_a_pattern_over_tokens(node, name, patterns, symbol):
            problems.append((node, "sums a pattern over positions that the block makes itself from the token count (ones, "
                             "eye or a mask over T) along a token axis, which counts positions or pools tokens: routed, "
                             "it would count the k routed tokens instead; pass such values in from outside the block", []))
        elif tensors and all(a in patterns for a in tensors):
            patterns.add(node)
    return problems


def is_size_argument(argument: torch._C.Argument) -> bool:
    """Whether a schema argument takes sizes, dims or indices (``int``, ``int?``, ``int[]``) rather than values."""
    kind = argument.type
    while isinstance(kind, (torch._C.OptionalType, torch._C.ListType)):
        kind = kind.getElementType()
    return isinstance(kind, torch._C.IntType)


def holds_token_count(node, symbol) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)) and symbol in val.node.expr.free_symbols


def token_count_as_value(gm: torch.fx.GraphModule, symbol) -> list[tuple[torch.fx.Node, str]]:
    """Ops that take a number computed from ``T`` as a value: routed, they would compute with ``k``."""
    problems = []
    for node in gm.graph.nodes:
        name = aten_name(node)
        if name is None:
            continue
        if name in _MAKES_POSITIONS or name.startswith(("_assert", "sym_constrain_range")):
            continue  # patterns_made_inside judges those; runtime asserts only check the count
        schema = {a.name: a for a in node.target._schema.arguments}
        for key, value in named_arguments(node).items():
            values = value if isinstance(value, (list, tuple)) else [value]
            if key in schema and not is_size_argument(schema[key]) and any(holds_token_count(v, symbol) for v in values):
                problems.append((node, f"computes with the token count as a number ({key}={values[0]}): routed, it would "
                                 "compute with the k routed tokens' count instead; pass the length in from outside the block"))
                break
    return problems


_MODPASS_FILES = f'File "{os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}{os.sep}'


def model_source_line(node: torch.fx.Node) -> str:
    """The innermost frame of model code (outside torch and modpass) that created ``node``; for an op made inside
    torch's own modules (``nn.MultiheadAttention``), the innermost frame there."""
    frames = [line.strip() for line in (node.meta.get("stack_trace") or "").splitlines() if line.strip().startswith("File ")]
    frames = [f for f in frames if not f.startswith(_MODPASS_FILES)]
    user = [f for f in frames if "/torch/" not in f]
    return (user or frames or ["unknown source"])[-1]


def paired_axes(node: torch.fx.Node, name: str, batch, symbol) -> tuple[list, list]:
    """The sizes of the axes along which a product of two activations, each carrying the batch and the tokens, relates
    rows of one to rows of the other, as two lists: the rows each has that the other lacks (``q @ k.T``: the queries
    and the keys), and the axes the two sum over together (``scores @ v``: the keys). Axes both keep (heads, sequences)
    relate nothing, nor does an axis that one operand sums alone; a weight, carrying no batch, makes a layer."""
    args = named_arguments(node)
    if name == "einsum":
        tensors = args["tensors"]
        operands, output = einsum_labels(args["equation"], [t.meta["val"].dim() for t in tensors])
        owners = Counter(label for labels in operands for label in set(labels))
        sizes = {label: t.meta["val"].shape[d] for labels, t in zip(operands, tensors) for d, label in enumerate(labels)}
        rows = [size for label, size in sizes.items() if label in output and owners[label] == 1]
        summed = [size for label, size in sizes.items() if label not in output and owners[label] > 1]
    else:
        (a, summed_axis), (b, _) = contracted_operands(name, args)
        tensors = [a, b]
        rows = [t.meta["val"].shape[d] for t, d in ((a, a.meta["val"].dim() - 2), (b, b.meta["val"].dim() - 1)) if t.meta["val"].dim() >= 2]
        summed = [a.meta["val"].shape[summed_axis]]
    if sum(bool(token_dims(t, batch) and token_dims(t, symbol)) for t in tensors) < 2:
        return [], []
    return rows, summed


def scans_the_batch_at_each_token(node: torch.fx.Node, name: str, batch, symbol) -> bool:
    """Whether ``node`` reduces or scans along the batch axis of a tensor whose token axis it keeps: it combines the
    sequences of the batch position by position."""
    if name not in REDUCTIONS and name not in _SCANS:
        return False
    args = named_arguments(node)
    source = args.get("self", args.get("input"))
    dim_args = [args[k] for k in ("dim", "dims") if k in args]
    if not isinstance(source, torch.fx.Node) or not dim_args or dim_args[0] is None:
        return False
    tokens = token_dims(source, symbol)
    axes = set(normalise(dim_args[0], source.meta["val"].dim()))
    return bool(tokens) and bool(axes & set(token_dims(source, batch))) and not axes & set(tokens)


def attention_across_the_batch(gm: torch.fx.GraphModule, symbol) -> list[tuple[torch.fx.Node, str]]:
    """Attention whose queries run along the batch axis and not the token axis: the block's sequences lie along the
    hidden state's first axis, a sequence-first ``(T, B, D)`` layout, and its second axis, which routing takes as the
    tokens, is the batch. Routing would pick among the sequences of the batch at each position and run them together
    through attention, while the rules above, reading attention as allowed, would see nothing wrong. An attention
    kernel shows it by its queries; attention written by hand (fairseq's ``bmm`` over ``(B*H, T, dh)``, Megatron's
    ``baddbmm``, ``nn.MultiheadAttention`` returning its weights) by a product pairing rows along the batch axis."""
    batch = gm.meta["modpass_batch_symbol"]
    if isinstance(batch, int):  # a batch of one: nothing to tell the axes apart by
        return []

    def only_batch(size) -> bool:
        return mentions(size, batch) and not mentions(size, symbol)

    found = []
    for node in gm.graph.nodes:
        name = aten_name(node)
        if name is None:
            continue
        if any(key in name for key in ATTENTION):
            along_batch = only_batch(node.args[0].meta["val"].shape[-2])
        elif name in CONTRACTIONS and name != "linear":
            # Queries with keys, paired or summed over: one such axis alone is an operand broadcast against another
            # that lacks it. A sum over the batch axis itself is linear attention's key-value summary.
            rows, summed = paired_axes(node, name, batch, symbol)
            along_batch = sum(map(only_batch, rows + summed)) >= 2 or any(map(only_batch, summed))
        else:
            along_batch = scans_the_batch_at_each_token(node, name, batch, symbol)
        if along_batch:
            found.append((node, "relates positions along the hidden state's first axis, which routing takes as the batch, "
                          "at each index of its second, which routing takes as the tokens and selects differently in each "
                          "row: attention in a sequence-first (T, B, D) layout, as torch's nn.TransformerEncoderLayer and "
                          "nn.MultiheadAttention use unless built with batch_first=True (routing needs batch-first (B, T, D) "
                          "hidden states), or a batch-first block combining its sequences token by token"))
    return found


def batch_mixing(gm: torch.fx.GraphModule) -> list[str]:
    """Where the block combines different sequences of its batch: the ops that would mix tokens, read along the
    batch axis, and extra outputs that are one value for the whole batch (see ``token_axes``)."""
    batch = gm.meta["modpass_batch_symbol"]
    ops = [] if isinstance(batch, int) else [node for node in gm.graph.nodes if mixing_reason(node, batch)]
    return list(dict.fromkeys(f"{node.target} [{model_source_line(node)}]" for node in ops)) + [
        f"output {j} is one value for the whole batch, computed from its sequences" for j in gm.meta["modpass_batch_wide_outputs"]
    ]


def token_mixing(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    view = inlined(gm)  # the ops run under no_grad or autocast too
    gm.meta["modpass_batch_mixing"] = batch_mixing(view)
    symbol = gm.meta["modpass_token_symbol"]
    if symbol is None:  # a single-token call: nothing to mix
        return gm
    reasons = [(node, mixing_reason(node, symbol)) for node in view.graph.nodes]
    reasons = [(node, reason) for node, reason in reasons if reason] + token_layouts(view, symbol) + patterns_made_inside(view, symbol)
    reasons += token_count_as_value(view, symbol) + attention_across_the_batch(view, symbol)
    # One source line often makes several such ops (an index per expert's rows): each reason once, counted.
    counts = Counter(f"{node.target} {reason} [{model_source_line(node)}]" for node, reason in reasons)
    problems = [problem if n == 1 else f"{problem} ({n} times)" for problem, n in counts.items()]
    if problems:
        where = gm.meta.get("modpass_where", "block")
        raise UnroutableBlockError(
            f"{where} cannot run on a subset of tokens, as routing needs: "
            + "; ".join(problems)
            + ". Leave it dense (layers= without it, or unroutable='dense')."
        )
    return gm
