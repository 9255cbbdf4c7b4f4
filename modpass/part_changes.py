"""Routed blocks notice when a part of theirs is replaced or added after routing.

A routed call runs a graph captured from the block: a module put into the
block later (PEFT's LoRA layers wrap its projections, bitsandbytes swaps its
``Linear`` layers, a user replaces its MLP) would never run, and where the new
module still answers for the old one's ``weight`` (PEFT's layers do), the
graph would go on with the old computation, silently. torch calls a global hook
whenever any module registers a submodule (:func:`torch.nn.modules.module.register_module_module_registration_hook`);
modpass's hook marks the routed blocks that hold the changed module, and each
captures its graphs again on its next call (``RoutedBlock.recapture``).
A parameter set anew is a change where the graphs could not take it as they
took the old one: another tensor class (torchao's ``quantize_`` swaps weights
for quantized tensor subclasses, whose operations a capture traces), dtype,
shape or device. One like the old (``load_state_dict(assign=True)``) is none:
the graphs take the block's parameters as inputs at every call.

A module replaced as a direct child of the routed block goes to the block it
routes as well, which modpass captures and runs for ``modpass.dense``: the two
share their children. A module put in place by writing ``module._modules[name]``
(torch.ao's ``prepare_qat`` and ``quantize_dynamic``) runs no hook; a routed block
compares its parts with those it noted at each call instead (``RoutedBlock.parts_swapped``).

PEFT's adapter layers also carry Python state that their forward reads and a
capture bakes in (``disable_adapter()``, ``set_adapter``, merges): a routed block
compares it at each call (``RoutedBlock.adapter_state``), and the attention
implementation its transformers configs name (``set_attn_implementation()``)
too. Other Python state a part reads (a flag set on a module) is not seen.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

#: Each module inside a routed block -> the routed blocks holding it (weakly): a module two blocks share (tied MLPs)
#: changes both.
_routed_blocks_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_routed_blocks: weakref.WeakSet = weakref.WeakSet()
_hooks: list[torch.utils.hooks.RemovableHandle] = []


def watch(routed_block: nn.Module) -> None:
    """Mark ``routed_block`` (a ``RoutedBlock``) changed when any module inside the block it routes registers a
    submodule, or a parameter its graphs could not take."""
    if not _hooks:
        _hooks.append(torch.nn.modules.module.register_module_module_registration_hook(_on_registration))
        _hooks.append(torch.nn.modules.module.register_module_parameter_registration_hook(_on_parameter))
    _routed_blocks.add(routed_block)
    for part in routed_block._block.modules():
        _routed_blocks_of.setdefault(part, weakref.WeakSet()).add(routed_block)


def _on_registration(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    if torch.compiler.is_compiling():
        # Model code registers modules while compiled (transformers slices its ModuleList of layers, which builds a
        # new one); those are no changes, and reading the registries here would make Dynamo guard on them.
        return
    if module._modules.get(name) is submodule:  # registered again where it is (module walks re-set every child)
        return
    if module in _routed_blocks:  # a routed block's own child (not its routers): its block's as well
        if name in module._block._modules:
            setattr(module._block, name, submodule)  # which comes back here, as a change of the block
        return
    _mark_changed(module)


def _on_parameter(module: nn.Module, name: str, parameter: nn.Parameter) -> None:
    if torch.compiler.is_compiling():
        return
    old = module._parameters.get(name)  # the hook runs before the assignment
    if old is None or any(getattr(old, a) != getattr(parameter, a) for a in ("__class__", "dtype", "shape", "device")):
        _mark_changed(module)


def _mark_changed(part: nn.Module) -> None:
    for routed_block in _routed_blocks_of.get(part, ()):
        routed_block.__dict__["_parts_changed"] = True
