"""Choosing what to route: the attention rank (ARank) of each block per task, as γ-MoD and UniMoD measure it.

γ-MoD scores a layer's redundancy by the rank of its attention maps: the map
of each head, kept below its diagonal (lower-triangular, diagonal zeroed),
has a numerical rank, averaged over heads. A layer whose maps have low rank
attends through few independent patterns, and skipping tokens there costs
little. UniMoD computes it per task on about 50 samples of each task and,
for each task, routes the half of the layers with the lowest ARank.

:func:`attention_rank` measures it on any model ``transform`` can route: it
finds the blocks the same way, runs the samples, and reads each block's
self-attention maps where they are made, from ``scaled_dot_product_attention``
(the maps recomputed from its query, key, mask and scale) or from the softmax
of an explicit (eager) attention. :meth:`AttentionRanks.ratios` turns the
ranks into ``transform``'s per-block ratio lists.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import _structure
from .api import list_blocks, refuse_unrunnable
from .block import first_parameter_name
from .config import DEFAULT_TASK, check_task_name
from .errors import ConfigError
from .inputs import call_with, capture_inputs
from .passes.find_blocks import blocks_within
from .progress import Progress

_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax}


def attention_probabilities(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The attention map that ``F.scaled_dot_product_attention`` applies (without dropout), in fp32."""
    query, key = query.float(), key.float()
    if key.dim() >= 3 and key.shape[-3] != query.shape[-3]:  # grouped-query attention: each key head serves a group
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
    scores = query @ key.transpose(-2, -1) * (query.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril(), -math.inf)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else scores + attn_mask.float()
    return scores.softmax(-1).nan_to_num(0.0)  # a row with every key masked attends to nothing


def below_diagonal_ranks(maps: torch.Tensor) -> torch.Tensor:
    """γ-MoD's rank of each map: lower-triangular with the diagonal zeroed, numerical rank in fp32."""
    return torch.linalg.matrix_rank(maps.float().tril(diagonal=-1))


class _AttentionMaps(TorchFunctionMode):
    """Sums, per block, the ranks of the self-attention maps computed while that block runs."""

    def __init__(self) -> None:
        super().__init__()
        self.block: str | None = None
        self.tokens = 0
        self.rank_sums: dict[str, float] = defaultdict(float)
        self.map_counts: dict[str, int] = defaultdict(int)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.block is None:
            return out
        maps = None
        if func is F.scaled_dot_product_attention:
            maps = attention_probabilities(*args, **kwargs)
        elif func in _SOFTMAX and isinstance(out, torch.Tensor) and out.dim() >= 3:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            maps = out if dim in (-1, out.dim() - 1) else None
        # Only a block's self-attention over its own T tokens: cross-attention maps are T x S.
        if maps is not None and tuple(maps.shape[-2:]) == (self.tokens, self.tokens):
            ranks = below_diagonal_ranks(maps.detach())
            self.rank_sums[self.block] += ranks.sum().item() / self.tokens
            self.map_counts[self.block] += ranks.numel()
        return out


@dataclass(frozen=True)
class AttentionRanks:
    """Mean attention rank, as a fraction of the sequence length, of each block per task.

    ``paths`` are the measured blocks in the order ``transform``'s ``layers=``
    counts them inside ``within``; ``ranks[task][i]`` is block ``i``'s mean over
    its heads and the task's sequences of ``rank / T``; ``sequences[task]`` is
    how many sequences were measured.
    """

    paths: tuple[str, ...]
    within: str
    ranks: dict[str, tuple[float, ...]]
    sequences: dict[str, int]

    def ratios(self, fraction: float = 0.5, ratio: float | None = None, min_ratio: float = 0.125) -> dict[str, list[float]]:
        """Per task, ``transform`` ratios that route the ``fraction`` of blocks with the lowest rank (UniMoD's rule).

        A routed block keeps ``ratio`` of its tokens, or by default its own
        normalised rank (rounded up to 1/1000, at least ``min_ratio``): a map
        of rank ``r`` over ``T`` tokens spans ``r`` directions. Other blocks
        get 1.0, dense for that task. Use the result with ``layers="all"`` and
        this ``within``: ``transform(model, ranks.ratios(), layers="all", within=ranks.within)``.
        """
        for name, value, low in (("fraction", fraction, 0), ("min_ratio", min_ratio, 0), ("ratio", ratio, 0)):
            if value is not None and not (isinstance(value, (int, float)) and low < value <= 1):
                raise ConfigError(f"{name} must be a number in (0, 1], got {value!r}.")
        chosen = max(1, round(fraction * len(self.paths)))
        result = {}
        for task, ranks in self.ranks.items():
            per_block = [1.0] * len(self.paths)
            for i in sorted(range(len(ranks)), key=lambda i: (ranks[i], i))[:chosen]:
                per_block[i] = ratio if ratio is not None else min(1.0, max(min_ratio, math.ceil(ranks[i] * 1000) / 1000))
            result[task] = per_block
        return result

    def __str__(self) -> str:
        tasks = list(self.ranks)
        width = max(len(p) for p in self.paths)
        lines = [f"{'block':<{width}}" + "".join(f"{task:>12}" for task in tasks)]
        lines += [f"{path:<{width}}" + "".join(f"{self.ranks[t][i]:>12.3f}" for t in tasks) for i, path in enumerate(self.paths)]
        return "\n".join(lines)


