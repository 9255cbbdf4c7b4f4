"""modpass: task-aware Mixture-of-Depths for any PyTorch transformer, by graph transformation."""

from . import schedules
from .api import (
    declare_position_wise,
    default_task,
    list_blocks,
    prepare_autocast,
    routed_blocks,
    routing_plan_of,
    set_decoding,
    set_ratios,
    transform,
)
from .block import RoutedBlock
from .errors import (
    CaptureError,
    ConfigError,
    ModpassError,
    NoBlocksError,
    PlanError,
    RouterError,
    RoutingInputError,
    UnroutableBlockError,
)
from .flops import FlopReport, dense, flops
from .io import load, save
from .losses import aux_loss
from .passes.find_blocks import BlockInfo
from .plan import BlockPlan, RoutingPlan
from .selection import AttentionRanks, attention_rank

__all__ = [
    "AttentionRanks",
    "BlockInfo",
    "BlockPlan",
    "FlopReport",
    "CaptureError",
    "ConfigError",
    "ModpassError",
    "NoBlocksError",
    "PlanError",
    "RoutedBlock",
    "RouterError",
    "RoutingInputError",
    "RoutingPlan",
    "UnroutableBlockError",
    "attention_rank",
    "aux_loss",
    "declare_position_wise",
    "default_task",
    "dense",
    "flops",
    "list_blocks",
    "load",
    "prepare_autocast",
    "routed_blocks",
    "routing_plan_of",
    "save",
    "schedules",
    "set_decoding",
    "set_ratios",
    "transform",
]
__version__ = "0.1.0"

from .backend import ensure_registered as _ensure_backend_registered  # noqa: E402

_ensure_backend_registered()
