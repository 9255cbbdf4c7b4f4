"""Block stage 4, ``rewrite``: turn a captured block into its routed form.

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

and returns ``(out, *other block outputs, logits, index, padding)``, where
``padding`` is the ``(B, T)`` bool padding flags or None for an unmasked block. Two placeholders
are appended after the block's own: the router's weight and bias
(``meta["modpass_inputs"]`` gains ``("router", "weight")`` and
``("router", "bias")``). With ``explicit_capacity=True`` two more follow,
``("capacity", None)`` (k, an int) and ``("route_mask", None)`` (``(B, T)``
bool; tokens outside it are always selected), for calls whose capacity
depends on a per-sequence route mask. Every original use of a token-indexed input now reads
its gathered version, so sizes the block derives from ``T`` become ``k``.

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

from .. import routing
from .token_axes import flat_outputs, user_inputs


def attention_mask_input(inputs: list[torch.fx.Node]) -> torch.fx.Node | None:
    """A 4-D input indexed by token on its last two axes (query x key), if any."""
    for node in inputs[1:]:
        if node.meta["val"].dim() == 4 and node.meta["modpass_token_axes"] == (2, 3):
            return node
    return None


def key_mask_input(inputs: list[torch.fx.Node]) -> torch.fx.Node | None:
    """A boolean input indexed by token on its last axis only (a key padding mask), if any."""
    for node in inputs[1:]:
        val = node.meta["val"]
        if val.dtype == torch.bool and node.meta["modpass_token_axes"] == (val.dim() - 1,):
            return node
    return None


def rewrite(
    gm: torch.fx.GraphModule,
    *,
    ratio: Fraction,
    gate: str = "tanh",
    explicit_capacity: bool = False,
    score_gradients: bool = True,
) -> torch.fx.GraphModule:
    graph = gm.graph
    inputs = user_inputs(gm)
    hidden = inputs[0]
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
        route_mask = None
        if explicit_capacity:
            k = graph.placeholder("capacity")
            route_mask = graph.placeholder("route_mask")
        else:
            num_tokens = call(torch.ops.aten.sym_size.int, hidden, 1, role="capacity")
            k = call(routing.capacity, num_tokens, ratio.numerator, ratio.denominator, role="capacity")
        scoring = routing.router_logits if score_gradients or gate == "string" else routing.router_scores
        logits = call(scoring, hidden, router_weight, router_bias, role="router")
        padding = None
        if (mask := attention_mask_input(inputs)) is not None:
            padding = call(routing.padding_from_attention_mask, mask, role="padding")
        elif (mask := key_mask_input(inputs)) is not None:
            padding = call(routing.padding_from_key_mask, mask, role="padding")
        scores = call(routing.selection_scores, logits, padding, route_mask, role="select")
        index = call(routing.select_tokens, scores, k, role="select")
        taken = call(routing.take_tokens, hidden, index, role="gather")
        base = call(operator.getitem, taken, 0, role="gather")
        gathered = {hidden: call(operator.getitem, taken, 1, role="gather")}
        for node in inputs[1:]:
            if node.meta["modpass_token_axes"]:
                gathered[node] = call(routing.gather_tokens, node, index, node.meta["modpass_token_axes"], role="gather")

    routing_nodes = set(added)
    for node, selected in gathered.items():
        node.replace_all_uses_with(selected, delete_user_cb=lambda user: user not in routing_nodes)

    extra = [("capacity", None), ("route_mask", None)] if explicit_capacity else []
    gm.meta["modpass_inputs"] = [*gm.meta["modpass_inputs"], ("router", "weight"), ("router", "bias"), *extra]
    output = graph.output_node()
    outputs = flat_outputs(gm)
    with graph.inserting_before(output):
        logits_selected = call(routing.router_logits, gathered[hidden], router_weight, router_bias, role="gate")
        weight = call(routing.gate_weights, logits_selected, gate, role="gate")
        padding_values = None
        if gate == "string":
            base = call(routing.skip_scale, base, logits, role="gate")
            if padding is not None:
                padding_values = call(routing.gather_tokens, base, index, (1,), role="scatter")
        new_hidden = call(routing.scatter_update, base, index, gathered[hidden], outputs[0], weight, padding,
                          padding_values, role="scatter")
    output.args = ((new_hidden, *outputs[1:], logits, index, padding),)
    graph.lint()
    gm.recompile()
    gm.meta["modpass_ratio"] = ratio
    gm.meta["modpass_gate"] = gate
    return gm
