"""The routing plan: the single source of truth for a routed model.

``transform`` builds it, the routed blocks read it, ``save``/``load`` write
and read it as JSON, and the compile backend applies it. It names blocks by
their module path, so it can be checked against any model before use.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from .errors import PlanError

PLAN_FORMAT = 1


def in_scope(path: str, within: str) -> bool:
    """Whether the module at ``path`` lies inside the module at ``within`` ("" = the whole model)."""
    return not within or path == within or path.startswith(within + ".")


def scope_note(within: str) -> str:
    """``" in 'model.language_model'"`` for messages that count blocks inside ``within``; "" for the whole model."""
    return f" in {within!r}" if within else ""


@dataclass(frozen=True)
class BlockPlan:
    """Routing of one block: its place in the model and a ratio per task (None = dense)."""

    index: int
    path: str
    block_class: str
    hidden_size: int
    ratios: dict[str, Fraction | None]

    def routed_tasks(self) -> list[str]:
        return [t for t, r in self.ratios.items() if r is not None]


@dataclass(frozen=True)
class RoutingPlan:
    tasks: tuple[str, ...]
    num_blocks: int
    blocks: tuple[BlockPlan, ...]
    gate: str = "tanh"
    aux_loss_weight: float = 0.0
    model_class: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    # The module whose blocks the plan counts (``transform(within=...)``); ``num_blocks`` and the
    # blocks' indices count only those.
    within: str = ""

    def block(self, path: str) -> BlockPlan:
        for b in self.blocks:
            if b.path == path:
                return b
        raise KeyError(path)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data["format"] = PLAN_FORMAT
        data["tasks"] = list(self.tasks)
        data["blocks"] = [
            {**asdict(b), "ratios": {t: None if r is None else f"{r.numerator}/{r.denominator}" for t, r in b.ratios.items()}}
            for b in self.blocks
        ]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> RoutingPlan:
        try:
            if data.get("format") != PLAN_FORMAT:
                raise PlanError(f"plan format {data.get('format')!r} is not supported (expected {PLAN_FORMAT}).")
            blocks = tuple(
                BlockPlan(
                    index=int(b["index"]),
                    path=str(b["path"]),
                    block_class=str(b["block_class"]),
                    hidden_size=int(b["hidden_size"]),
                    ratios={t: None if r is None else Fraction(r) for t, r in b["ratios"].items()},
                )
                for b in data["blocks"]
            )
            return cls(
                tasks=tuple(data["tasks"]),
                num_blocks=int(data["num_blocks"]),
                blocks=blocks,
                gate=str(data["gate"]),
                aux_loss_weight=float(data["aux_loss_weight"]),
                model_class=str(data.get("model_class", "")),
                versions=dict(data.get("versions", {})),
                within=str(data.get("within", "")),
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise PlanError(f"routing plan is malformed ({type(exc).__name__}: {exc}); re-save it with modpass.save.") from exc

    @classmethod
    def from_json(cls, text: str) -> RoutingPlan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PlanError(f"routing plan is not valid JSON: {exc}") from exc
