"""``save`` / ``load``: a routing plan and its router weights, nothing else.

A saved directory holds exactly two files:

* ``plan.json``: the :class:`~modpass.plan.RoutingPlan` (tasks, exact ratios
  per block, gate, aux-loss weight, block paths and classes, versions);
* ``routers.safetensors``: the router weights, under the routed model's own
  ``state_dict`` names (``<block>.mod_routers.<task>.weight`` / ``.bias``).

No pickle is involved anywhere. ``load`` checks ``plan.json`` as ``transform``
checks its arguments, then both files against each other and against the base
model, before changing anything.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .api import apply_plan, deep_copy, refuse_unrunnable, require_module, routed_blocks, routing_plan_of
from .errors import ConfigError, PlanError, RouterError
from .inputs import capture_inputs
from .passes.capture import capture
from .passes.find_blocks import find_blocks
from .plan import RoutingPlan, in_scope, scope_note
from .progress import Progress
from .routing import is_tensor_subclass

PLAN_FILE = "plan.json"
ROUTER_FILE = "routers.safetensors"


def router_names(plan: RoutingPlan) -> dict[str, tuple[int, ...]]:
    """Expected router tensors of ``plan``: ``{state_dict name: shape}``."""
    names = {}
    for block in plan.blocks:
        for task in block.routed_tasks():
            names[f"{block.path}.mod_routers.{task}.weight"] = (1, block.hidden_size)
            names[f"{block.path}.mod_routers.{task}.bias"] = (1,)
    return names


def save(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model``'s routing plan and router weights to ``directory``; returns the path."""
    plan = routing_plan_of(require_module(model, "save"))
    if plan is None:
        raise ConfigError("save() takes a model routed by modpass.transform or modpass.load.")
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"save() writes a directory ({PLAN_FILE} and {ROUTER_FILE}), but {path} is a file; give a directory path.")
    blocks = routed_blocks(model)
    unsaved = sorted(f"{name}.mod_routers.{task}" for name, block in blocks.items()
                     for task in block.mod_routers if task not in plan.block(name).routed_tasks())
    if unsaved:
        warnings.warn(
            f"modpass.save: {unsaved[:3]}{'...' if len(unsaved) > 3 else ''} route tasks that set_ratios made dense there; the "
            "plan keeps dense blocks without routers, so these are not saved. Route them again before saving to keep them.",
            stacklevel=2,
        )
    path.mkdir(parents=True, exist_ok=True)
    # Read from the routers routed calls read (behind a PEFT wrapper, the trained copy), under the plan's names.
    tensors = {f"{block.path}.mod_routers.{task}.{name}": getattr(blocks[block.path].router(task), name).detach().cpu().contiguous()
               for block in plan.blocks for task in block.routed_tasks() for name in ("weight", "bias")}
    subclassed = [name for name, tensor in tensors.items() if is_tensor_subclass(tensor)]
    if subclassed:
        raise RouterError(
            f"modpass.save: {subclassed[0]} is a {type(tensors[subclassed[0]]).__name__}, not a plain tensor, which "
            "safetensors cannot write. A quantized router: save before quantizing, or quantize without the routers "
            "(torchao's quantize_(model, config, filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) "
            "and 'mod_routers' not in name)). A sharded one (a DTensor): save a model whose parameters are whole."
        )
    save_file(tensors, str(path / ROUTER_FILE), metadata={"format": "modpass-routers"})
    (path / PLAN_FILE).write_text(plan.to_json())
    return path


