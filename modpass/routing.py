"""The routing math, as plain tensor functions.

The rewrite pass (``passes/rewrite.py``) wires these functions into a block's
graph as ``call_function`` nodes, so a printed routed graph reads
``router -> select_tokens -> take_tokens, gather_tokens -> <block> -> scatter_update``.
Eager mode runs them as they are; Dynamo and Inductor trace through them.

Every function works on batch-first tensors whose token axis is given
explicitly; none of them compares sizes to guess an axis.
"""

from __future__ import annotations

import math

import torch
from torch.autograd import forward_ad
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from modpass import _compat
from modpass.kernels import selection

#: Use the forms written for Inductor (:func:`router_logits`) when Dynamo
#: traces the routing math. The same math either way; set it False before
#: compiling to measure the generic forms (Dynamo guards on it, so a change
#: recompiles).
COMPILED_FORMS = True

#: Select tokens on CUDA with modpass's Triton kernel
#: (:mod:`modpass.kernels.selection`), eager and compiled; False uses the two
#: sorts everywhere (for measuring the difference).
SELECTION_KERNEL = True

#: Give a routed block's input one gradient buffer in the backward
#: (:func:`take_tokens`), eager and compiled; False leaves autograd's default
#: (a zero-filled buffer for the gather's gradient, added to the write-back's),
#: for measuring the difference.
ONE_GRADIENT_BUFFER = True

#: Gate names and their formulas, ``w(logit)`` for a selected token (and, for
#: ``"string"``, the weight of a skipped token as well).
GATES = {
    "tanh": "w = 1 + 0.2 * tanh(logit)  (p-MoD TanhNorm; w == 1 at zero-init)",
    "sigmoid": "w = sigmoid(logit)  (MoD's original router weighting)",
    "string": "w = 1 + 0.2 * tanh(logit) on selected and skipped tokens "
    "(p-MoD STRing: skipped tokens become w * x)",
}


def capacity(num_tokens, numerator: int, denominator: int):
    """Exact ``max(1, ceil(num_tokens * numerator / denominator))``.

    Integer arithmetic only, so a symbolic ``num_tokens`` stays an exact sympy
    expression (``0.55`` of 100 tokens is 55, where float ``ceil`` gives 56).
    """
    k = (num_tokens * numerator + denominator - 1) // denominator
    if isinstance(k, int):
        return max(k, 1)
    # A SymInt: ratio > 0 and num_tokens >= 1 already make k >= 1, and
    # telling the shape environment so lets it prove 1 <= k <= T.
    torch._check(k >= 1)
    torch._check(k <= num_tokens)
    return k


