"""Argument structures of block calls, in a form both eager code and Dynamo trace.

A block call ``(args, kwargs)`` is a tree of tuples, lists and dicts whose
leaves are tensors or plain constants. :func:`signature` gives a hashable
description (tensor dtypes, devices, which axes have size 1, constant values),
:func:`tensors` the tensor leaves in a fixed order, and :func:`replace` the
same tree with new tensors. These are deliberately small recursive functions
rather than ``torch.utils._pytree``, so that ``torch.compile(fullgraph=True)``
can run the routed block's dispatch without graph breaks.
"""

from __future__ import annotations

import torch

from ._compat import known_to_be_one
from .errors import RoutingInputError

CONSTANTS = (type(None), bool, int, float, str, torch.dtype, torch.device)
#: Symbolic scalars and the constants they stand for.
SYMBOLIC = {torch.SymInt: int, torch.SymFloat: float, torch.SymBool: bool}


class Slot:
    """Marks where output number ``index`` goes in an output template.

    A plain class, not an ``int`` subclass: Dynamo (torch 2.11) cannot trace ``int()`` of one.
    """

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def signature(tree, path: str = "") -> tuple:
    if isinstance(tree, torch.Tensor):
        # A data-dependent size (a task's group in a mixed batch under compile)
        # counts as not 1, as Dynamo's dynamic sizes do.
        return ("tensor", tree.dtype, tree.device.type, tuple(known_to_be_one(s) for s in tree.shape))
    if isinstance(tree, (tuple, list)):
        # A literal tag, not type(tree).__name__: Dynamo (torch 2.11) cannot hash the latter in a cache key.
        kind = "tuple" if isinstance(tree, tuple) else "list"
        return (kind, tuple(signature(item, f"{path}[{i}]") for i, item in enumerate(tree)))
    if isinstance(tree, dict):
        return ("dict", tuple((key, signature(value, f"{path}[{key!r}]")) for key, value in tree.items()))
    if isinstance(tree, CONSTANTS):
        return ("constant", tree)
    if type(tree) in SYMBOLIC:
        # A size handed to a block (BEiT's `resolution=pixel_values.shape[2:]`) is a constant of its captured
        # graph: reading its value makes Dynamo guard on it, so another value is another structure.
        return ("constant", SYMBOLIC[type(tree)](tree))
    raise RoutingInputError(
        f"argument {path or '<root>'} is a {type(tree).__name__}; routed blocks take tensors, plain flags and a "
        "transformers cache by its own name (cache=, past_key_values=) only. Call the model without it (for a "
        "cache, use_cache=False, a routed model's default)."
    )


def tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for item in tree for t in tensors(item)]
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in tensors(value)]
    return []


def replace(tree, new: list):
    """``tree`` with its tensor leaves replaced, in order, by ``new`` (consumed from the front)."""
    if isinstance(tree, torch.Tensor):
        return new.pop(0)
    if isinstance(tree, (tuple, list)):
        return type(tree)(replace(item, new) for item in tree)
    if isinstance(tree, dict):
        return {key: replace(value, new) for key, value in tree.items()}
    return tree


def realize(tree):
    """``tree`` with fake (traced) tensors replaced by real zero tensors of the same metadata, symbolic sizes by their values."""
    if isinstance(tree, torch.Tensor):
        sizes = [s.node.hint if isinstance(s, torch.SymInt) else int(s) for s in tree.shape]
        return torch.zeros(sizes, dtype=tree.dtype, device=tree.device)
    if type(tree) in SYMBOLIC:
        return SYMBOLIC[type(tree)](tree.node.hint)
    if isinstance(tree, (tuple, list)):
        return type(tree)(realize(item) for item in tree)
    if isinstance(tree, dict):
        return {key: realize(value) for key, value in tree.items()}
    return tree


def collect(template, tree) -> dict[int, object]:
    """The leaves of ``tree`` by the :class:`Slot` of ``template`` they fill: the inverse of :func:`fill`."""
    if isinstance(template, Slot):
        return {template.index: tree}
    if isinstance(template, (tuple, list)):
        return {index: leaf for item, subtree in zip(template, tree) for index, leaf in collect(item, subtree).items()}
    if isinstance(template, dict):
        return {index: leaf for key, item in template.items() for index, leaf in collect(item, tree[key]).items()}
    return {}


def fill(template, outputs: list):
    """Rebuild an output structure from a template whose leaves are :class:`Slot` markers."""
    if isinstance(template, Slot):
        return outputs[template.index]
    if isinstance(template, (tuple, list)):
        return type(template)(fill(item, outputs) for item in template)
    if isinstance(template, dict):
        return {key: fill(value, outputs) for key, value in template.items()}
    return template
