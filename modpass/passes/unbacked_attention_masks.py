"""Block stage 7, ``unbacked_attention_masks``: masked CPU attention that compiles with a data-dependent batch.

Expects: an analysed block graph (``capture_block`` onward) whose nodes carry ``val`` metadata.
Guarantees: on a torch whose CPU attention cannot be traced with such a batch
(``_compat.CPU_ATTENTION_GUARDS_ON_MASK_BATCH``: releases before 2.13), every
``aten.scaled_dot_product_attention`` call on CPU tensors with a mask calls
``_compat.masked_attention_while_compiling`` instead, with the same arguments: the aten op
itself in eager mode, and under torch.compile the flash attention kernel that op would
choose. Nothing else changes, and on newer releases nothing at all.

Why: under torch.compile a task's group of a mixed batch has a data-dependent number of
rows, and so has the attention mask gathered for it. While Dynamo traces it, CPU attention
chooses its kernel by checking the mask's shape, and asking whether the mask's batch size
is 1 fails for such a size (pytorch#181084). Hugging Face models pass a 4-D mask to every
layer when compiled, so a mixed-task batch given as task ids could not compile on those
releases, route masks or not.
"""

from __future__ import annotations

import torch

from .. import _compat
from .._subgraphs import graphs
from .token_mixing import named_arguments

# The aten op itself (token_mixing.ATTENTION names every attention kernel, for refusals).
SDPA = torch.ops.aten.scaled_dot_product_attention.default


def unbacked_attention_masks(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    if not _compat.CPU_ATTENTION_GUARDS_ON_MASK_BATCH:
        return gm
    for graph in graphs(gm):  # attention under autocast too
        for node in graph.nodes:
            if node.op != "call_function" or node.target is not SDPA:
                continue
            arguments = named_arguments(node)
            query = arguments["query"].meta.get("val")
            if arguments.get("attn_mask") is not None and isinstance(query, torch.Tensor) and query.device.type == "cpu":
                node.target = _compat.masked_attention_while_compiling
        graph.owning_module.recompile()
    return gm
