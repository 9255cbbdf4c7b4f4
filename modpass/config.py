"""User-facing routing settings and their validation.

``RoutingConfig`` is what ``transform`` receives after its arguments are
checked; ``resolve_ratios`` turns it into exact per-(task, block) fractions.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from .errors import ConfigError
from .plan import scope_note
from .routing import GATES

DEFAULT_TASK = "default"
LAYER_PRESETS = ("every_other", "all", "last_half")

Ratio = float | Fraction
RatioSpec = Ratio | Sequence[Ratio] | Callable[[int, int], float]
Layers = str | Sequence[int]


def exact_ratio(value: object, where: str) -> Fraction:
    """A ratio in (0, 1] as the exact fraction the user wrote (0.55 -> 11/20)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Fraction)):
        raise ConfigError(f"{where}: ratio must be a number in (0, 1], got {value!r} ({type(value).__name__}).")
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{where}: ratio is NaN; give a number in (0, 1] such as 0.125.")
    if isinstance(value, float):
        # repr is the shortest decimal that round-trips: the value the user typed.
        value = Fraction(repr(value)) if math.isfinite(value) else value
    if not (0 < value <= 1):
        raise ConfigError(
            f"{where}: ratio {float(value)!r} is outside (0, 1]; it is the fraction of tokens a routed "
            "block processes (1.0 = all, 0.125 = MoD's usual setting)."
        )
    return Fraction(value)


def check_task_name(name: object) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(
            f"task name {name!r} is not a Python identifier; task names become state_dict keys "
            "(mod_routers.<task>.weight), so use letters, digits and underscores."
        )
    return name


@dataclass(frozen=True)
class RoutingConfig:
    """Validated ``transform`` settings.

    ``ratios`` maps each task to a float, a per-block list, or a schedule;
    ``within`` is the module path whose blocks are routed ("" = the whole
    model), and ``layers``, lists and schedules count only its blocks.
    """

    ratios: Mapping[str, RatioSpec]
    layers: Layers = "every_other"
    gate: str = "tanh"
    aux_loss_weight: float = 0.0
    within: str = ""
    tasks: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.ratios:
            raise ConfigError("ratios is empty; give a float such as 0.125 or a dict {task: ratio}.")
        object.__setattr__(self, "tasks", tuple(check_task_name(t) for t in self.ratios))
        if self.gate not in GATES:
            raise ConfigError(f"gate {self.gate!r} is unknown; choose one of {sorted(GATES)}.")
        if not isinstance(self.within, str):
            raise ConfigError(f"within must be a module path such as 'model.language_model', got {type(self.within).__name__}.")
        object.__setattr__(self, "within", self.within.strip("."))
        w = self.aux_loss_weight
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"aux_loss_weight must be a finite number >= 0, got {w!r}.")

    @classmethod
    def from_arguments(cls, ratios: object, **kwargs) -> RoutingConfig:
        if isinstance(ratios, Mapping):
            return cls(ratios=dict(ratios), **kwargs)
        if isinstance(ratios, (numbers.Real, Fraction)) and not isinstance(ratios, bool):
            return cls(ratios={DEFAULT_TASK: ratios}, **kwargs)
        raise ConfigError(
            f"ratios must be a float in (0, 1] or a dict {{task: ratio}}, got {type(ratios).__name__}."
        )


def counted_blocks(num_blocks: int, within: str) -> str:
    """``"the model has 4 blocks"``, naming the module the count is limited to."""
    return f"the model has {num_blocks} blocks{scope_note(within)}"


def resolve_layers(layers: Layers, num_blocks: int, within: str = "") -> list[int]:
    """Block indices chosen by ``layers``, validated against ``num_blocks`` (those inside ``within``)."""
    if isinstance(layers, str):
        if layers == "every_other":
            return list(range(1, num_blocks, 2))
        if layers == "all":
            return list(range(num_blocks))
        if layers == "last_half":
            return list(range(num_blocks // 2, num_blocks))
        raise ConfigError(f"layers={layers!r} is unknown; use one of {LAYER_PRESETS} or a list of block indices.")
    if not isinstance(layers, Sequence) or isinstance(layers, (bytes, bytearray)):
        raise ConfigError(f"layers must be a preset name or a list of block indices, got {type(layers).__name__}.")
    chosen = list(layers)
    if not chosen:
        raise ConfigError("layers is empty; give at least one block index, or 'all'.")
    for i in chosen:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise ConfigError(f"layers contains {i!r}; block indices are integers.")
        if not 0 <= i < num_blocks:
            raise ConfigError(f"block index {i} is out of range: {counted_blocks(num_blocks, within)} (0..{num_blocks - 1}).")
    if len(set(chosen)) != len(chosen):
        dupes = sorted({i for i in chosen if chosen.count(i) > 1})
        raise ConfigError(f"layers lists block(s) {dupes} more than once.")
    return sorted(int(i) for i in chosen)


def resolve_ratios(config: RoutingConfig, num_blocks: int) -> dict[int, dict[str, Fraction | None]]:
    """``{block: {task: ratio or None}}`` for every block routed for at least one task.

    A scalar ratio routes every block chosen by ``layers`` (even at 1.0, so
    full-capacity tests exercise gather and scatter). A per-block list or a
    schedule gives a ratio for every block; an entry of exactly 1.0 there
    means dense for that task at that block (``None`` in the result).
    """
    chosen = set(resolve_layers(config.layers, num_blocks, config.within))
    per_block: dict[int, dict[str, Fraction | None]] = {}
    for task, spec in config.ratios.items():
        if callable(spec):
            values = [spec(i, num_blocks) for i in range(num_blocks)]
            where = f"schedule for task {task!r}"
            switch = True
        elif isinstance(spec, Sequence) and not isinstance(spec, str):
            values = list(spec)
            if len(values) != num_blocks:
                raise ConfigError(
                    f"ratios[{task!r}] has {len(values)} entries but {counted_blocks(num_blocks, config.within)}; "
                    "give one ratio per block (1.0 = dense for this task at that block)."
                )
            where = f"ratios[{task!r}]"
            switch = True
        else:
            values = [spec] * num_blocks
            where = f"ratios[{task!r}]"
            switch = False
        for i, value in enumerate(values):
            ratio = exact_ratio(value, f"{where} at block {i}")
            dense = i not in chosen or (switch and ratio == 1)
            per_block.setdefault(i, {})[task] = None if dense else ratio
    return {i: r for i, r in sorted(per_block.items()) if any(v is not None for v in r.values())}
