"""torch.export plumbing shared by the whole-model and per-block capture stages."""

from __future__ import annotations

import contextlib
import functools
import logging
import pickle
import random
import sys
import threading
import traceback
from collections.abc import Iterable, Iterator

import sympy
import torch
from torch.export import Dim
from torch.nn.utils import prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

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


def set_weight_name(hook) -> str | None:
    """The name of the weight that ``hook``, a forward pre-hook, sets before each call of its layer, where modpass can
    take that weight itself: torch's pruning (``weight_orig * weight_mask``) and the older ``torch.nn.utils.weight_norm``
    (``g * v / |v|``) and ``spectral_norm`` (``weight_orig / sigma``). None for any other hook."""
    if isinstance(hook, prune.BasePruningMethod):
        return hook._tensor_name
    if isinstance(hook, (WeightNorm, SpectralNorm)):
        return hook.name
    return None


def weight_hook_of(module: torch.nn.Module, target: str) -> tuple[torch.nn.Module, object] | None:
    """The layer that holds the attribute at ``target`` and the forward pre-hook that sets it (see
    :func:`set_weight_name`), or None."""
    owner_path, _, name = target.rpartition(".")
    try:
        owner = resolve(module, owner_path) if owner_path else module
    except AttributeError:  # a constant the module's code made (a torch.tensor literal), lifted under a name of export's
        return None
    for hook in getattr(owner, "_forward_pre_hooks", {}).values():
        if set_weight_name(hook) == name:
            return owner, hook
    return None


def hooked_weight(module: torch.nn.Module, target: str) -> torch.Tensor:
    """The weight at ``target`` as its layer's forward would read it, which a forward pre-hook sets before each call
    (see :func:`set_weight_name`). A routed call runs the block's captured graph, not the parts' hooks, so the weight
    is taken here, with autograd, as the hook takes it: training reaches ``weight_orig`` or ``weight_g`` and
    ``weight_v``, and spectral norm takes its step of power iteration in training, as in a dense call."""
    owner, hook = weight_hook_of(module, target)
    if isinstance(hook, prune.BasePruningMethod):
        return hook.apply_mask(owner)
    if isinstance(hook, SpectralNorm):
        return hook.compute_weight(owner, do_power_iteration=owner.training)
    return hook.compute_weight(owner)


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
    """What a call wrote to its module's attributes, by path: the tensor attributes it assigned (``self.stash =
    attention.detach()``, a buffer replaced) and the Python state it wrote (see :class:`PythonState`); and the global
    random generators outside torch it drew from (see :class:`RandomStates`). Not a container, so that export's
    restore of the module's attributes after tracing keeps what it holds. (A block capture silences hooks, so those
    that set a weight at every call (see :func:`set_weight_name`) assign nothing there.)"""

    def __init__(self):
        self.paths: list[str] = []
        self.state: list[str] = []
        self.draws: list[str] = []

    def note(self, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], state: list[str], draws: list[str]) -> None:
        self.paths = [path for path, value in after.items() if before.get(path) is not value]
        self.state = state
        self.draws = draws


class RandomStates:
    """The states of the global random generators outside torch (Python's ``random``; numpy's, where numpy is loaded),
    so that the generators a call then draws from can be named (:meth:`drawn`) and put back (:meth:`restore`).

    A graph holds torch's draws (``torch.rand``), which it makes again at every call; a draw from these generators
    (a LayerDrop written ``random.random() < p``) is a constant there, one outcome repeated at every routed call."""

    def __init__(self):
        self.generators = {"random": (random.getstate, random.setstate)}
        if "numpy" in sys.modules:
            numpy_random = sys.modules["numpy"].random
            self.generators["numpy.random"] = (numpy_random.get_state, numpy_random.set_state)
        self.states = {name: get() for name, (get, _) in self.generators.items()}

    def drawn(self) -> list[str]:
        # Pickled, since numpy's state holds an array, which == compares element by element.
        return [name for name, (get, _) in self.generators.items() if pickle.dumps(get()) != pickle.dumps(self.states[name])]

    def restore(self) -> None:
        for name, (_, set_state) in self.generators.items():
            set_state(self.states[name])