def router_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One score per token: ``Linear(D, 1)`` applied to ``(B, T, D)`` -> ``(B, T)``.

    Compiled (see :data:`COMPILED_FORMS`), the same product is written as a
    row reduction, ``sum(x * w) + b`` accumulated in fp32 (or the model's float64): Inductor emits one
    bandwidth-bound kernel for it where a ``Linear`` with one output column
    is a latency-bound library GEMV, and the gate's logits of the k gathered
    tokens fuse into the gather-and-normalise kernel that reads those rows
    anyway. A weight that is a tensor subclass (torchao's quantized tensors)
    keeps the ``Linear``: it implements that, not the reduction's ops.
    """
    if is_tensor_subclass(weight):
        return torch.nn.functional.linear(hidden, weight, bias).squeeze(-1)
    if COMPILED_FORMS and torch.compiler.is_compiling():
        accumulate = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least: a float64 model keeps float64
        logits = (hidden.to(accumulate) * weight.squeeze(0).to(accumulate)).sum(-1) + bias.to(accumulate)
        return logits.to(hidden.dtype)
    # As compiled: in the wider of the two dtypes (a router kept in fp32 in a bf16 model), and not in autocast's lower
    # precision, whose rounding of the logits made eager and compiled calls select different tokens.
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        logits = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), bias.to(dtype)).squeeze(-1)
    return logits.to(hidden.dtype)


def is_tensor_subclass(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a tensor subclass such as torchao's quantized tensors (not a ``Parameter``, nor the fake
    tensors of an export)."""
    if torch.compiler.is_dynamo_compiling():
        # Dynamo answers is_traceable_wrapper_subclass False for torchao's subclasses, and shows the type as it is.
        return type(weight) not in (torch.Tensor, torch.nn.Parameter)
    return is_traceable_wrapper_subclass(weight)


def router_scores(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`router_logits` without gradient: the full scores when only the selected tokens' logits train."""
    return router_logits(hidden.detach(), weight.detach(), bias.detach())


#: An additive mask value at or below this forbids attention (``finfo.min``, -1e9, -inf; BERT's -10000.0): its
#: exponential is 0 in every floating type, as no real bias (ALiBi's, T5's) is at a token's own position.
FORBIDDING = -1e4


def padding_from_attention_mask(mask: torch.Tensor, batch) -> torch.Tensor:
    """``(batch, T)`` bool, True where a token is padding, from a ``(B, H, T, T)`` mask (B is batch or 1; head 0).

    A real token may attend to itself; a padding token may not, and no real token attends to it. So a token is
    padding when the mask forbids its own diagonal entry and its key to every query that may attend to itself. In a
    row where no token may attend to itself but some attend to others (a mask that forbids the diagonal, each token
    attending to the others only) the diagonal tells nothing, and no token is padding; a row that attends to
    nothing at all is all padding. Boolean masks mark allowed entries True; floating masks are additive
    (:data:`FORBIDDING` or below forbids). A mask of batch 1 (T5's position bias) holds for every row.
    """
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > FORBIDDING  # (B, queries, keys)
    # Indexing rather than torch.diagonal, whose Inductor lowering calls a
    # deprecated torch helper and prints a FutureWarning on every compile.
    positions = torch.arange(mask.shape[-1], device=mask.device)
    to_itself = allowed[:, positions, positions]
    attended = (allowed & to_itself[:, :, None]).any(dim=1)
    diagonal_tells = to_itself.any(dim=1, keepdim=True) | ~allowed.flatten(1).any(dim=1, keepdim=True)
    padding = ~to_itself & ~attended & diagonal_tells
    return padding.expand(batch, -1)


def padding_from_key_mask(mask: torch.Tensor, batch) -> torch.Tensor:
    """``(batch, T)`` bool padding flags from a ``(B, ..., T)`` key mask (B is batch or 1): boolean, True where a key may
    be attended to, or floating, additive (:data:`FORBIDDING` or below forbids)."""
    keys = mask.reshape(mask.shape[0], -1, mask.shape[-1])[:, 0]
    return (~keys if keys.dtype == torch.bool else keys <= FORBIDDING).expand(batch, -1)


def selection_scores(
    logits: torch.Tensor, padding: torch.Tensor | None = None, route_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Scores used for top-k.

    Tokens outside ``route_mask`` rank first (they are always processed); NaN
    logits and padding rank below every real token.
    """
    scores = torch.nan_to_num(logits.detach().float(), nan=-math.inf)
    if route_mask is not None:
        scores = torch.where(route_mask, scores, math.inf)
    if padding is not None:
        # Below -inf is impossible, so padding goes to -inf and real tokens
        # with -inf logits are lifted to the lowest finite value: real tokens
        # are then always chosen before padding.
        lowest = torch.finfo(scores.dtype).min
        scores = torch.where(padding, -math.inf, scores.clamp(min=lowest))
    return scores


def select_tokens(scores: torch.Tensor, k) -> torch.Tensor:
    """Indices ``(B, k)`` of the k best tokens per row, sorted by position.

    Ties break by position (the earlier token wins), so a zero-initialised
    router selects the first k tokens of every sequence. Sorting the chosen
    indices keeps the subset in original order, so a plain causal mask over
    the subset is the causal mask over original positions.

    A stable descending sort of the fp32 scores gives that tie-break for
    free; a partial ``topk`` cannot promise which of equal scores it keeps.
    On CUDA (see :data:`SELECTION_KERNEL`) a Triton radix select gives the
    same indices without sorting: 22 us against 33 us for the two sorts on an
    H200 (two rows of 4096 tokens; :mod:`modpass.kernels.selection`).
    """
    if SELECTION_KERNEL and selection.supported(scores):
        return selection.select_tokens(scores, k)
    return torch.sort(rank_tokens(scores)[:, :k], dim=1).values


def rank_tokens(scores: torch.Tensor) -> torch.Tensor:
    """Token positions ``(B, T)`` from best to worst score, ties in position order."""
    # -0.0 and 0.0 compare equal, but a radix sort of the bit patterns would not keep them tied.
    scores = torch.where(scores == 0, 0.0, scores)
    if torch.onnx.is_in_onnx_export():
        # ONNX has no stable sort, and its TopK keeps equal values in index order (torch's topk promises no order).
        # Seen from torch 2.8; before, the dynamo exporter does not say it is exporting, and fails on the sort.
        return torch.topk(scores, scores.shape[1], dim=1).indices
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def row_capacities(route_mask: torch.Tensor, numerator, denominator) -> torch.Tensor:
    """Each row's capacity ``(B,)`` under a route mask: ``#outside + ceil(ratio * #inside)``.

    The tokens outside the mask are always processed; the ratio applies to
    the routable ones, at least one of them when there are any (as
    :func:`capacity`), none when a row has none.
    """
    inside = route_mask.sum(1)
    routed = torch.clamp((inside * numerator + denominator - 1) // denominator, min=1)
    return route_mask.shape[1] - inside + torch.where(inside > 0, routed, 0)


def select_tokens_per_row(scores: torch.Tensor, k, row_capacity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` slots per row for rows whose own capacities ``row_capacity`` (``(B,)``, at most k) differ.

    Row ``b``'s best ``row_capacity[b]`` tokens, the ones :func:`select_tokens`
    picks at that capacity, come first, sorted by position; its remaining
    slots hold the next-ranked tokens, also sorted by position, and are
    flagged in ``extra`` (``(B, k)`` bool). Extra slots only give the rows
    one shape (p-MoD's per-sample padding): their tokens count as skipped,
    the rewrite hides them from attention and :func:`scatter_update` writes
    them back unchanged. Placing them last keeps them out of a causal
    attention over slots (``is_causal=True``) without a mask.
    """
    # narrow, not [:, :k]: slicing asks whether k is the whole row, which a data-dependent k cannot answer (torch 2.7).
    chosen = rank_tokens(scores).narrow(1, 0, k)
    extra = torch.arange(chosen.shape[1], device=chosen.device) >= row_capacity.unsqueeze(1)
    tokens = scores.shape[1]
    ordered = torch.sort(torch.where(extra, chosen + tokens, chosen), dim=1).values
    extra = ordered >= tokens
    return torch.where(extra, ordered - tokens, ordered), extra


def hide_extra_slots(mask: torch.Tensor, extra: torch.Tensor, token_axes: tuple[int, ...]) -> torch.Tensor:
    """A gathered attention mask in which no query sees the keys of ``extra`` slots but its own.

    ``mask`` is a block's mask after :func:`gather_tokens`: a ``(B, H, k, k)``
    query-by-key mask (``token_axes == (2, 3)``) or a key mask whose last
    axis is the key. Boolean masks allow where True, floating ones are
    additive. A query keeps its own key, so the row of an extra slot in a
    4-D mask is never empty (which would make attention NaN).
    """
    keys = extra.reshape(extra.shape[0], *[1] * (mask.dim() - 2), extra.shape[1])
    hidden = keys
    if token_axes == (mask.dim() - 2, mask.dim() - 1):
        slots = torch.arange(extra.shape[1], device=extra.device)
        hidden = keys & (slots.unsqueeze(1) != slots)
    # Contiguous: gather_tokens leaves a query x key mask with its key axis strided, and with an
    # unbacked k Inductor's compiled backward expected another layout for the mask attention saves
    # than its forward wrote (an assert_size_stride failure, torch 2.13).
    if mask.dtype == torch.bool:
        return (mask & ~hidden).contiguous()
    return mask.masked_fill(hidden, torch.finfo(mask.dtype).min).contiguous()


def batch_rows(index: torch.Tensor) -> torch.Tensor:
    """``(B, 1)`` row numbers that pair with a ``(B, k)`` ``index`` in advanced indexing: ``x[batch_rows(index), index]``."""
    return torch.arange(index.shape[0], device=index.device).unsqueeze(-1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor, token_axes: tuple[int, ...]) -> torch.Tensor:
    """Gather ``x`` at ``index`` (B, k) along each of its token axes.

    ``x`` is batch-first; a leading size-1 batch axis (a side input broadcast
    over the batch, such as rotary cos/sin) is expanded to B first.

    Advanced indexing rather than ``torch.gather``: the gradient of an index
    needs only ``x``'s size, while eager autograd keeps all of ``x`` alive for
    ``gather``'s backward, which would hold the full ``(B, T, D)`` hidden
    state of every routed block until the backward pass.
    """
    # Unconditional: a no-op view when x already has B rows, and no size
    # comparison for a data-dependent B (a mixed-task group under compile).
    x = x.expand(index.shape[0], *x.shape[1:])
    rows = batch_rows(index)
    for axis in token_axes:
        x = x.movedim(axis, 1)[rows, index].movedim(1, axis)
    return x


def token_positions(hidden: torch.Tensor) -> torch.Tensor:
    """Each sequence's token positions, ``(B, T)``, where a block reads a table by position (see
    ``passes/token_tables.py``). The rewrite puts the selected tokens' positions, the index, in its place."""
    batch, tokens = hidden.shape[:2]
    return torch.arange(tokens, device=hidden.device).expand(batch, tokens)


def token_count(hidden: torch.Tensor) -> int:
    """The length of ``hidden``'s sequences, where a block counts positions from it (``arange(1 - T, 1)``, see
    ``passes/token_tables.py``). The rewrite leaves it reading the whole sequences, not the selected tokens."""
    return hidden.shape[1]


def rows_of_table(table: torch.Tensor, positions: torch.Tensor, token_axes: tuple[int, ...]) -> torch.Tensor:
    """``table``, one for the whole batch, read per sequence at ``positions`` ``(B, n)`` along each of its
    ``token_axes``: ``(B, *table.shape)`` with ``n`` on those axes (rotary ``cos (T, d)`` read at each sequence's
    selected positions is ``(B, k, d)``). Contiguous, as the table was: the block's own views of it (a ``(T, T)``
    mask viewed to ``(1, 1, T, T)``) then hold for its rows too, where gathering a second axis leaves them strided."""
    return gather_tokens(table.unsqueeze(0), positions, tuple(axis + 1 for axis in token_axes)).contiguous()


class _TakeTokens(torch.autograd.Function):
    """``(hidden, hidden[rows, index])`` with one gradient buffer for ``hidden``; see :func:`take_tokens`."""

    @staticmethod
    def forward(hidden: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return hidden.view_as(hidden), gather_tokens(hidden, index, (1,))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad_base: torch.Tensor, grad_selected: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad_base.index_put((batch_rows(index), index), grad_selected, accumulate=True), None


def take_tokens(hidden: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block input twice: whole, as the base of the write-back, and gathered at ``index``.

    The same values as ``(hidden, gather_tokens(hidden, index, (1,)))``; the
    difference is the gradient. Autograd would give ``hidden`` one gradient
    per use and add them: the gather's, scattered into a zero-filled
    ``(B, T, D)`` buffer, and the write-back's, a second full-size buffer. As
    one function, the gathered rows' gradient is accumulated into the
    write-back's buffer at ``index``: one full-size buffer, which Inductor
    updates in place (``index_put_``), so the backward writes the k rows the
    forward gathered, plus the one copy of the incoming gradient.

    Under a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ...) or
    forward-mode AD it takes autograd's default instead, which those know how
    to run: the function has no ``vmap`` or ``jvp`` rule, and a custom ``jvp``
    would be a graph break under Dynamo.
    """
    if not ONE_GRADIENT_BUFFER or under_forward_ad_or_torch_func(hidden):
        return hidden, gather_tokens(hidden, index, (1,))
    return _TakeTokens.apply(hidden, index)


def under_forward_ad_or_torch_func(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` carries a forward-mode tangent, or a ``torch.func`` transform is running."""
    return _compat.torch_func_transform_running() or forward_ad.unpack_dual(tensor).tangent is not None


def gate_weights(logits_selected: torch.Tensor, gate: str) -> torch.Tensor:
    """Gate ``w`` for selected tokens, shaped ``(B, k, 1)``; see :data:`GATES`."""
    if gate == "sigmoid":
        w = torch.sigmoid(logits_selected)
    else:
        w = 1.0 + 0.2 * torch.tanh(logits_selected)
    return w.unsqueeze(-1)


def gated_update(hidden: torch.Tensor, block_output: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x + w * (block(x) - x)``: the block's update of tokens it ran on, weighted by their gate ``w``.

    As ``torch.lerp``, which is exact at ``w = 1`` (it computes ``y - (y - x) * (1 - w)`` from ``w = 0.5`` up): in
    bfloat16, ``x + (y - x)`` equals ``y`` for about two elements in three, so a routed model at full capacity was
    not the dense one."""
    return torch.lerp(hidden, block_output.to(hidden.dtype), weight.to(hidden.dtype))


def scatter_update(
    hidden: torch.Tensor,
    index: torch.Tensor,
    hidden_selected: torch.Tensor,
    block_output: torch.Tensor,
    weight: torch.Tensor,
    padding: torch.Tensor | None = None,
    padding_values: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = hidden`` with ``x + w * (block(x) - x)`` written at the selected tokens.

    The block's own residual stays inside ``block(x) - x``, so nothing is
    added twice; unselected tokens are copied bit for bit. Indices are unique,
    so this is an overwrite (no accumulation, no atomics on GPU). It is an
    ``index_put`` rather than a ``scatter`` because Inductor reinplaces
    ``index_put`` where ``hidden`` is dead afterwards (inference inside a
    compiled model): only the k selected rows are written, and the full-size
    copy of the hidden states that an out-of-place scatter makes is gone.

    ``padding`` (``(B, T)`` bool) marks tokens that never count as selected
    work: a row with fewer real tokens than k (an all-padding row included)
    fills its remaining slots with padding, and those keep their value in
    ``hidden`` exactly as skipped tokens do, so whatever the block computes
    for them (NaN from a fully masked query included) never reaches the output.
    ``extra`` (``(B, k)`` bool, from :func:`select_tokens_per_row`) marks
    slots that keep their value in the same way.
    ``padding_values`` is what they keep, ``hidden`` at ``index``: that is
    ``hidden_selected`` unless ``hidden`` was reweighted after the gather
    (STRing), so only then does the caller gather it.
    """
    update = gated_update(hidden_selected, block_output, weight).to(hidden.dtype)
    rows = batch_rows(index)
    kept_slots = padding[rows, index] if padding is not None else None
    if extra is not None:
        kept_slots = extra if kept_slots is None else kept_slots | extra
    if kept_slots is not None:
        kept = hidden_selected if padding_values is None else padding_values
        update = torch.where(kept_slots.unsqueeze(-1), kept, update)
    return hidden.index_put((rows, index), update)


def skip_scale(hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """STRing's reweighting of every token, ``w(logit) * x`` (selected ones are overwritten later)."""
    w = 1.0 + 0.2 * torch.tanh(logits)
    return hidden * w.unsqueeze(-1).to(hidden.dtype)
