"""Block stage 3, ``token_mixing``: refuse blocks that mix tokens outside attention.

Expects: a graph annotated by ``token_axes`` (``meta["modpass_token_symbol"]``)
whose nodes carry ``val`` metadata.
Guarantees: the graph is unchanged and every op that combines values from
different token positions is attention-like, so running the block on a subset
of tokens is the MoD semantics; otherwise ``UnroutableBlockError`` lists each
offending op with the source line that created it.

A tensor *carries tokens* along the axes whose size mentions ``T``. An op
mixes tokens when it combines positions along such an axis:

* attention kernels (``scaled_dot_product_attention`` and its fused variants)
  and products of two token-carrying tensors contracted over ``T`` (scores
  times values) are attention: allowed;
* reductions and softmax over a token axis are allowed only on tensors with
  two token axes (attention scores); on a plain sequence they pool tokens;
* any other op whose ``dim``/``dims`` argument names a token axis (cat, split,
  roll, flip, cumsum, sort, select, gather, unflatten...) mixes or shifts tokens;
  a slice along a token axis is allowed only when it keeps the whole axis;
* convolutions, padding, and normalisations whose statistics span a token axis
  (layer norm over T, group norm, training-mode batch norm) mix tokens;
* indexing *into* a token axis mixes tokens (indexing with token-indexed
  positions, like a rotary lookup, does not);
* data-dependent ops (nonzero, unique, masked_select) on tokens are refused.

Everything else (pointwise math, views, linear layers over features,
feature-wise norms) is position-wise.
"""

from __future__ import annotations

import torch

from ..errors import UnroutableBlockError
from .token_axes import mentions

ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")
CONTRACTIONS = {"matmul", "bmm", "mm", "baddbmm", "addmm", "addbmm", "einsum", "linear"}
REDUCTIONS = {
    "sum", "mean", "amax", "amin", "max", "min", "logsumexp", "softmax", "_softmax", "log_softmax",
    "_log_softmax", "_safe_softmax", "var", "std", "var_mean", "std_mean", "norm", "linalg_vector_norm",
    "prod", "argmax", "argmin", "all", "any", "count_nonzero",
}
_AXIS_ONLY = {"unsqueeze", "squeeze", "transpose", "permute", "movedim", "sym_size", "sym_stride", "size", "stride"}
_CONVOLUTIONS = {"convolution", "conv1d", "conv2d", "conv3d", "_convolution", "conv_transpose1d"}
_SPANNING_NORMS = {"group_norm", "native_group_norm", "instance_norm", "batch_norm", "_native_batch_norm_legit", "native_batch_norm"}
_DATA_DEPENDENT = {"nonzero", "unique", "_unique2", "unique_consecutive", "masked_select"}
_PADS = {"constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "replication_pad2d"}
_INT_MAX = 2**63 - 1


def token_dims(value, symbol) -> list[int]:
    if not isinstance(value, torch.fx.Node) or not isinstance(value.meta.get("val"), torch.Tensor):
        return []
    return [d for d, s in enumerate(value.meta["val"].shape) if mentions(s, symbol)]


def named_arguments(node: torch.fx.Node) -> dict:
    schema = node.target._schema
    named = {a.name: v for a, v in zip(schema.arguments, node.args)}
    named.update(node.kwargs)
    return named


def normalise(dims, rank: int) -> list[int]:
    if dims is None:
        return list(range(rank))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return [d % rank for d in dims] if dims else list(range(rank))


def mixing_reason(node: torch.fx.Node, symbol) -> str | None:
    """Why ``node`` mixes tokens, or None when it is position-wise or attention."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    name = node.target.overloadpacket.__name__
    args = named_arguments(node)
    source = args.get("self", args.get("input", node.args[0] if node.args else None))
    if isinstance(source, (list, tuple)):
        source = source[0] if source else None
    dims = token_dims(source, symbol)
    rank = source.meta["val"].dim() if dims else 0
    if any(key in name for key in ATTENTION):
        return None
    if name in CONTRACTIONS:
        if name == "linear" and dims and rank - 1 in dims:
            return "applies a linear layer across the token axis"
        return None
    if name in _DATA_DEPENDENT and dims:
        return "selects tokens depending on their values"
    if name in _CONVOLUTIONS and any(d >= 2 for d in dims):
        return "convolves along the token axis"
    if name in _PADS and dims:
        pads = list(args.get("pad", node.args[1]))
        padded = {rank - 1 - i // 2 for i, p in enumerate(pads) if p != 0}
        return "pads the token axis" if padded & set(dims) else None
    if name in {"layer_norm", "native_layer_norm"} and dims:
        normalized = range(rank - len(args["normalized_shape"]), rank)
        return "normalises across the token axis" if set(normalized) & set(dims) else None
    if name in _SPANNING_NORMS and dims:
        return "normalises with statistics over tokens"
    if name == "index" and dims:
        indexed = [d for d, i in enumerate(args.get("indices", [])) if i is not None]
        return "indexes into the token axis" if set(indexed) & set(dims) else None
    if name == "embedding":
        return None
    if name in _AXIS_ONLY or not dims:
        return None
    dim_args = [args[k] for k in ("dim", "dims") if k in args]
    if not dim_args and name not in REDUCTIONS:
        return None
    hit = set(dims) & set(normalise(dim_args[0] if dim_args else None, rank))
    if not hit:
        return None
    if name in REDUCTIONS:
        return None if len(dims) >= 2 else f"reduces over the token axis ({name})"
    if name == "slice":
        start, end, step = args.get("start"), args.get("end"), args.get("step", 1)
        keeps_all = start in (None, 0) and step == 1 and (end is None or end == _INT_MAX or str(end) == str(source.meta["val"].shape[args["dim"] % rank]))
        return None if keeps_all else "slices the token axis (a token shift)"
    return f"operates along the token axis ({name})"


def model_source_line(node: torch.fx.Node) -> str:
    """The innermost frame of model code (outside torch) that created ``node``."""
    frames = [line.strip() for line in (node.meta.get("stack_trace") or "").splitlines() if line.strip().startswith("File ")]
    user = [f for f in frames if "/torch/" not in f]
    return (user or frames or ["unknown source"])[-1]


def token_mixing(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    symbol = gm.meta["modpass_token_symbol"]
    if symbol is None:  # a single-token call: nothing to mix
        return gm
    problems = []
    for node in gm.graph.nodes:
        reason = mixing_reason(node, symbol)
        if reason:
            problems.append(f"{node.target} {reason} [{model_source_line(node)}]")
    if problems:
        where = gm.meta.get("modpass_where", "block")
        raise UnroutableBlockError(
            f"{where} mixes tokens outside attention, so it cannot run on a subset of tokens: "
            + "; ".join(problems)
            + ". Leave it dense (layers= without it, or unroutable='dense')."
        )
    return gm