# What torch keeps in every module's __dict__ (its parameters, buffers, submodules, hooks and training flag), and the
# hooks a lazy module drops once its first call has set its shapes: torch's bookkeeping, not the model's state.
MODULE_BOOKKEEPING = frozenset(vars(torch.nn.Module())) | {"_initialize_hook", "_load_hook"}
# Values a forward may write again at every call, the same each time (a flag, a name, a device): compared by value.
PLAIN_VALUES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


class PythonState:
    """The attributes ``module`` and its submodules hold (torch's bookkeeping aside), with the contents of each list,
    dict and set among them, so that what one call then writes there can be named (:meth:`written`, which leaves
    tensor attributes to :class:`Assignments`) and undone (:meth:`restore`).

    A routed block runs its captured graph, not this Python, so what its forward writes there would go stale. And a
    traced call writes traced values there (fake tensors, symbolic sizes), which export puts back only in part (not a
    new attribute, nor a set's contents); torch's pruning hooks assign a traced weight at each call, which export would
    warn of.
    """

    def __init__(self, module: torch.nn.Module):
        self.modules = list(module.named_modules())
        self.held = self.attributes()
        self.contents = {path: _contents(value) for path, (_, _, value) in self.held.items() if isinstance(value, (list, dict, set))}

    def attributes(self) -> dict[str, tuple[torch.nn.Module, str, object]]:
        return {
            f"{path}.{name}" if path else name: (m, name, value)
            for path, m in self.modules
            for name, value in vars(m).items()
            if name not in MODULE_BOOKKEEPING
        }

    def written(self) -> list[str]:
        """The non-tensor attributes the call assigned or deleted and the containers it changed, by path (``calls
        assigned``, ``cache['h'] assigned``, ``log (a list) changed``)."""
        now = self.attributes()
        written = [f"{path} deleted" for path in self.held.keys() - now.keys()]
        for path, (_, _, value) in now.items():
            if isinstance(value, torch.Tensor):
                continue
            if path not in self.held or not _unchanged(self.held[path][2], value):
                written.append(f"{path} assigned")
            elif isinstance(value, dict):
                before = self.contents[path]
                keys = [*before, *(key for key in value if key not in before)]
                written += [f"{path}[{key!r}] {'assigned' if key in value else 'deleted'}" for key in keys
                            if key not in before or key not in value or not _unchanged(before[key], value[key])]
            elif path in self.contents and not _same_contents(self.contents[path], value):
                written.append(f"{path} (a {type(value).__name__}) changed")
        return written

    def restore(self) -> None:
        for path, (m, name, _) in self.attributes().items():
            if path not in self.held:
                del m.__dict__[name]
        for m, name, value in self.held.values():
            m.__dict__[name] = value
        for path, contents in self.contents.items():
            value = self.held[path][2]
            if not _same_contents(contents, value):
                value.clear()
                if isinstance(value, list):
                    value.extend(contents)
                else:
                    value.update(contents)


def _contents(container: list | dict | set) -> list | dict | set:
    return list(container) if isinstance(container, list) else dict(container) if isinstance(container, dict) else set(container)


def _unchanged(before, after) -> bool:
    return after is before or (type(after) is type(before) and isinstance(after, PLAIN_VALUES) and after == before)


def _same_contents(before: list | dict | set, after: list | dict | set) -> bool:
    if isinstance(after, set):
        return before == after
    if isinstance(after, dict):
        return before.keys() == after.keys() and all(_unchanged(before[key], after[key]) for key in before)
    return len(before) == len(after) and all(map(_unchanged, before, after))


# The function of torch's own lookup of parameters, buffers and children, which reads a module's __dict__ for them:
# taken before torch.fx's tracer wraps it.
_MODULE_GETATTR_CODE = torch.nn.Module.__getattr__.__code__
# Per watched module (by id), the names of the attributes read on it (see AttributeReads); how many watches are open
# (in any thread), which keep nn.Module.__getattribute__ replaced.
_READS: dict[int, set[str]] = {}
_WATCHES = 0
_WATCHES_LOCK = threading.Lock()


