"""One exception hierarchy for every refusal modpass makes.

Every message says what was wrong, where, and how to fix it. Subclasses also
derive from the builtin a caller would naturally catch (``ValueError`` for bad
arguments), so ``except ValueError`` keeps working for generic code.
"""

from __future__ import annotations


class ModpassError(Exception):
    """Base class of every error modpass raises on purpose."""


class ConfigError(ModpassError, ValueError):
    """A transform argument (ratios, layers, gate, ...) is invalid."""


class CaptureError(ModpassError):
    """The model (or one of its blocks) could not be traced into an FX graph."""


class NoBlocksError(ModpassError):
    """No repeated residual blocks were found in the captured graph."""


class UnroutableBlockError(ModpassError):
    """A block mixes tokens in a way that cannot be routed safely."""


class RoutingInputError(ModpassError, ValueError):
    """A routed model was called with inputs it cannot route (task, masks, caches)."""


class PlanError(ModpassError):
    """A saved routing plan does not fit the model it is applied to."""


class RouterError(ModpassError):
    """A routed block's router was wrapped or hooked in a way that routed calls, which read its weight and bias, would leave out."""
