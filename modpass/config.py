"""User-facing routing settings and their validation.

``RoutingConfig`` is what ``transform`` receives after its arguments are
checked; ``resolve_ratios`` turns it into exact per-(task, block) fractions.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

from torch import nn

from .errors import ConfigError
from .plan import scope_note
from .routing import GATES

DEFAULT_TASK = "default"
LAYER_PRESETS = ("every_other", "all", "last_half")

Ratio = float | numbers.Real
RatioSpec = Ratio | Sequence[Ratio] | Callable[[int, int], float]
Layers = str | Sequence[int]


#: Float noise is a few ulps (2^-52 relative: ``0.1 * 3``, ``0.5 * cos(2 * pi / 3) + 0.5``); a float this close
#: (relative, a few hundred ulps) to a fraction of denominator <= SNAP_DENOMINATOR is read as that fraction. Fractions
#: of such denominators lie >= 10^-12 apart, so at most one is that close, and a decimal of up to 7 digits lies
#: >= 10^-13 from every one but itself: it is never snapped away from what was typed.
FLOAT_NOISE = Fraction(1, 2**44)
SNAP_DENOMINATOR = 10**6


def exact_ratio(value: object, where: str) -> Fraction:
    """A ratio in (0, 1] as an exact fraction: rationals and Decimals as given, floats without their noise.

    A float (a numpy float, any real number) is read as the decimal it prints (0.55 -> 11/20), or, within
    :data:`FLOAT_NOISE` of a fraction of denominator up to :data:`SNAP_DENOMINATOR`, as that fraction:
    ``0.1 * 3`` (0.30000000000000004) is 3/10, where ``k = ceil(ratio * T)`` would otherwise take a token more
    wherever ``ratio * T`` is a whole number.
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Decimal)):
        raise ConfigError(f"{where}: ratio must be a number in (0, 1], got {value!r} ({type(value).__name__}).")
    if isinstance(value, numbers.Integral):
        ratio = Fraction(int(value))
    elif isinstance(value, numbers.Rational):
        ratio = Fraction(int(value.numerator), int(value.denominator))
    elif isinstance(value, Decimal) and value.is_finite():
        ratio = Fraction(value)
    else:
        x = float(value)
        if math.isnan(x):
            raise ConfigError(f"{where}: ratio is NaN; give a number in (0, 1] such as 0.125.")
        if not isinstance(value, float):
            # A numpy float32/float16 holds 0.1 as 0.10000000149..., far outside the window: read the shortest
            # decimal it prints (numpy's repr at its own precision), as a float typed so would be.
            with contextlib.suppress(ValueError):  # a number type that prints otherwise (or inf): its float value
                x = float(Fraction(str(value)))
        ratio = None
        if 0 < x < math.inf:  # snapped before the range check: 3 * 0.1 / 0.3 is 1.0000000000000002
            exact = Fraction(x)
            near = exact.limit_denominator(SNAP_DENOMINATOR)
            # repr is the shortest decimal that round-trips: the value the user typed.
            ratio = near if abs(near - exact) <= exact * FLOAT_NOISE else Fraction(repr(x))
    if ratio is None or not (0 < ratio <= 1):
        raise ConfigError(
            f"{where}: ratio {value} is outside (0, 1]; it is the fraction of tokens a routed "
            "block processes (1.0 = all, 0.125 = MoD's usual setting)."
        )
    return ratio


#: The container of a routed block's routers (``RoutedBlock.mod_routers``), keyed by task: it refuses a key that
#: names one of its attributes ("training", "forward", "keys", "_modules", ...) with a KeyError.
ROUTER_CONTAINER = nn.ModuleDict()