def attention_rank(
    model: nn.Module,
    samples: Mapping[str, Iterable[Any]] | Iterable[Any],
    *,
    within: str | None = None,
    progress: bool | None = None,
) -> AttentionRanks:
    """Measure each block's attention rank per task on ``samples``; see the module docstring.

    Args:
        model: an unrouted model, as given to ``transform``.
        samples: ``{task: inputs}``, or one task's inputs, where inputs are an
            iterable of model calls (a dict of keyword arguments, a tuple of
            positional ones, or one tensor), each a batch of sequences.
            UniMoD uses about 50 sequences per task. The first call is also
            the example ``transform`` would capture the model with.
        within: measure only the blocks inside this module path, as ``transform(within=...)``.
        progress: a bar over the calls, as for ``transform``.

    The model runs in eval mode without gradients and is left as it was.
    """
    refuse_unrunnable(model, "attention_rank")
    by_task = dict(samples) if isinstance(samples, Mapping) else {DEFAULT_TASK: samples}
    if not by_task:
        raise ConfigError("samples is empty; give {task: [model inputs, ...]}.")
    calls, example = {}, None
    for task, inputs in by_task.items():
        inputs = iter(inputs)
        head = next(inputs, None)
        if head is None:
            raise ConfigError(f"samples[{task!r}] has no inputs; give at least one model call per task.")
        calls[check_task_name(task)] = itertools.chain([head], inputs)
        example = head if example is None else example
    within = "" if within is None else within
    blocks = blocks_within(list_blocks(model, example_inputs=example), within)
    modes = {module: module.training for module in model.modules()}
    recorder = _AttentionMaps()

    def enter(module, args, kwargs, path, hidden_name):
        hidden = args[0] if args else kwargs.get(hidden_name)
        recorder.block, recorder.tokens = path, hidden.shape[1]

    def leave(module, args, output):
        recorder.block = None

    handles = []
    for path in (b.path for b in blocks):
        block = model.get_submodule(path)
        start = functools.partial(enter, path=path, hidden_name=first_parameter_name(block))
        handles += [block.register_forward_pre_hook(start, with_kwargs=True), block.register_forward_hook(leave, always_call=True)]
    ranks, sequences = {}, {}
    model.eval()
    try:
        with Progress(progress, "attention_rank", unit="call") as steps, torch.no_grad(), recorder:
            for task, inputs in calls.items():
                recorder.rank_sums.clear()
                recorder.map_counts.clear()
                sequences[task] = 0
                steps.stage(task)
                for call in inputs:
                    call_with(model, capture_inputs(model, call))
                    sequences[task] += batch_size(call)
                    steps.block_done()
                unseen = [b.path for b in blocks if not recorder.map_counts[b.path]]
                if unseen:
                    raise ConfigError(
                        f"no self-attention maps were seen in {unseen[:3]}{'...' if len(unseen) > 3 else ''}: they attend through a "
                        "kernel whose maps modpass cannot read. Load the model with attn_implementation='sdpa' or 'eager'."
                    )
                ranks[task] = tuple(recorder.rank_sums[b.path] / recorder.map_counts[b.path] for b in blocks)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return AttentionRanks(paths=tuple(b.path for b in blocks), within=within, ranks=ranks, sequences=sequences)


def batch_size(call: Any) -> int:
    """The number of sequences in a model call: the first axis of its first tensor that has one."""
    return next((t.shape[0] for t in _structure.tensors(call) if t.dim()), 1)
