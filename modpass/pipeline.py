"""The modpass pipeline, in order, in one place.

Whole model (``transform``)::

    capture -> find_blocks -> plan -> rewrite (install RoutedBlocks) -> [lower: torch.compile]

Per routed block and call structure (``RoutedBlock``, on first use)::

    capture_block -> token_axes -> token_tables -> token_mixing -> residual_stream -> unbacked_views -> unbacked_attention_masks
    -> mode_regions -> rewrite

Each stage is one file in ``modpass/passes``: a function from a GraphModule to
a GraphModule whose docstring states what it expects and guarantees.
"""

from __future__ import annotations

import torch

from .passes.capture import capture
from .passes.capture_block import capture_block
from .passes.find_blocks import find_blocks
from .passes.mode_regions import mode_regions
from .passes.plan import plan
from .passes.residual_stream import residual_stream
from .passes.rewrite import rewrite
from .passes.token_axes import token_axes
from .passes.token_mixing import token_mixing
from .passes.token_tables import token_tables
from .passes.unbacked_attention_masks import unbacked_attention_masks
from .passes.unbacked_views import unbacked_views

MODEL_STAGES = (capture, find_blocks, plan)
BLOCK_ANALYSIS_STAGES = (capture_block, token_axes, token_tables, token_mixing, residual_stream, unbacked_views, unbacked_attention_masks,
                         mode_regions)
BLOCK_ROUTING_STAGES = (rewrite,)


def capture_block_graph(block: torch.nn.Module, args: tuple, kwargs: dict, *, where: str,
                        dynamic_axes: tuple[tuple[int, ...], ...] | None = None) -> torch.fx.GraphModule:
    """Run the block analysis stages: a checked, annotated graph of one block call."""
    first, *rest = BLOCK_ANALYSIS_STAGES
    gm = first(block, args, kwargs, where=where, dynamic_axes=dynamic_axes)
    for stage in rest:
        gm = stage(gm)
    return gm


def route_block_graph(gm: torch.fx.GraphModule, **options) -> torch.fx.GraphModule:
    """Run the routing stages on an analysed block graph (which they modify)."""
    for stage in BLOCK_ROUTING_STAGES:
        gm = stage(gm, **options)
    return gm