def _recording_getattribute(module: torch.nn.Module, name: str):
    reads = _READS.get(id(module))
    if reads is not None and (name != "__dict__" or sys._getframe(1).f_code is not _MODULE_GETATTR_CODE):
        reads.add(name)
    return object.__getattribute__(module, name)


class AttributeReads:
    """The names of the attributes read on a module and its submodules while :meth:`watching` them, by path
    (``by_path``; ``"__dict__"`` among a module's where code read its ``__dict__``, so any of its attributes). None where
    a submodule's class defines ``__getattribute__``, which then cannot be watched. Not a container (see
    :class:`Assignments`).

    ``nn.Module.__getattribute__`` is replaced while open, so every attribute read on any module goes through Python:
    open it around one call only."""

    def __init__(self):
        self.by_path: dict[str, frozenset[str]] | None = None

    @contextlib.contextmanager
    def watching(self, module: torch.nn.Module) -> Iterator[None]:
        global _WATCHES
        modules = list(module.named_modules(remove_duplicate=False))
        watched = {id(m): set() for _, m in modules}
        with _WATCHES_LOCK:
            if _WATCHES == 0:
                torch.nn.Module.__getattribute__ = _recording_getattribute
            _WATCHES += 1
            _READS.update(watched)
        watchable = all(type(m).__getattribute__ is _recording_getattribute for _, m in modules)
        try:
            yield
        finally:
            with _WATCHES_LOCK:
                for key in watched:
                    _READS.pop(key, None)
                _WATCHES -= 1
                if _WATCHES == 0:
                    del torch.nn.Module.__getattribute__
        if watchable:
            self.by_path = {path: frozenset(watched[id(m)]) for path, m in modules}


class FlatCall(torch.nn.Module):
    """Calls ``module`` with its original argument structure, taking only the tensor leaves.

    Exporting this wrapper gives one placeholder per tensor leaf, whatever
    mix of positional, keyword, nested or ``**kwargs`` arguments the call used.
    """

    PREFIX = "module."

    def __init__(self, module: torch.nn.Module, args: tuple, kwargs: dict, *, watch_reads: bool = False):
        super().__init__()
        self.module = module
        self.structure = (args, kwargs)
        self.assignments = Assignments()
        #: The attributes the call read on the module, where asked for (see :class:`AttributeReads`).
        self.reads = AttributeReads() if watch_reads else None

    def forward(self, *tensors):
        args, kwargs = _structure.replace(self.structure, list(tensors))
        before, state, generators = tensor_attributes(self.module), PythonState(self.module), RandomStates()
        try:
            with self.reads.watching(self.module) if self.reads is not None else contextlib.nullcontext():
                output = self.module(*args, **kwargs)
            self.assignments.note(before, tensor_attributes(self.module), state.written(), generators.drawn())
        finally:
            state.restore()
            generators.restore()
        return output

    @classmethod
    def wrap(cls, module: torch.nn.Module, args: tuple, kwargs: dict, *, watch_reads: bool = False) -> tuple[FlatCall, tuple]:
        _structure.signature((args, kwargs))  # refuses leaves that are not tensors or constants
        # One tensor passed twice (``block(x, x)``, x as its own cross-attention memory) gets a copy the second time:
        # export would trace both through one placeholder, with the same symbolic sizes, so the second argument would
        # carry the tokens and be gathered with them, and the graph kept for the call structure would tie the two in
        # later calls with distinct tensors too. What the graph computes must not depend on which tensors are one.
        tensors, seen = [], set()
        for tensor in _structure.tensors((args, kwargs)):
            tensors.append(tensor.clone() if id(tensor) in seen else tensor)
            seen.add(id(tensor))
        return cls(module, args, kwargs, watch_reads=watch_reads), tuple(tensors)

    def export(self, tensors: tuple, dynamic_axes: tuple[tuple[int, ...], ...] | None = None) -> torch.export.ExportedProgram:
        """Export the call; ``dynamic_axes`` names each leaf's symbolic axes (default: every axis > 1; size-1 axes stay static)."""
        if dynamic_axes is None:
            dynamic_axes = tuple(tuple(axis for axis, size in enumerate(t.shape) if size > 1) for t in tensors)
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
