"""Block stage 9, ``rewrite``: turn a captured block into its routed form.

Expects: a graph annotated by ``token_axes`` and checked by ``token_mixing``.
Guarantees: the graph computes, for one task,

    logits = router(x)                                  # Linear(D, 1), one score per token
    index  = select_tokens(scores(logits, padding), k)  # k = ceil(ratio * T), sorted by position
    x, x_sel = take_tokens(x, index)                    # one gradient buffer for x in the backward
    side_sel = gather_tokens(side, index)               # every other token-indexed input
    y_sel  = <the original block>(x_sel, side_sel)      # T is k inside the block
    w      = gate(router(x_sel))                        # the selected tokens' logits, recomputed
    out    = scatter_update(x, index, x_sel, y_sel, w, padding)  # x + w * (y_sel - x_sel) at index;
                                                                 # selected padding keeps x

and returns ``(out, *other block outputs, logits, index, padding, extra)`` (an input
the block returns unchanged is returned whole, not gathered), where
``padding`` is the ``(B, T)`` bool padding flags or None for an unmasked block and
``extra`` is None but with ``row_capacities`` (below). Two placeholders
are appended after the block's own: the router's weight and bias
(``meta["modpass_inputs"]`` gains ``("router", "weight")`` and
``("router", "bias")``). With ``explicit_capacity=True`` two more follow,
``("capacity", None)`` (k, an int) and ``("route_mask", None)`` (``(B, T)``
bool; tokens outside it are always selected), for calls whose capacity
depends on a per-sequence route mask. Every original use of a token-indexed input now reads
its gathered version, so sizes the block derives from ``T`` become ``k``.

With ``row_capacities=True`` as well, a last placeholder ``("row_capacity", None)``
(``(B,)``, each row's own capacity, at most k) lets rows of different
capacities share the call: ``select_tokens_per_row`` fills a row's spare
slots with tokens it skips, flagged in ``extra`` (``(B, k)`` bool, returned
last), which ``scatter_update`` writes back unchanged and ``hide_extra_slots``
removes from the block's gathered mask. Refused (``UnroutableBlockError``)
where the block's attention could still see them; see :func:`extra_slots_leak`.

The gate's logits are the router applied to ``x_sel`` (k tokens), not a
gather of ``logits``: equal values, but the gradient of the gate then needs
only ``x_sel``, which the block keeps anyway. With ``score_gradients=False``
(no auxiliary loss and no STRing gate: nothing differentiates the full
``logits``) the full scores are computed on detached inputs, so training no
longer keeps the whole ``(B, T, D)`` hidden state alive for the router's
backward. That is a ``B*T*D`` activation per routed block, and it lets
Inductor write the selected rows into the residual stream in place in
training as in inference. With ``score_gradients=True`` the returned
``logits`` carry gradient (the auxiliary loss trains them).
Nodes added here carry ``meta["modpass_role"]`` for graph-level checks.
"""

from __future__ import annotations

import operator
from fractions import Fraction

import torch

from .. import _compat, routing
from .._subgraphs import inlined
from ..errors import UnroutableBlockError
from .find_blocks import op_name
from .token_axes import SIZE_READS, flat_outputs, user_inputs
from .token_mixing import ATTENTION, CONTRACTIONS, REDUCTIONS, named_arguments, token_dims


def attention_mask_input(inputs: list[torch.fx.Node]) -> torch.fx.Node | None:
    """A 4-D input indexed by token on its last two axes (query x key), if any: additive where it is floating, and
    where it is boolean, one that every use shows attends where True (:func:`attends_where_true`)."""
    for node in inputs[1:]:
        if node.meta["val"].dim() == 4 and node.meta["modpass_token_axes"] == (2, 3):
            return node if node.meta["val"].dtype != torch.bool or attends_where_true(node) else None
    return None


def key_mask_input(inputs: list[torch.fx.Node]) -> torch.fx.Node | None:
    """An input indexed by token on its last axis only (a key padding mask), if any: a boolean one that every use
    shows attends where True, or a floating one that every use adds to attention scores (BERT's ``(B, 1, 1, T)``
    extended mask)."""
    for node in inputs[1:]:
        val = node.meta["val"]
        if node.meta["modpass_token_axes"] != (val.dim() - 1,):
            continue
        if attends_where_true(node) if val.dtype == torch.bool else val.is_floating_point() and adds_to_scores(node):
            return node
    return None


