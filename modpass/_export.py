"""torch.export plumbing shared by the whole-model and per-block capture stages."""

from __future__ import annotations

import contextlib
import functools
import logging
import traceback
import warnings
from collections.abc import Iterable, Iterator

import sympy
import torch
from torch.export import Dim
from torch.nn.utils import prune

from . import _structure
from ._compat import size_hints


def symbolic_axes(value: torch.Tensor) -> tuple[int, ...]:
    """The axes of a traced (fake) tensor whose sizes are symbolic."""
    return tuple(axis for axis, size in enumerate(value.shape) if isinstance(size, torch.SymInt) and size.node.expr.free_symbols)


@contextlib.contextmanager
def first_calls(modules: Iterable[tuple[str, torch.nn.Module]]) -> Iterator[dict[str, tuple[tuple, dict]]]:
    """While open, record the ``(args, kwargs)`` of each named module's first call, by its name."""
    calls: dict[str, tuple[tuple, dict]] = {}

    def remember(module, args, kwargs, path):
        # Returns None: a pre-hook's return value would replace the arguments of this and every later call.
        calls.setdefault(path, (args, dict(kwargs)))

    handles = [module.register_forward_pre_hook(functools.partial(remember, path=path), with_kwargs=True) for path, module in modules]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


# An nn.Module's per-call hooks (those this torch has): a routed block takes over its block's, and a block capture
# silences them all.
CALL_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
              "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


@contextlib.contextmanager
def hooks_silenced(module: torch.nn.Module) -> Iterator[None]:
    """While open, ``module`` and its submodules run none of their hooks.

    A capture calls them with fake tensors, which hooks that record outputs
    (transformers' ``output_attentions`` recorder, a user's) would keep.
    """
    saved = [(m, name, vars(m)[name]) for m in module.modules() for name in CALL_HOOKS if vars(m).get(name)]
    for m, name, hooks in saved:
        m.__dict__[name] = type(hooks)()
    try:
        yield
    finally:
        for m, name, hooks in saved:
            m.__dict__[name] = hooks


@contextlib.contextmanager
def tensor_attributes_detached(module: torch.nn.Module) -> Iterator[None]:
    """While open, the tensors ``module`` and its submodules hold as plain attributes (neither parameters nor buffers)
    are detached. torch's pruning keeps a pruned weight as one, ``weight_orig * weight_mask`` with its autograd graph:
    export lifts it as a constant and reads its ``.grad``, which warns for a tensor that is not a leaf."""
    saved = [(m, name, value) for m in module.modules() for name, value in vars(m).items()
             if isinstance(value, torch.Tensor) and value.grad_fn is not None]
    for m, name, value in saved:
        m.__dict__[name] = value.detach()
    try:
        yield
    finally:
        for m, name, value in saved:
            m.__dict__[name] = value


def resolve(module: torch.nn.Module, target: str):
    """The attribute at ``target``, a dotted path from ``module`` (an exported program's parameter, buffer or constant
    target)."""
    for part in target.split("."):
        module = getattr(module, part)
    return module


def pruning_of(module: torch.nn.Module, target: str) -> tuple[torch.nn.Module, prune.BasePruningMethod] | None:
    """The layer that holds the attribute at ``target`` and the pruning method that sets it (``weight``, pruned by
    ``torch.nn.utils.prune``: ``weight_orig * weight_mask``, set by a forward pre-hook before each call), or None."""
    owner_path, _, name = target.rpartition(".")
    try:
        owner = resolve(module, owner_path) if owner_path else module
    except AttributeError:  # a constant the module's code made (a torch.tensor literal), lifted under a name of export's
        return None
    for hook in getattr(owner, "_forward_pre_hooks", {}).values():
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name:
            return owner, hook
    return None


def first_user_frame(exc: BaseException) -> str:
    """Where in model code an exception arose (the last frame outside torch)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "inside torch"


def export_quietly(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes) -> torch.export.ExportedProgram:
    export_log = logging.getLogger("torch._export.non_strict_utils")
    level = export_log.level
    export_log.setLevel(logging.ERROR)
    try:
        with torch.enable_grad():
            return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    finally:
        export_log.setLevel(level)


def tensor_attributes(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``module`` and its submodules hold as plain attributes or buffers, by path."""
    found = {}
    for path, m in module.named_modules():
        prefix = f"{path}." if path else ""
        held = {**{name: value for name, value in vars(m).items() if isinstance(value, torch.Tensor)}, **m._buffers}
        found.update({prefix + name: value for name, value in held.items() if value is not None})
    return found


