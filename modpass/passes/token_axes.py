"""Block stage 2, ``token_axes``: decide which axes of each block input are token axes.

Expects: a graph from ``capture_block`` whose first user input is the hidden
state ``(B, T, D)`` and whose first output is the new hidden state.
Guarantees: ``gm.meta["modpass_token_symbol"]`` is the symbol of ``T``; every
user-input placeholder has ``meta["modpass_token_axes"]`` (a tuple of axes,
empty when the input is not token-indexed) and ``meta["modpass_batch_axis"]``
(0 when it follows the batch, None when it is broadcast or batch-free).
``gm.meta["modpass_passthrough_outputs"]`` maps the position of every extra
output that is one of the block's inputs, returned as it came (T5 hands its
position bias on to the next layer this way), to that input's position.
Of the other extra outputs, ``gm.meta["modpass_row_outputs"]`` lists those that
follow the batch (a per-sequence conditioning vector handed on, as DiT-style
blocks do): a mixed-task batch assembles them row by row, like the hidden
state. ``gm.meta["modpass_batch_wide_outputs"]`` lists those that are
batch-free yet computed from per-sequence inputs (a statistic over the batch):
they have no per-row value, so a mixed-task batch refuses them.
The graph is unchanged.

An axis is a token axis exactly when its size is the symbol ``T`` itself.
The symbols come from the export, where every input size starts out
independent and only the block's own arithmetic ties a size to ``T`` (a mask
added to the attention scores, rotary tables multiplied into the queries).
Sizes are never compared: a head size, batch or width equal to ``T`` at
capture time stays a different symbol or a constant, and cross-attention
states of another sequence keep their own symbol. An input's first axis
follows the batch when it is the batch's symbol or the export's guards prove
it equal (see ``follows_batch``).

Refuses (``UnroutableBlockError``) inputs or outputs whose size is another
expression of ``T`` (``2*T``, ``T + 1``), token-indexed inputs that are not
batch-first (those without a batch axis, tables the batch shares, are left
to ``token_tables``), and extra outputs that carry the token axis, unless they are
inputs passed through.
"""

from __future__ import annotations

import sympy
import torch
from torch.utils._sympy.functions import FloorDiv

from ..errors import UnroutableBlockError

#: Ops that read a tensor's sizes, not its values.
SIZE_READS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_stride.int, torch.ops.aten.sym_numel.default}


def size_expr(size):
    """A size as an int when it is fixed, else as its sympy expression."""
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if expr.is_number else expr
    return int(size)


def mentions(size, symbol) -> bool:
    expr = size_expr(size)
    return not isinstance(expr, int) and symbol in expr.free_symbols


