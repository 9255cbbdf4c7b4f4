"""Block stage 5, ``residual_stream``: check that the block's first argument is its residual stream.

Expects: a graph from ``token_mixing`` (token axes annotated) whose first user
input is the hidden state and whose first output the new hidden state.
Guarantees: the graph is unchanged; the block adds its first argument back into
its first output (``x + f(x)``, before a norm too, as post-norm blocks do), which
has the first argument's dtype.

A routed block passes a skipped token's first argument out as it came. That is
the dense block's own result for that token only where the block adds its first
argument back into its output, the residual connection MoD skips around. Refused
(``UnroutableBlockError``): a block whose residual stream is another argument
(``forward(self, pos, x)``; skipped tokens would come out as ``pos``), and a block
that never adds its input back, whose caller adds it instead (``x = x +
block(x)``; skipped tokens would come out of the caller doubled).
"""

from __future__ import annotations

import torch

from .._subgraphs import inlined
from ..errors import UnroutableBlockError
from .token_axes import flat_outputs, size_expr, user_inputs

_ADD_OPS = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
# Ops that hand the hidden state on as itself, scaled or cast (``residual = x.to(float32)``, ``x * alpha``).
_CARRY_THE_VALUE = {"view", "reshape", "_unsafe_view", "clone", "contiguous", "alias", "detach", "_to_copy", "to",
                    "type_as", "mul", "div"}


def reaches_through_adds(source: torch.fx.Node, target: torch.fx.Node, region: set[torch.fx.Node]) -> bool:
    """Whether ``target`` sums ``source`` in with other terms through ``add`` nodes of ``region`` alone: the residual
    stream of a pre-norm block, ``x + attn(...) + mlp(...)``."""
    frontier = [target]
    while frontier:
        node = frontier.pop()
        if node is source:
            return True
        if node in region and node.op == "call_function" and node.target in _ADD_OPS:
            frontier.extend(node.all_input_nodes)
    return False


def added_back(hidden: torch.fx.Node, output: torch.fx.Node) -> bool:
    """Whether the block adds ``hidden`` (itself, a view, a cast, or scaled by a number) to something that ``output``
    is computed from: a residual connection inside the block, before a norm too (post-norm, ``norm(x + attn(x))``)."""
    carried, frontier = {hidden}, [hidden]
    while frontier:
        for user in frontier.pop().users:
            name = user.target.overloadpacket.__name__ if isinstance(user.target, torch._ops.OpOverload) else None
            numeric = all(not isinstance(a, torch.fx.Node) or a in carried for a in user.args)
            if user not in carried and name in _CARRY_THE_VALUE and (name not in ("mul", "div") or numeric):
                carried.add(user)
                frontier.append(user)
    ancestors, frontier = set(), [output]
    while frontier:
        node = frontier.pop()
        if node not in ancestors:
            ancestors.add(node)
            frontier.extend(node.all_input_nodes)
    return any(node.target in _ADD_OPS and any(a in carried for a in node.args) for node in ancestors)


def residual_stream(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    where = gm.meta.get("modpass_where", "block")
    if gm.meta["modpass_token_symbol"] is None:  # a single token: nothing is skipped
        return gm
    view = inlined(gm)  # residual adds run under autocast or no_grad too
    inputs, first = user_inputs(view), flat_outputs(view)[0]
    shape = [size_expr(s) for s in inputs[0].meta["val"].shape]
    alike = [other for other in inputs[1:]
             if isinstance(other.meta.get("val"), torch.Tensor) and [size_expr(s) for s in other.meta["val"].shape] == shape]
    hidden = inputs[0]
    dtypes = [getattr(node.meta.get("val"), "dtype", None) for node in (hidden, first)]
    if dtypes[0] != dtypes[1]:
        raise UnroutableBlockError(
            f"{where}: the block takes its hidden state as {dtypes[0]} and returns it as {dtypes[1]}. A routed block "
            "passes skipped tokens out as they came, in the dtype they came in, and writes the tokens it ran on among "
            "them, so its output cannot change dtype. Cast the hidden state outside the block, or leave this block "
            "dense with layers=."
        )
    region = set(view.graph.nodes)
    if reaches_through_adds(hidden, first, region):
        return gm
    stream = next((inputs.index(other) for other in alike if reaches_through_adds(other, first, region)), None)
    if stream is not None:
        raise UnroutableBlockError(
            f"{where}: the block's residual stream is its tensor input {stream} (counting from 0; it is added into the "
            "output), not its first argument; a routed block takes the hidden state first and passes skipped tokens' "
            "first argument out unchanged. Make the hidden state the block's first parameter, or leave this block "
            "dense with layers=."
        )
    if not added_back(hidden, first):
        raise UnroutableBlockError(
            f"{where}: the block never adds its input back into its output (no residual connection inside it; the "
            "caller may add it, x = x + block(x)). A routed block passes skipped tokens out unchanged, which is the "
            "block's own result only when the block computes x + f(x); where the caller adds x again, skipped tokens "
            "would count twice. Move the residual add into the block, or leave this block dense with layers=."
        )
    return gm
