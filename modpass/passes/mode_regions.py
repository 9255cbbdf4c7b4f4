"""Block stage 8, ``mode_regions``: code run under ``torch.no_grad()`` or ``torch.autocast`` runs in a ``with``
statement.

Expects: an analysed block graph (``capture_block`` onward), in which export keeps the code a block runs under
``torch.no_grad()`` (or ``set_grad_enabled``) or ``torch.autocast`` as a subgraph that a higher-order op calls
(``wrap_with_set_grad_enabled``, ``wrap_with_autocast``).
Guarantees: each such call is a call of the Python function that does the same
(:data:`modpass._subgraphs.IN_PYTHON`: a ``with`` statement around a call of the subgraph), with the same
arguments: the same ops in the same modes, eagerly and traced. :func:`modpass._subgraphs.inlined` reads it in line
as it read the higher-order op, so the stage after this one (``rewrite``) sees what the analyses saw. Nothing else
changes.

Why: Dynamo, tracing a routed forward with dynamic shapes (``dynamic=True``, or its automatic dynamic after a
recompile for another length), refuses these higher-order ops where their subgraph takes a symbolic size
("unexpected freevars", torch 2.6 to 2.13), so such blocks compiled with static shapes only; ``with`` statements
it traces itself.
"""

from __future__ import annotations

import torch

from .._subgraphs import IN_PYTHON, graphs


def mode_regions(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    for graph in graphs(gm):  # nested regions too
        calls = [node for node in graph.nodes if node.op == "call_function" and node.target in IN_PYTHON]
        for node in calls:
            node.target = IN_PYTHON[node.target]
        if calls:
            graph.owning_module.recompile()
    return gm