def user_inputs(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [node for node, _ in user_input_leaves(gm)]


def user_input_leaves(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, int]]:
    """The user-input placeholders, each with the index of the call's tensor leaf it reads."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [(node, target) for node, (role, target) in zip(placeholders, gm.meta["modpass_inputs"]) if role == "input"]


def flat_outputs(gm: torch.fx.GraphModule) -> list:
    return list(gm.graph.output_node().args[0])


def token_axes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    where = gm.meta.get("modpass_where", "block")
    inputs = user_inputs(gm)
    hidden = inputs[0].meta["val"]
    if hidden.dim() != 3:
        raise UnroutableBlockError(f"{where}: the first argument has shape {tuple(hidden.shape)}; a routed block takes a (batch, tokens, features) hidden state first.")
    token = size_expr(hidden.shape[1])
    outputs = flat_outputs(gm)
    passthrough = gm.meta["modpass_passthrough_outputs"] = {
        j: inputs.index(out) for j, out in enumerate(outputs[1:], start=1) if out in inputs
    }
    if token == 1:
        # A single token (decoding, or a one-token call): k is 1 too, so no
        # side input needs gathering and nothing can mix tokens.
        for node in inputs:
            node.meta["modpass_token_axes"] = (1,) if node is inputs[0] else ()
            node.meta["modpass_batch_axis"] = 0 if node.meta["val"].dim() and follows_batch(node.meta["val"].shape[0], hidden.shape[0]) else None
        gm.meta["modpass_token_symbol"] = None
        gm.meta["modpass_batch_symbol"] = size_expr(hidden.shape[0])
        classify_extra_outputs(gm, inputs, outputs)
        return gm
    if token == 0:
        raise UnroutableBlockError(f"{where}: the call has no tokens (a sequence length of 0); capture it from example "
                                   "inputs of two tokens or more.")
    if isinstance(token, int):
        # A varying last axis may hold the tokens instead: channel-first blocks (1-D convolutions) fix the second to
        # their width.
        channel_first = (
            " Or the block is channel-first, (batch, features, tokens), its second axis the width and its last, which "
            "varies, the tokens: transpose the hidden state to (batch, tokens, features) outside the block."
        ) if hidden.dim() == 3 and not isinstance(size_expr(hidden.shape[2]), int) else ""
        raise UnroutableBlockError(
            f"{where}: export fixed the block's token count to {token}: its code takes the length as a Python number "
            "(math.log(T), torch.linspace(0, 1, T), a table pooled or interpolated to T) or requires that length, so its "
            "graph holds for that length only and cannot run on a subset of tokens. Pass such values in from outside "
            f"the block, or leave it dense with layers=.{channel_first}"
        )
    for i, node in enumerate(inputs):
        val = node.meta["val"]
        batch = size_expr(hidden.shape[0])  # read again: follows_batch may have equated it with another input's
        axes = tuple(d for d, s in enumerate(val.shape) if size_expr(s) == token)
        tied = [d for d, s in enumerate(val.shape) if mentions(s, token) and d not in axes]
        if tied:
            raise UnroutableBlockError(
                f"{where}: input {i} has shape {tuple(val.shape)}, where axis {tied[0]} depends on the token "
                "count without being it; such an input cannot be gathered to a subset of tokens."
            )
        batch_axis = 0 if val.dim() and follows_batch(val.shape[0], hidden.shape[0]) and 0 not in axes else None
        if axes and val.dim() and batch_axis is None and size_expr(val.shape[0]) != 1 and not shared_table(val, axes, batch):
            first = size_expr(val.shape[0])
            folded = not isinstance(first, int) and not isinstance(batch, int) and (first / batch).is_Integer
            raise UnroutableBlockError(
                f"{where}: token-indexed input {i} (shape {tuple(val.shape)}) is not batch-first"
                + (f": its first axis is the batch folded with another axis ({first}), in an order its shape does not "
                   "tell (Bloom's ALiBi tensor is (batch * heads, 1, T))" if folded else "")
                + "; modpass gathers per sequence along axis 0. Leave this block dense with layers=."
            )
        node.meta["modpass_token_axes"] = axes
        node.meta["modpass_batch_axis"] = batch_axis

    first = outputs[0] if outputs else None
    if not isinstance(first, torch.fx.Node) or [size_expr(s) for s in first.meta["val"].shape] != [size_expr(s) for s in hidden.shape]:
        raise UnroutableBlockError(
            f"{where}: the block's first output is not a hidden state shaped like its input {tuple(hidden.shape)}; "
            "a routed block must map (B, T, D) to (B, T, D)."
        )
    for j, out in enumerate(outputs[1:], start=1):
        if j in passthrough:
            continue
        val = out.meta.get("val") if isinstance(out, torch.fx.Node) else None
        if isinstance(val, torch.Tensor) and any(mentions(s, token) for s in val.shape):
            raise UnroutableBlockError(
                f"{where}: output {j} (shape {tuple(val.shape)}) is indexed by token and computed by the block (attention "
                "weights, cache entries, or a tensor that later layers read); a routed block returns a new hidden state "
                "per token and its other inputs as they came, nothing else indexed by token. Turn such outputs off "
                "where the model can (output_attentions=False, output_router_logits=False, use_cache=False), or leave "
                "this block dense with layers=."
            )
    gm.meta["modpass_token_symbol"] = token
    gm.meta["modpass_batch_symbol"] = size_expr(hidden.shape[0])
    classify_extra_outputs(gm, inputs, outputs)
    return gm


def shared_table(val: torch.Tensor, axes: tuple[int, ...], batch) -> bool:
    """Whether a token-indexed input is a table the whole batch shares, ``(T, d)`` rather than batch-first or
    ``(1, T, d)`` (which the rewrite gathers): ``token_tables`` reads it per sequence, and only what it reads so is
    let through here without a batch axis."""
    return bool(axes) and size_expr(val.shape[0]) != 1 and shared_by_the_batch(val.shape, batch)


def shared_by_the_batch(shape, batch) -> bool:
    """Whether a tensor of ``shape`` has no axis of the batch, whose size is ``batch`` (a symbol, or an int where
    the call was captured for one size): one value for every sequence. With a batch of one, every tensor is."""
    if isinstance(batch, int):
        return batch == 1
    return not any(mentions(size, batch) for size in shape)


def follows_batch(size, batch_size) -> bool:
    """Whether an input's first axis is the batch: the batch's own symbol, or one the export's guards prove equal to it.

    The proof taken is ``size // batch == 1`` with ``batch`` dividing ``size``:
    diffusers' attention repeats a ``(B, 1, T)`` mask per head and views it
    back by the hidden state's batch, which ties the two sizes only so. A
    proven equality is then recorded in the export's shape environment, so
    that every size computed from the input reads as one of the batch.
    """
    first, batch = size_expr(size), size_expr(batch_size)
    if first == batch:
        return True
    if isinstance(first, int) or isinstance(batch, int) or not first.is_Symbol:
        return False
    shape_env = size.node.shape_env
    ratio = sympy.cancel(first / batch)
    divides = any(sympy.cancel(shape_env.replace(m.args[0]) / shape_env.replace(m.args[1])) == ratio for m in shape_env.divisible)
    floor_is_one = any(shape_env.replace(g.expr) == sympy.Eq(FloorDiv(first, batch), 1) for g in shape_env.guards)
    if not (divides and floor_is_one):
        return False
    torch._check(size == batch_size)  # implied by the guards above; records one symbol as the other
    return size_expr(size) == size_expr(batch_size)


def classify_extra_outputs(gm: torch.fx.GraphModule, inputs: list[torch.fx.Node], outputs: list) -> None:
    """Sort the computed extra outputs into those that follow the batch and those reduced over it."""
    batch = gm.meta["modpass_batch_symbol"]
    per_row = {n for n in inputs if n.meta["modpass_batch_axis"] == 0 or n.meta["modpass_token_axes"]}
    for node in gm.graph.nodes:
        if node.op != "placeholder" and any(a in per_row for a in node.all_input_nodes):
            per_row.add(node)
    row_outputs, batch_wide_outputs = [], []
    for j, out in enumerate(outputs[1:], start=1):
        val = out.meta.get("val") if isinstance(out, torch.fx.Node) else None
        if j in gm.meta["modpass_passthrough_outputs"] or not isinstance(val, torch.Tensor):
            continue
        if val.dim() and size_expr(val.shape[0]) == batch:
            row_outputs.append(j)
        elif out in per_row:
            batch_wide_outputs.append(j)
    gm.meta["modpass_row_outputs"] = tuple(row_outputs)
    gm.meta["modpass_batch_wide_outputs"] = tuple(batch_wide_outputs)
