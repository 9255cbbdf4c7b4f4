"""The routing plan: the single source of truth for a routed model.

``transform`` builds it, the routed blocks read it, ``save``/``load`` write
and read it as JSON, and the compile backend applies it. It names blocks by
their module path, so it can be checked against any model before use.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, NoReturn

from .errors import ConfigError, PlanError

PLAN_FORMAT = 1


def in_scope(path: str, within: str) -> bool:
    """Whether the module at ``path`` lies inside the module at ``within`` ("" = the whole model)."""
    return not within or path == within or path.startswith(within + ".")


def scope_note(within: str) -> str:
    """``" in 'model.language_model'"`` for messages that count blocks inside ``within``; "" for the whole model."""
    return f" in {within!r}" if within else ""


class ReadOnlyDict(dict):
    """A dict that refuses changes: the plan's mappings, which the routed blocks built their graphs from, so an edit
    would reach ``save`` but not the routing. Still a dict for ``json``, ``asdict``, pickle, deepcopy and Dynamo."""

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise PlanError(
            "a routing plan is read-only: the routed blocks were built from it, so an edit would reach modpass.save "
            "but not the routing. Change capacities with modpass.set_ratios(model, ...), or build a new plan with "
            "dataclasses.replace(plan, ...)."
        )

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self) -> tuple:
        # The default rebuilds a dict subclass item by item through __setitem__, which refuses.
        return type(self), (dict(self),)


@dataclass(frozen=True)
class BlockPlan:
    """Routing of one block: its place in the model and a ratio per task (None = dense)."""

    index: int
    path: str
    block_class: str
    hidden_size: int
    ratios: Mapping[str, Fraction | None]

    def __post_init__(self) -> None:
        from .config import exact_ratio  # config.py imports this module

        # Read as transform reads a ratio, so that a plan built by hand (dataclasses.replace(block, ratios={"a":
        # 0.25})) holds exact fractions too, which serialise, and refuses what transform refuses.
        try:
            ratios = {task: None if r is None else exact_ratio(r, f"{self.path}: task {task!r}") for task, r in self.ratios.items()}
        except ConfigError as exc:
            raise PlanError(str(exc)) from exc
        object.__setattr__(self, "ratios", ReadOnlyDict(ratios))

    def routed_tasks(self) -> list[str]:
        return [t for t, r in self.ratios.items() if r is not None]

    @property
    def where(self) -> str:
        """This block in messages and progress output."""
        return f"block {self.index} ({self.path})"


@dataclass(frozen=True)
class RoutingPlan:
    tasks: tuple[str, ...]
    num_blocks: int
    blocks: tuple[BlockPlan, ...]
    gate: str = "tanh"
    aux_loss_weight: float = 0.0
    model_class: str = ""
    versions: Mapping[str, str] = field(default_factory=dict)
    # The module whose blocks the plan counts (``transform(within=...)``); ``num_blocks`` and the
    # blocks' indices count only those.
    within: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "versions", ReadOnlyDict(self.versions))

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
        data["versions"] = dict(self.versions)
        data["blocks"] = [
            {**asdict(b), "ratios": {t: None if r is None else f"{r.numerator}/{r.denominator}" for t, r in b.ratios.items()}}
            for b in self.blocks
        ]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: object, source: str = "routing plan") -> RoutingPlan:
        """The plan ``data`` describes, checked as ``transform`` checks its arguments; ``PlanError`` naming the field
        and ``source`` (the file it was read from) where a value is missing, malformed or one ``transform`` refuses."""
        try:
            return parse_plan(data)
        except ConfigError as exc:
            raise PlanError(f"{source}: {exc} Correct it there, or save the routed model again with modpass.save.") from exc
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise PlanError(f"{source} is malformed ({type(exc).__name__}: {exc}); save the routed model again with modpass.save.") from exc

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "routing plan") -> RoutingPlan:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{source} is not valid JSON ({exc}); save the routed model again with modpass.save.") from exc
        return cls.from_dict(data, source)


PLAN_FIELDS = ("tasks", "num_blocks", "blocks", "gate", "aux_loss_weight")
BLOCK_FIELDS = ("index", "path", "block_class", "hidden_size", "ratios")


def refuse(where: str, problem: str) -> NoReturn:
    raise ConfigError(f"{where}: {problem}.")


def parse_plan(data: object) -> RoutingPlan:
    """``RoutingPlan.from_dict`` without the file's name: ``ConfigError`` naming the field at fault."""
    # config.py imports this module (scope_note), so its checks are imported when they run.
    from .config import RoutingConfig, exact_ratio, resolve_layers

    def ratio(value: Any, where: str) -> Fraction | None:
        """A saved ratio (``"1/8"`` as save writes it, a number, or null = dense) as ``transform`` would take it."""
        if isinstance(value, str):
            try:
                value = Fraction(value)
            except (ValueError, ZeroDivisionError):
                refuse(where, f'{value!r} is not a ratio; write one such as "1/8" (or null for dense)')
        return None if value is None else exact_ratio(value, where)

    if not isinstance(data, Mapping):
        refuse("the plan", f"expected a JSON object, got {type(data).__name__}")
    if data.get("format") != PLAN_FORMAT:
        refuse("format", f"plan format {data.get('format')!r} is not supported (expected {PLAN_FORMAT})")
    if missing := [k for k in PLAN_FIELDS if k not in data]:
        refuse("the plan", f"fields {missing} are missing")
    tasks, blocks, num_blocks, versions = data["tasks"], data["blocks"], data["num_blocks"], data.get("versions", {})
    if not isinstance(tasks, list) or not tasks:
        refuse("tasks", f"expected a non-empty list of task names, got {tasks!r}")
    # transform's checks of its arguments: task names, gate, aux_loss_weight and within.
    config = RoutingConfig(ratios=dict.fromkeys(tasks, 1), gate=data["gate"], aux_loss_weight=data["aux_loss_weight"],
                           within=data.get("within", ""))
    if len(config.tasks) != len(tasks):
        refuse("tasks", f"{tasks} names a task more than once")
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        refuse("num_blocks", f"expected a positive integer, got {num_blocks!r}")
    if not isinstance(versions, Mapping):
        refuse("versions", f"expected a JSON object, got {type(versions).__name__}")
    if not isinstance(blocks, list) or not blocks:
        refuse("blocks", f"expected a non-empty list of routed blocks, got {blocks!r:.80}")
    parsed = []
    for i, block in enumerate(blocks):
        where = f"blocks[{i}]"
        if not isinstance(block, Mapping):
            refuse(where, f"expected a JSON object, got {type(block).__name__}")
        if missing := [k for k in BLOCK_FIELDS if k not in block]:
            refuse(where, f"fields {missing} are missing")
        for name in ("path", "block_class"):
            if not isinstance(block[name], str) or not block[name]:
                refuse(f"{where}.{name}", f"expected a module path or class name, got {block[name]!r}")
        hidden = block["hidden_size"]
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            refuse(f"{where}.hidden_size", f"expected a positive integer, got {hidden!r}")
        ratios = block["ratios"]
        # Every task has an entry at every block (null where dense), as transform and set_ratios write them.
        if not isinstance(ratios, Mapping) or set(ratios) != set(config.tasks):
            refuse(f"{where}.ratios", f"expected a ratio or null for each of the plan's tasks {tasks}, got {ratios!r:.120}")
        parsed.append((block, {t: ratio(ratios[t], f"{where}.ratios[{t!r}]") for t in config.tasks}))
    paths = [block["path"] for block, _ in parsed]
    if dupes := sorted({p for p in paths if paths.count(p) > 1}):
        refuse("blocks", f"{dupes} are listed more than once")
    try:  # the indices as transform's layers= takes them: integers in range, each once
        resolve_layers([block["index"] for block, _ in parsed], num_blocks, config.within)
    except ConfigError as exc:
        refuse("blocks[].index", str(exc).rstrip("."))
    return RoutingPlan(
        tasks=config.tasks,
        num_blocks=num_blocks,
        blocks=tuple(
            BlockPlan(index=int(b["index"]), path=b["path"], block_class=b["block_class"], hidden_size=b["hidden_size"], ratios=r)
            for b, r in parsed
        ),
        gate=config.gate,
        aux_loss_weight=float(config.aux_loss_weight),
        model_class=str(data.get("model_class", "")),
        versions={str(k): str(v) for k, v in versions.items()},
        within=config.within,
    )