_ATTENTION_CALLS = {torch.ops.aten.scaled_dot_product_attention.default, _compat.masked_attention_while_compiling}
# Ops that pass a mask on without changing which entries it forbids.
_MASK_PRESERVING = {
    "view", "reshape", "_unsafe_view", "expand", "slice", "select", "unsqueeze", "squeeze", "alias", "clone",
    "contiguous", "contiguous_while_compiling", "to", "_to_copy", "detach",
}


def attends_where_true(mask: torch.fx.Node) -> bool:
    """Whether every use of the boolean input ``mask`` is as an attention mask that lets a query attend to a key where
    ``mask`` is True, the reading the padding flags take. Any other use (a per-token flag that picks between two
    MLPs, nn.MultiheadAttention's ``key_padding_mask``, True where padding) leaves it an ordinary input, gathered with
    its tokens: reading it as padding would keep its tokens out of the block, at full capacity too."""
    return _attends_where(in_line(mask), True)


def in_line(placeholder: torch.fx.Node) -> torch.fx.Node:
    """``placeholder`` in the inlined view of its graph, where the uses under autocast or no_grad show too."""
    gm = placeholder.graph.owning_module
    position = list(gm.graph.find_nodes(op="placeholder")).index(placeholder)
    return list(inlined(gm).graph.find_nodes(op="placeholder"))[position]


def adds_to_scores(mask: torch.fx.Node) -> bool:
    """Whether every use of the floating input ``mask`` adds it to attention scores (SDPA's ``attn_mask``, or
    ``scores + mask`` with scores indexed by token pairs), through views: an additive mask, whose large negative
    values forbid."""
    symbol = mask.graph.owning_module.meta["modpass_token_symbol"]

    def adds(node: torch.fx.Node) -> bool:
        uses = [user for user in node.users if user.target not in SIZE_READS]
        return bool(uses) and all(use_adds(node, user) for user in uses)

    def use_adds(node: torch.fx.Node, user: torch.fx.Node) -> bool:
        if user.op != "call_function":
            return False
        if user.target in _ATTENTION_CALLS:
            return named_arguments(user).get("attn_mask") is node
        name = op_name(user.target)
        if name in _MASK_PRESERVING and user.args and user.args[0] is node:
            return adds(user)
        others = [a for a in user.args[:2] if a is not node]
        return name == "add" and len(others) == 1 and isinstance(others[0], torch.fx.Node) and len(token_dims(others[0], symbol)) >= 2

    return adds(in_line(mask))


def _attends_where(node: torch.fx.Node, value: bool) -> bool:
    """Whether every use of the boolean ``node`` attends where it equals ``value``."""

    def use_attends(user: torch.fx.Node) -> bool:
        if user.op != "call_function":
            return False
        if user.target in _ATTENTION_CALLS:
            return named_arguments(user).get("attn_mask") is node and value
        name, args = op_name(user.target), user.args
        if getattr(user.meta.get("val"), "dtype", None) == torch.bool and args and args[0] is node:
            if name in _MASK_PRESERVING:
                return _attends_where(user, value)
            if name in ("logical_not", "bitwise_not"):
                return _attends_where(user, not value)
            if name in ("eq", "ne") and len(args) == 2 and args[1] in (0, False):
                return _attends_where(user, value == (name == "ne"))
        fill = named_arguments(user).get("value" if name == "masked_fill" else "other")
        if name == "masked_fill" and args[1] is node:  # scores.masked_fill(forbidden, -inf)
            return not value and forbids(fill)
        if name == "where" and args[0] is node:  # torch.where(allowed, scores, -inf)
            return value and forbids(fill)
        return False

    uses = [user for user in node.users if user.target not in SIZE_READS]
    return bool(uses) and all(use_attends(user) for user in uses)


