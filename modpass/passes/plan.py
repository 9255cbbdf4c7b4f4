"""Stage 3, ``plan``: decide which blocks are routed, for which task, at what capacity.

Expects: ``gm.meta["modpass_blocks"]`` from ``find_blocks`` and a validated
``RoutingConfig``.
Guarantees: ``gm.meta["modpass_plan"]`` holds a :class:`~modpass.plan.RoutingPlan`
with exact fractional ratios over the blocks inside ``config.within``, indexed
from 0 among those (a vision encoder's blocks do not shift a language model's
indices); the graph is unchanged. Raises ``ConfigError`` for layer indices or
per-block lists that do not fit those blocks, and for a ``within`` that holds none.
"""

from __future__ import annotations

import torch

from ..config import RoutingConfig, resolve_ratios
from ..errors import ConfigError
from ..plan import BlockPlan, RoutingPlan
from ..versions import versions
from .find_blocks import blocks_within


def plan(gm: torch.fx.GraphModule, config: RoutingConfig, model_class: str = "") -> torch.fx.GraphModule:
    blocks = blocks_within(gm.meta["modpass_blocks"], config.within)
    ratios = resolve_ratios(config, len(blocks))
    if not ratios:
        scope = f" inside {config.within!r}" if config.within else ""
        raise ConfigError(
            f"layers={config.layers!r} and the ratios route none of the {len(blocks)} block(s){scope}: every chosen block is "
            "dense for every task (1.0 in a per-block list), or layers= chose none ('every_other' starts at block 1). "
            "Choose blocks with layers=, or lower a ratio."
        )
    gm.meta["modpass_plan"] = RoutingPlan(
        tasks=config.tasks,
        num_blocks=len(blocks),
        blocks=tuple(
            BlockPlan(index=i, path=b.path, block_class=b.block_class, hidden_size=b.hidden_size, ratios=ratios[i])
            for i, b in enumerate(blocks)
            if i in ratios
        ),
        gate=config.gate,
        aux_loss_weight=float(config.aux_loss_weight),
        model_class=model_class,
        versions=versions(),
        within=config.within,
    )
    return gm
