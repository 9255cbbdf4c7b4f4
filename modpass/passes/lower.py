"""Stage 5, ``lower``: hand a graph with routed regions to Inductor.

Expects: a Dynamo graph (torch IR) of a model whose routed blocks were traced
through modpass's routing functions.
Guarantees: ``gm.meta["modpass_routed_regions"]`` lists, per routed block, the
number of graph nodes created by the routing math (router, selection,
gathers, gate, scatter), so tests and tools can check that every region
reached the compiler; the graph is otherwise unchanged and is then compiled
by ``compile_fx`` (Triton kernels on GPU, C++ on CPU).

modpass adds no lowering of its own; instead the routing math
(``modpass/routing.py``) is written in the forms Inductor lowers well: the
gathers fuse into the block's first normalisation, the gated update into
the write-back, and the write-back is an ``index_put`` that Inductor's
reinplacing turns into an in-place store of the k selected rows wherever
the block's input is dead; in the backward, the gathered rows' gradient is
accumulated in place into the write-back's (``routing.take_tokens``), so no
zero-filled ``(B, T, D)`` buffer is added to it. Where the form that suits Inductor is not the
one that suits eager execution, the routing function picks it while Dynamo
traces it (``routing.COMPILED_FORMS``): the router's one-column ``Linear``
becomes a row reduction (one bandwidth-bound kernel instead of a library
GEMV, and the gate's logits fuse into the gather-and-normalise kernel).
The one hand-written kernel is selection on CUDA
(``modpass/kernels/selection.py``), a Triton op that Inductor calls from its
own generated code. On CPU the remaining routing glue is 1-2% of a dense
block; on an H200, 2.6-3.7% of the dense G1 block's kernel time, the
largest part that selection kernel (see docs/benchmarks.md).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from .. import routing
from .._compat import compile_fx

_ROUTING_FILE = str(Path(routing.__file__).resolve())


def routed_regions(gm: torch.fx.GraphModule) -> dict[str, int]:
    regions: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function" and _ROUTING_FILE in (node.meta.get("stack_trace") or ""):
            stack = node.meta.get("nn_module_stack") or {}
            path = list(stack.values())[-1][0] if stack else ""
            regions[path] += 1
    return dict(regions)


def lower(gm: torch.fx.GraphModule, example_inputs, config_patches: dict):
    gm.meta["modpass_routed_regions"] = routed_regions(gm)
    return compile_fx(gm, example_inputs, config_patches)