def forbids(fill) -> bool:
    """Whether filling attention scores with ``fill`` forbids attending there: a number, or a full tensor of one."""
    if isinstance(fill, torch.fx.Node) and fill.op == "call_function" and op_name(fill.target) in ("full", "scalar_tensor"):
        fill = fill.args[-1] if op_name(fill.target) == "full" else fill.args[0]
    return isinstance(fill, (int, float)) and fill <= routing.FORBIDDING


def mask_input(inputs: list[torch.fx.Node]) -> torch.fx.Node | None:
    """The mask the rewrite reads padding from: a 4-D attention mask, else a key mask; None when unmasked."""
    mask = attention_mask_input(inputs)
    return mask if mask is not None else key_mask_input(inputs)


def padding_reader(mask: torch.fx.Node, inputs: list[torch.fx.Node]):
    """The routing function that reads padding flags from ``mask``, the block's :func:`mask_input`."""
    return routing.padding_from_attention_mask if mask is attention_mask_input(inputs) else routing.padding_from_key_mask


def relates_tokens(node: torch.fx.Node, symbol) -> bool:
    """Whether a contraction pairs tokens: ``q @ k.T`` (a token x token result), ``scores @ v`` (a token x token
    operand) or ``k.T @ v`` (summed over tokens). Where two operands carry the token axis only as a batch axis of
    the product, as transformers' ``batched_mm`` experts multiply each token's copies by its experts' weights, the
    result keeps one token axis and each token meets only itself."""
    operands = [a for arg in node.args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
    indexed = [n for n in (len(token_dims(a, symbol)) for a in operands) if n]
    return any(n >= 2 for n in indexed) or (len(indexed) >= 2 and len(token_dims(node, symbol)) != 1)


def extra_slots_leak(gm: torch.fx.GraphModule) -> str | None:
    """Why the block's attention could see the extra slots of :func:`routing.select_tokens_per_row`, or None.

    They stay hidden when every token-mixing op is
    ``scaled_dot_product_attention`` and each call either is causal over
    slots without a mask (extra slots come last) or reads its mask from the
    block's own mask input through ops that keep its forbidden entries
    (the rewrite forbids the extra keys there).
    """
    view = inlined(gm)  # attention run under autocast too
    block_mask = mask_input(user_inputs(view))
    symbol = gm.meta["modpass_token_symbol"]
    for node in view.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _ATTENTION_CALLS:
            arguments = named_arguments(node)
            mask = arguments.get("attn_mask")
            if not token_dims(arguments["key"], symbol):
                continue  # cross-attention: its keys are another sequence's
            if mask is None:
                if not arguments.get("is_causal", False):
                    return f"{node.name} attends without a mask and not causally"
                continue
            while mask is not block_mask:
                if not isinstance(mask, torch.fx.Node) or mask.op != "call_function" or op_name(mask.target) not in _MASK_PRESERVING:
                    return f"the mask of {node.name} is computed by {getattr(mask, 'target', mask)}"
                mask = mask.args[0]
        elif any(key in op_name(node.target) for key in ATTENTION):
            return f"{node.name} calls {node.target}, whose masking modpass does not read"
        elif op_name(node.target) in CONTRACTIONS and relates_tokens(node, symbol):
            return f"{node.name} ({op_name(node.target)}) relates tokens to each other (attention written out by hand)"
        elif op_name(node.target) in REDUCTIONS and node.args and len(token_dims(node.args[0], symbol)) >= 2:
            return f"{node.name} ({op_name(node.target)}) reduces a tensor indexed by token pairs (attention written out by hand)"
    return None


def rewrite(
    gm: torch.fx.GraphModule,
    *,
    ratio: Fraction,
    gate: str = "tanh",
    explicit_capacity: bool = False,
    row_capacities: bool = False,
    score_gradients: bool = True,
) -> torch.fx.GraphModule:
    graph = gm.graph
    inputs = user_inputs(gm)
    hidden = inputs[0]
    if row_capacities:
        if not explicit_capacity:
            raise ValueError("row_capacities=True needs explicit_capacity=True")
        if (leak := extra_slots_leak(gm)) is not None:
            raise UnroutableBlockError(
                f"{gm.meta.get('modpass_where', 'block')}: rows of different capacities cannot share one call: {leak}."
            )
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    added: list[torch.fx.Node] = []

    def call(fn, *args, role: str):
        node = graph.call_function(fn, args)
        node.meta["modpass_role"] = role
        added.append(node)
        return node

    # inserting_before(body) keeps consecutive inserts in program order.
    body = placeholders[-1].next
    with graph.inserting_before(body):
        router_weight = graph.placeholder("router_weight")
        router_bias = graph.placeholder("router_bias")
        route_mask = row_capacity = None
        if explicit_capacity:
            k = graph.placeholder("capacity")
            route_mask = graph.placeholder("route_mask")
            if row_capacities:
                row_capacity = graph.placeholder("row_capacity")
        else:
            num_tokens = call(torch.ops.aten.sym_size.int, hidden, 1, role="capacity")
            k = call(routing.capacity, num_tokens, ratio.numerator, ratio.denominator, role="capacity")
        scoring = routing.router_logits if score_gradients or gate == "string" else routing.router_scores
        logits = call(scoring, hidden, router_weight, router_bias, role="router")
        padding = None
        if (mask := mask_input(inputs)) is not None:
            batch = call(torch.ops.aten.sym_size.int, hidden, 0, role="padding")
            padding = call(padding_reader(mask, inputs), mask, batch, role="padding")
        scores = call(routing.selection_scores, logits, padding, route_mask, role="select")
        extra = None
        if row_capacity is None:
            index = call(routing.select_tokens, scores, k, role="select")
        else:
            selected = call(routing.select_tokens_per_row, scores, k, row_capacity, role="select")
            index = call(operator.getitem, selected, 0, role="select")
            extra = call(operator.getitem, selected, 1, role="select")
        taken = call(routing.take_tokens, hidden, index, role="gather")
        base = call(operator.getitem, taken, 0, role="gather")
        gathered = {hidden: call(operator.getitem, taken, 1, role="gather")}
        for node in inputs[1:]:
            if axes := node.meta["modpass_token_axes"]:
                gathered[node] = call(routing.gather_tokens, node, index, axes, role="gather")
                if extra is not None and node is mask:
                    gathered[node] = call(routing.hide_extra_slots, gathered[node], extra, axes, role="gather")

    # Tables are read at the selected tokens' positions (token_tables). Outside the inserting_before(body) block: the
    # positions may be its body, which erased there would leave later inserts unlinked.
    for positions in graph.find_nodes(op="call_function", target=routing.token_positions):
        positions.replace_all_uses_with(index)
        graph.erase_node(positions)
    # A count of the whole sequences' tokens (token_tables) reads the hidden state the selected tokens come from.
    routing_nodes = {*added, *graph.find_nodes(op="call_function", target=routing.token_count)}
    for node, selected in gathered.items():
        node.replace_all_uses_with(selected, delete_user_cb=lambda user: user not in routing_nodes)

    capacity_inputs = [("capacity", None), ("route_mask", None)] if explicit_capacity else []
    if row_capacities:
        capacity_inputs.append(("row_capacity", None))
    gm.meta["modpass_inputs"] = [*gm.meta["modpass_inputs"], ("router", "weight"), ("router", "bias"), *capacity_inputs]
    output = graph.output_node()
    # An input the block passes through leaves as it came, whole, not as the block's gathered copy.
    passthrough = gm.meta["modpass_passthrough_outputs"]
    outputs = [inputs[passthrough[j]] if j in passthrough else out for j, out in enumerate(flat_outputs(gm))]
    with graph.inserting_before(output):
        logits_selected = call(routing.router_logits, gathered[hidden], router_weight, router_bias, role="gate")
        weight = call(routing.gate_weights, logits_selected, gate, role="gate")
        padding_values = None
        if gate == "string":
            base = call(routing.skip_scale, base, logits, role="gate")
            if padding is not None or extra is not None:
                padding_values = call(routing.gather_tokens, base, index, (1,), role="scatter")
        new_hidden = call(routing.scatter_update, base, index, gathered[hidden], outputs[0], weight, padding,
                          padding_values, extra, role="scatter")
    output.args = ((new_hidden, *outputs[1:], logits, index, padding, extra),)
    graph.lint()
    gm.recompile()
    gm.meta["modpass_ratio"] = ratio
    gm.meta["modpass_gate"] = gate
    return gm
