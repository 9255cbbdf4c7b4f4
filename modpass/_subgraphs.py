"""A flat view of a captured graph, for the analyses: the code a block runs under ``torch.no_grad()`` or
``torch.autocast`` read in line.

Export keeps such code as a subgraph that a higher-order op calls on its operands
(``wrap_with_set_grad_enabled``, ``wrap_with_autocast``), which sets the mode around it at run time. An analysis
that walks the graph's ops sees one opaque call there. So a mean over the tokens taken under ``no_grad`` passed as
position-wise, and a running statistic updated in place under ``no_grad`` (the usual way to update one) went
unseen: both blocks were routed, silently wrong. The routed graph keeps the higher-order ops; the analyses
(``capture_block``'s writes and tables, ``token_mixing``, ``rewrite``'s extra slots) read :func:`inlined`, where
each such call is replaced by its subgraph's ops applied to its operands. A pass that changes ops in place walks
:func:`graphs`, the graph and its subgraphs.

Other higher-order ops (``cond``, ``while_loop``, ``flex_attention``, ...) run their subgraphs another number of times
or with other arguments; they stay calls in the view, and ``token_mixing`` refuses those that take token-carrying inputs.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
from torch._higher_order_ops.wrap import wrap_with_autocast, wrap_with_set_grad_enabled

#: Higher-order ops that call their subgraph once, on the operands that follow it: op -> the subgraph's position.
RUN_ONCE = {
    wrap_with_set_grad_enabled: 1,  # (enabled, subgraph, *operands)
    wrap_with_autocast: 4,  # (device_type, dtype, enabled, cache_enabled, subgraph, *operands)
}


def run_under_autocast(device_type: str, dtype: torch.dtype, enabled: bool, cache_enabled: bool,
                       subgraph: torch.fx.GraphModule, *operands):
    """What ``wrap_with_autocast`` does, in Python that Dynamo traces (see ``passes/mode_regions.py``)."""
    with torch.autocast(device_type, dtype, enabled, cache_enabled):
        return subgraph(*operands)


def run_with_grad_enabled(enabled: bool, subgraph: torch.fx.GraphModule, *operands):
    """What ``wrap_with_set_grad_enabled`` does, in Python that Dynamo traces (see ``passes/mode_regions.py``)."""
    with torch.set_grad_enabled(enabled):
        return subgraph(*operands)


#: The Python function that does what each :data:`RUN_ONCE` higher-order op does, read as it is.
IN_PYTHON = {wrap_with_autocast: run_under_autocast, wrap_with_set_grad_enabled: run_with_grad_enabled}
RUN_ONCE.update({function: RUN_ONCE[op] for op, function in IN_PYTHON.items()})


def is_higher_order(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)


def inlined(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` (for reading, not running) whose calls of :data:`RUN_ONCE` ops are replaced by their subgraphs'
    nodes, nested ones too. Its placeholders are ``gm``'s, in order; every node keeps its metadata (``val``, the
    source line), and ``meta`` is ``gm``'s."""
    if not any(node.target in RUN_ONCE for graph in graphs(gm) for node in graph.nodes if node.op == "call_function"):
        return gm
    graph, attributes = torch.fx.Graph(), {}
    graph.output(_copy_into(graph, gm, {}, attributes))  # a use outside every block (find_blocks looks for one)
    view = torch.fx.GraphModule(attributes, graph)
    view.meta.update(gm.meta)
    return view


def graphs(gm: torch.fx.GraphModule) -> Iterator[torch.fx.Graph]:
    """``gm``'s graph, then those of its subgraphs (the modules its higher-order ops call)."""
    for module in gm.modules():
        if isinstance(module, torch.fx.GraphModule):
            yield module.graph


def _copy_into(graph: torch.fx.Graph, gm: torch.fx.GraphModule, env: dict, attributes: dict):
    """Copy ``gm``'s nodes into ``graph`` (``env`` maps its placeholders where they are bound already); its output,
    in the structure ``gm`` returns it."""
    for node in gm.graph.nodes:
        if node in env:
            continue
        if node.op == "output":
            return torch.fx.map_arg(node.args[0], lambda value: env[value])
        if node.target in RUN_ONCE and node.op == "call_function":
            position = RUN_ONCE[node.target]
            subgraph = getattr(gm, node.args[position].target)
            operands = [env[a] if isinstance(a, torch.fx.Node) else a for a in node.args[position + 1:]]
            outputs = _copy_into(graph, subgraph, dict(zip(subgraph.graph.find_nodes(op="placeholder"), operands)), attributes)
            env[node] = outputs if isinstance(node.meta.get("val"), (tuple, list)) else outputs[0]
        elif node.target is operator.getitem and isinstance(env.get(node.args[0]), (tuple, list)):
            env[node] = env[node.args[0]][node.args[1]]
        else:
            env[node] = graph.node_copy(node, lambda value: env[value])
            if node.op in ("get_attr", "call_module"):
                env[node].target = f"attribute_{len(attributes)}"
                attributes[env[node].target] = operator.attrgetter(node.target)(gm)
    raise AssertionError("a graph without an output node")
