"""Stage 1, ``capture``: trace the whole model into an FX graph.

Expects: an ``nn.Module`` and example inputs (positional tuple or keyword dict).
Guarantees: a ``GraphModule`` (from non-strict ``torch.export``) whose nodes
carry ``nn_module_stack`` (clean module paths and classes) and ``val`` fake
tensors whose sizes are symbols wherever the model allows them to vary.
Every tensor dimension larger than 1 is exported as ``Dim.AUTO``, so the
sequence length becomes a symbol when the model lets it vary, and sizes that
merely happen to be equal are never unified.

The model is not modified.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

from ..errors import CaptureError


def auto_dynamic_shapes(tree):
    """``Dim.AUTO`` for every dimension > 1 of every tensor leaf (size-1 axes stay static)."""
    return pytree.tree_map(
        lambda x: {i: Dim.AUTO for i, s in enumerate(x.shape) if s > 1} if isinstance(x, torch.Tensor) else None,
        tree,
    )


def first_user_frame(exc: BaseException) -> str:
    """Where in model code an exception arose (the last frame outside torch)."""
    import traceback

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


def capture(model: torch.nn.Module, example_inputs) -> torch.fx.GraphModule:
    """Export ``model`` on ``example_inputs`` with symbolic sizes; see the module docstring."""
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
        dynamic_shapes = {k: auto_dynamic_shapes(v) for k, v in kwargs.items()}
    else:
        args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        kwargs = {}
        dynamic_shapes = tuple(auto_dynamic_shapes(a) for a in args)
    try:
        program = export_quietly(model, args, kwargs, dynamic_shapes)
    except Exception as exc:  # torch raises many unrelated types here
        raise CaptureError(
            f"could not capture {type(model).__name__} with torch.export (non-strict): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (at {first_user_frame(exc)}). "
            "modpass needs a model whose forward traces with symbolic sizes: data-dependent Python "
            "control flow on tensor values must be replaced by tensor ops (torch.where, torch.cond), "
            "and example_inputs must match how the model is called."
        ) from exc
    return program.module()