def read(directory: str | os.PathLike) -> tuple[RoutingPlan, dict[str, torch.Tensor]]:
    """The plan and router tensors saved in ``directory``, checked against each other."""
    if not isinstance(directory, (str, os.PathLike)):
        raise PlanError(f"a saved plan is the directory modpass.save wrote, given as a str or path; got {type(directory).__name__}.")
    path = Path(directory)
    if path.is_file():
        raise PlanError(f"{path} is a file; a saved plan is the directory modpass.save wrote, which holds {PLAN_FILE} and "
                        f"{ROUTER_FILE} ({path.parent}, if that is where they are).")
    for name in (PLAN_FILE, ROUTER_FILE):
        if not (path / name).is_file():
            raise PlanError(f"{path} has no {name}; it is not a directory written by modpass.save.")
    try:
        text = (path / PLAN_FILE).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError(f"{path / PLAN_FILE} is not UTF-8 text ({exc}); it is not a plan written by modpass.save.") from exc
    plan = RoutingPlan.from_json(text, source=str(path / PLAN_FILE))
    try:
        tensors = load_file(str(path / ROUTER_FILE))
    except Exception as exc:  # safetensors raises its own error types
        raise PlanError(f"{path / ROUTER_FILE} is not a readable safetensors file: {exc}") from exc
    expected = router_names(plan)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [n for n in expected if n in tensors and tuple(tensors[n].shape) != expected[n]]
    if missing or unexpected or wrong:
        raise PlanError(
            f"{path}: router weights do not match plan.json (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {wrong[:3]}); save the model again with modpass.save."
        )
    return plan, tensors


def check_plan_fits(plan: RoutingPlan, model: torch.nn.Module, example_inputs) -> dict:
    """Raise ``PlanError`` unless ``model`` has the blocks ``plan`` routes; returns the traced block calls."""
    gm = find_blocks(capture(model, example_inputs))
    blocks = [b for b in gm.meta["modpass_blocks"] if in_scope(b.path, plan.within)]
    if len(blocks) != plan.num_blocks:
        raise PlanError(f"the plan was made for a model with {plan.num_blocks} blocks{scope_note(plan.within)}; this {type(model).__name__} has {len(blocks)}.")
    by_path = {b.path: (i, b) for i, b in enumerate(blocks)}
    for block in plan.blocks:
        index, found = by_path.get(block.path, (None, None))
        if found is None:
            raise PlanError(f"the plan routes block {block.path!r}, which this {type(model).__name__} does not have (its blocks: {list(by_path)[:4]}...).")
        if index != block.index:
            # set_ratios and per-block lists count blocks by index: a wrong one would route another block than meant.
            raise PlanError(
                f"the plan gives block {block.path!r} index {block.index}, but it is block {index}{scope_note(plan.within)} "
                f"of this {type(model).__name__}; save the routed model again with modpass.save."
            )
        if found.block_class != block.block_class or found.hidden_size != block.hidden_size:
            raise PlanError(
                f"block {block.path!r} is a {found.block_class} of width {found.hidden_size} here, but the plan "
                f"was made for a {block.block_class} of width {block.hidden_size}."
            )
    return gm.meta["modpass_traced_calls"]


def load(
    base_model: torch.nn.Module,
    directory: str | os.PathLike,
    *,
    inplace: bool = False,
    example_inputs: Mapping[str, Any] | tuple | None = None,
    progress: bool | None = None,
) -> torch.nn.Module:
    """Rebuild the routed model saved in ``directory`` from a fresh ``base_model``.

    ``progress`` shows a bar per routed block as ``transform`` does (``None``:
    on a terminal only).
    """
    refuse_unrunnable(base_model, "load")
    if routing_plan_of(base_model) is not None:
        raise ConfigError("load() takes the original (unrouted) model; this one is already routed.")
    plan, tensors = read(directory)
    with Progress(progress, "load") as steps:
        target = base_model if inplace else deep_copy(base_model, "load")
        inputs = capture_inputs(target, example_inputs)
        steps.stage(f"capturing {type(base_model).__name__}")
        traced_calls = check_plan_fits(plan, target, inputs)
        routed = apply_plan(target, plan, inputs, traced_calls, steps)
    routed.load_state_dict(tensors, strict=False)
    return routed