def check_task_name(name: object) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(
            f"task name {name!r} is not a Python identifier; task names become state_dict keys "
            "(mod_routers.<task>.weight), so use letters, digits and underscores."
        )
    # What add_module refuses: hasattr on an empty container finds exactly its (and nn.Module's) attributes.
    if hasattr(ROUTER_CONTAINER, name):
        raise ConfigError(
            f"task name {name!r} is an attribute of nn.ModuleDict, which holds each routed block's routers by task "
            f"(mod_routers.<task>) and cannot take a key that shadows one; rename the task (e.g. {name.strip('_')}_task)."
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
        if not isinstance(self.gate, str) or self.gate not in GATES:
            raise ConfigError(f"gate {self.gate!r} is unknown; choose one of {sorted(GATES)} (a string).")
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
        if isinstance(ratios, (numbers.Real, Decimal)) and not isinstance(ratios, bool):
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


def resolve_ratios(config: RoutingConfig, num_blocks: int, *, routed: bool = False) -> dict[int, dict[str, Fraction | None]]:
    """``{block: {task: ratio or None}}`` for every block routed for at least one task.

    A scalar ratio routes every block chosen by ``layers`` (even at 1.0, so
    full-capacity tests exercise gather and scatter). A per-block list or a
    schedule gives a ratio for every block; an entry of exactly 1.0 there
    means dense for that task at that block (``None`` in the result), and an
    entry below 1.0 at a block ``layers`` does not choose is refused: it
    would be dropped, silently. ``routed``: ``layers`` are the blocks a
    routed model has (``set_ratios``), which only a new transform changes.
    """
    chosen = set(resolve_layers(config.layers, num_blocks, config.within))
    per_block: dict[int, dict[str, Fraction | None]] = {}
    for task, spec in config.ratios.items():
        if callable(spec):
            check_schedule(spec, task)
            values = [spec(i, num_blocks) for i in range(num_blocks)]
            where = f"the schedule for task {task!r}"
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
        elif isinstance(spec, (numbers.Real, Decimal)):
            values = [spec] * num_blocks
            where = f"ratios[{task!r}]"
            switch = False
        else:
            raise ConfigError(
                f"ratios[{task!r}] is {spec!r} ({type(spec).__name__}); give a number in (0, 1], a list with one "
                "ratio per block (list(array) for a numpy array), or a schedule from modpass.schedules."
            )
        ratios = [exact_ratio(value, f"{where} at block {i}") for i, value in enumerate(values)]
        dropped = [i for i, ratio in enumerate(ratios) if switch and i not in chosen and ratio != 1]
        if dropped:
            i = dropped[0]
            also = f" (and below 1.0 at blocks {dropped[1:]})" if dropped[1:] else ""
            scope = scope_note(config.within)
            if routed:
                problem = f"this model routes only blocks {sorted(chosen)}{scope}: set_ratios changes the capacities of routed blocks"
                fix = f"Transform the original model again with block {i} in layers= to route it there"
            else:
                problem = (f"layers={config.layers!r} does not route block {i}{scope} (it routes {sorted(chosen)}), so that "
                           "ratio would be ignored")
                fix = f"Pass layers='all' (or a list of block indices that includes {i}) to route it"
            raise ConfigError(f"{where} gives {values[i]} at block {i}{also}, but {problem}. {fix}, or give 1.0 at block {i} "
                              "(dense for this task).")
        for i, ratio in enumerate(ratios):
            dense = i not in chosen or (switch and ratio == 1)
            per_block.setdefault(i, {})[task] = None if dense else ratio
    return {i: r for i, r in sorted(per_block.items()) if any(v is not None for v in r.values())}


def check_schedule(schedule: Callable, task: str) -> None:
    """Refuse a schedule that cannot be called as ``schedule(block_index, num_blocks)``, before calling it: a
    TypeError from inside a schedule that can is its own bug, and left alone."""
    try:
        inspect.signature(schedule).bind(0, 1)
    except TypeError:
        raise ConfigError(
            f"the schedule for task {task!r} ({schedule!r}) cannot be called as schedule(block_index, num_blocks); "
            "a schedule maps those two integers to a ratio in (0, 1], as modpass.schedules' do "
            "(lambda i, n: 0.5 if i >= n // 2 else 1.0)."
        ) from None
    except ValueError:  # no signature to read (a builtin): call it and see
        pass