class Assignments:
    """The tensor attributes a call assigned (``self.stash = attention.detach()``, a buffer replaced), by path; not a
    container, so that export's restore of the module's attributes after tracing keeps what it holds. (A block capture
    silences hooks, so pruning's, which set the pruned weight at every call, assign nothing there.)"""

    def __init__(self):
        self.paths: list[str] = []

    def note(self, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
        self.paths = [path for path, value in after.items() if before.get(path) is not value]


class FlatCall(torch.nn.Module):
    """Calls ``module`` with its original argument structure, taking only the tensor leaves.

    Exporting this wrapper gives one placeholder per tensor leaf, whatever
    mix of positional, keyword, nested or ``**kwargs`` arguments the call used.
    """

    PREFIX = "module."

    def __init__(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        super().__init__()
        self.module = module
        self.structure = (args, kwargs)
        self.assignments = Assignments()

    def forward(self, *tensors):
        args, kwargs = _structure.replace(self.structure, list(tensors))
        before = tensor_attributes(self.module)
        output = self.module(*args, **kwargs)
        self.assignments.note(before, tensor_attributes(self.module))
        return output

    @classmethod
    def wrap(cls, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[FlatCall, tuple]:
        _structure.signature((args, kwargs))  # refuses leaves that are not tensors or constants
        return cls(module, args, kwargs), tuple(_structure.tensors((args, kwargs)))

    def export(self, tensors: tuple, dynamic_axes: tuple[tuple[int, ...], ...] | None = None) -> torch.export.ExportedProgram:
        """Export the call; ``dynamic_axes`` names each leaf's symbolic axes (default: every axis > 1; size-1 axes stay static)."""
        if dynamic_axes is None:
            dynamic_axes = tuple(tuple(axis for axis, size in enumerate(t.shape) if size > 1) for t in tensors)
        with warnings.catch_warnings():
            # Export restores the tensor attributes a call assigned, and says so. Those are torch's pruning hooks
            # (which a block capture follows) or, in a block, refused by capture_block (see `assignments`).
            warnings.filterwarnings("ignore", message="The tensor attributes? .* (was|were) assigned during export")
            return export_quietly(self, tensors, {}, (tuple({axis: Dim.AUTO for axis in axes} for axes in dynamic_axes),))


def condition_failing_for_fewer(size: torch.SymInt) -> tuple[sympy.Basic, str, int] | None:
    """A condition the traced code assumed about ``size`` (a guard, or a runtime assert, of its shape environment) that
    fails for a smaller value of it, from 2 (export's least) up: ``(condition, where the code assumed it, the value)``.

    A routed block runs on k of T tokens, and a mixed batch on groups of fewer rows, where the branch the code took
    may not hold (``if T > 8``, ``if T % 8 == 0``); an upper bound (``T <= max_positions``) holds. Only conditions on
    ``size`` alone are judged: one relating it to other sizes (a mask's batch that ``B`` divides, a table's length)
    holds or fails with how those sizes follow it, which the traced values cannot tell. Disequalities are skipped
    too: torch's reference ops assume sizes differ all through a trace (``T - 1 != 1`` in a contiguity check), where
    the graph holds either way; a branch the code took on ``T != n`` is then not seen.
    """
    symbol = size.node.expr
    if not isinstance(symbol, sympy.Symbol):
        return None
    shape_env = size.node.shape_env
    hints = size_hints(shape_env)
    largest = int(hints[symbol])
    samples = sorted({*range(2, min(largest, 64) + 1), *(largest >> shift for shift in range(largest.bit_length() - 1)), largest})
    conditions = [(guard.expr, str(guard.sloc).strip("()")) for guard in shape_env.guards]
    conditions += [(check.expr, check.msg) for checks in shape_env.deferred_runtime_asserts.values() for check in checks]
    for condition, location in conditions:
        if condition.free_symbols != {symbol} or isinstance(condition, sympy.Ne):
            continue  # torch's own assumptions that sizes differ (T - 1 != 1 in a contiguity check), not the code's
        failing = next((n for n in samples if not holds(condition.xreplace({**hints, symbol: sympy.Integer(n)}))), None)
        if failing is not None:
            return condition, location, failing
    return None


def holds(condition: sympy.Basic) -> bool:
    try:
        return bool(condition)
    except TypeError:  # not decided by the numbers: treat as failing
        return False
