"""Block stage 6, ``unbacked_views``: views that torch 2.6's Inductor would misread get a contiguous input.

Expects: an analysed block graph (``capture_block`` onward) whose nodes carry ``val`` metadata.
Guarantees: on a torch whose Inductor misreads such views
(``_compat.INDUCTOR_MISREADS_UNBACKED_VIEWS``: releases before 2.7), every view or reshape
of a tensor that is not contiguous reads ``_compat.contiguous_while_compiling(tensor)``:
a contiguous copy under torch.compile, the tensor itself in eager mode. Nothing else
changes, and on newer releases nothing at all.

Why: under torch.compile a routed block runs with sizes that depend on data (a task's
rows of a mixed batch are split in the graph, so the group's batch is one; under a route
mask the slot count is another), and torch 2.6's Inductor gives the view of a
non-contiguous tensor with such a size contiguous strides (pytorch#143498, fixed in 2.7
by #145548). nanoGPT's ``q.view(B, T, heads, -1)`` of a ``split`` then reads other
elements than eager mode does and nothing fails. Copying first is what the fix does.
"""

from __future__ import annotations

import torch

from .. import _compat
from .._subgraphs import graphs
from .capture_block import RESHAPES


def unbacked_views(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    if not _compat.INDUCTOR_MISREADS_UNBACKED_VIEWS:
        return gm
    for graph in graphs(gm):  # views under no_grad or autocast too
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in RESHAPES:
                continue
            source = node.args[0]
            value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
            if not isinstance(value, torch.Tensor) or _known_contiguous(value):
                continue
            with graph.inserting_before(node):
                copy = graph.call_function(_compat.contiguous_while_compiling, (source,))
            copy.meta.update(source.meta)
            node.replace_input_with(source, copy)
        graph.owning_module.recompile()
    return gm


def _known_contiguous(value: torch.Tensor) -> bool:
    """Contiguous for every value of its symbolic sizes (an undecided stride counts as not)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(value.is_contiguous())
