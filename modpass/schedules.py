"""Per-block capacity schedules from the MoD literature.

A schedule maps ``(block_index, num_blocks)`` to a ratio in (0, 1]. Use one as
``transform(model, {"task": schedule}, layers="all")``; a ratio of exactly 1.0
from a schedule or a per-block list means "dense for this task at this block"
(UniMoD's layer switch), and one below 1.0 at a block ``layers`` does not
route is refused. Every schedule here works for any depth.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .config import exact_ratio
from .errors import ConfigError


def check_count(schedule: str, name: str, value: object, least: int) -> None:
    """Refuse a block count or index that is not an integer >= ``least`` (a period of 0 would divide by zero)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ConfigError(f"{schedule}: {name} must be an integer >= {least}, got {value!r}.")


@dataclass(frozen=True)
class Constant:
    """The same ratio at every block (MoD's setting, usually 0.125), so with ``layers="all"``: a ratio below 1.0 at
    a block ``layers`` leaves out is refused."""

    ratio: float

    def __post_init__(self) -> None:
        exact_ratio(self.ratio, "Constant")

    def __call__(self, index: int, num_blocks: int) -> float:
        return self.ratio


@dataclass(frozen=True)
class Interleaved:
    """``ratio`` on every ``period``-th block starting at ``offset``, dense elsewhere.

    ``Interleaved(0.125)`` is MoD's best configuration: blocks 1, 3, 5, ...
    """

    ratio: float
    period: int = 2
    offset: int = 1

    def __post_init__(self) -> None:
        exact_ratio(self.ratio, "Interleaved")
        check_count("Interleaved", "period", self.period, 1)
        check_count("Interleaved", "offset", self.offset, 0)

    def __call__(self, index: int, num_blocks: int) -> float:
        return self.ratio if index % self.period == self.offset % self.period else 1.0


@dataclass(frozen=True)
class LastN:
    """``ratio`` on the last ``n`` blocks, dense before (UniMoD: last 12 of Show-o's 24)."""

    ratio: float
    n: int

    def __post_init__(self) -> None:
        exact_ratio(self.ratio, "LastN")
        check_count("LastN", "n", self.n, 0)

    def __call__(self, index: int, num_blocks: int) -> float:
        return self.ratio if index >= num_blocks - self.n else 1.0


@dataclass(frozen=True)
class ShiftedCosine:
    """p-MoD's progressive ratio decay, for any depth.

    ``R_l = 0.5 * cos(pi * l / (L - 1)) + 0.5``; blocks with ``R_l > dense_above``
    stay dense and the others use ``max(R_l, floor)``. With p-MoD's defaults
    (0.85, 0.15) a 32-block model keeps blocks 0-7 dense, as in the paper.
    """

    dense_above: float = 0.85
    floor: float = 0.15

    def __post_init__(self) -> None:
        exact_ratio(self.floor, "ShiftedCosine: floor")
        d = self.dense_above
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0 <= d <= 1:
            raise ConfigError(f"ShiftedCosine: dense_above must be a number in [0, 1] (1 = never dense), got {d!r}.")

    def __call__(self, index: int, num_blocks: int) -> float:
        if num_blocks == 1:
            return 1.0
        r = 0.5 * math.cos(math.pi * index / (num_blocks - 1)) + 0.5
        return 1.0 if r > self.dense_above else max(r, self.floor)
