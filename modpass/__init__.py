"""modpass: task-aware Mixture-of-Depths for any PyTorch transformer, by graph transformation."""

from .api import routed_blocks, routing_plan_of, transform
from .block import RoutedBlock
from .errors import (
    CaptureError,
    ConfigError,
    ModpassError,
    NoBlocksError,
    PlanError,
    RoutingInputError,
    UnroutableBlockError,
)
from .plan import BlockPlan, RoutingPlan

__all__ = [
    "BlockPlan",
    "CaptureError",
    "ConfigError",
    "ModpassError",
    "NoBlocksError",
    "PlanError",
    "RoutedBlock",
    "RoutingInputError",
    "RoutingPlan",
    "UnroutableBlockError",
    "routed_blocks",
    "routing_plan_of",
    "transform",
]
__version__ = "0.1.0"
