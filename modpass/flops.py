"""FLOP accounting for routed models: dense vs routed, per block and per task.

``torch.utils.flop_counter`` misses the CPU attention kernels
(``_scaled_dot_product_flash_attention_for_cpu`` and its backward), which
is what SDPA runs on CPU; :func:`register_cpu_attention_flops` adds them with
torch's own SDPA formulas. Counts follow the counter's convention (a
multiply-add is 2 FLOPs, attention counted over the full T x T even when
causal).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch.utils import flop_counter

from .api import require_module, routed_blocks, routed_model, routing_plan_of, routing_state, side_effects_undone
from .errors import ConfigError
from .inputs import call_with, capture_inputs

_aten = torch.ops.aten


def register_cpu_attention_flops() -> None:
    """Teach FlopCounterMode the CPU flash-attention ops (idempotent)."""
    forward = _aten._scaled_dot_product_flash_attention_for_cpu
    backward = _aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(forward, get_raw=True)
        def _forward(query, key, value, *args, out_val=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query.shape, *_per_query_head(query, key, value))

    if backward not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(backward, get_raw=True)
        def _backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out.shape, query.shape, *_per_query_head(query, key, value))


def _per_query_head(query, *tensors) -> list[tuple]:
    """The shapes of grouped keys and values as if repeated for every query head, the work the kernel does
    (torch before 2.13 counts only equal heads and refuses grouped-query attention)."""
    return [(*t.shape[:-3], query.shape[-3], *t.shape[-2:]) for t in tensors]


@dataclass
class FlopReport:
    """Forward FLOPs of a routed model: ``blocks[path][task] = (dense, routed)``."""

    blocks: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    total: dict[str, tuple[int, int]] = field(default_factory=dict)

    def ratio(self, task: str) -> float:
        dense, routed = self.total[task]
        return routed / dense

    def __str__(self) -> str:
        tasks = list(self.total)
        lines = [f"{'block':<28}" + "".join(f"{t + ' dense':>16}{t + ' routed':>16}{'saved':>8}" for t in tasks)]
        for path, per_task in self.blocks.items():
            cells = "".join(f"{d:>16,}{r:>16,}{1 - r / d if d else 0:>8.1%}" for d, r in (per_task[t] for t in tasks))
            lines.append(f"{path:<28}{cells}")
        cells = "".join(f"{d:>16,}{r:>16,}{1 - r / d if d else 0:>8.1%}" for d, r in (self.total[t] for t in tasks))
        lines.append(f"{'whole model':<28}{cells}")
        return "\n".join(lines)


@contextlib.contextmanager
def dense(model: torch.nn.Module):
    """Run a routed model's blocks densely (the original blocks) inside the context.

    ``model`` is a routed model or a wrapper of it; any other model is refused (it runs densely already, and a
    ``with`` around it would not make the routed one dense).
    """
    state = routing_state(model, "dense")
    # Counted, not saved and restored: contexts that close out of order (two threads, generators) would restore a
    # stale value, and the model would stay dense.
    state.dense_contexts += 1
    state.dense = True
    try:
        yield model
    finally:
        state.dense_contexts -= 1
        state.dense = state.dense_contexts > 0


@contextlib.contextmanager
def without_the_fast_path():
    """``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` without their fused eval path, which runs the
    layer as one op: the FLOP counter cannot read it (the dense count was 0). Tests that run the layers' own code
    on selected tokens use it too (the fused path gave NaN for a mask cut to rows and columns by an index)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def count(model: torch.nn.Module, inputs: Mapping | tuple, **call_kwargs) -> dict[str, int]:
    """Forward FLOPs per module path (``""`` is the whole model)."""
    register_cpu_attention_flops()
    counter = flop_counter.FlopCounterMode(display=False)
    with counter, torch.no_grad(), without_the_fast_path():
        call_with(model, inputs, **call_kwargs)
    root = type(model).__name__
    counts = {}
    for name, per_op in counter.get_flop_counts().items():
        if name == root or name.startswith(root + "."):
            counts[name[len(root) + 1 :]] = sum(per_op.values())
    return counts


def flops(model: torch.nn.Module, inputs: Mapping | tuple | list | torch.Tensor, task: str | None = None) -> FlopReport:
    """Dense vs routed forward FLOPs of ``model`` on ``inputs``, per routed block and per task.

    ``inputs`` takes the forms ``transform``'s ``example_inputs`` takes (keyword
    inputs, positional ones, or one tensor, the first positional input).
    ``task`` restricts the report to one task; by default every task of the
    plan is measured with the whole batch assigned to it.
    """
    plan = routing_plan_of(require_module(model, "flops"))
    if plan is None:
        raise ConfigError("flops() takes a model routed by modpass.transform or modpass.load.")
    model = routed_model(model)  # counted eagerly, under the plan's paths
    inputs = capture_inputs(model, inputs)
    if isinstance(inputs, Mapping) and "task" in inputs:
        raise ConfigError(
            f"flops() counts one task at a time over the whole batch, but inputs has a 'task' key ({inputs['task']!r:.60}); "
            "leave it out and pass flops(model, inputs, task=name) for one task, or no task= for each task of the plan."
        )
    if task is not None and not isinstance(task, str):
        raise ConfigError(f"flops() counts one task over the whole batch: task= takes a name of {list(plan.tasks)}, got {type(task).__name__}.")
    tasks = [task] if task is not None else list(plan.tasks)
    report = FlopReport()
    state = routing_state(model, "flops")
    blocks = routed_blocks(model)
    # The routing records of the caller's last forward stay: modpass.aux_loss reads them, with their gradients.
    records = {path: block.last_routing for path, block in blocks.items()}
    try:
        with side_effects_undone(model):
            for t in tasks:
                with dense(model):
                    dense_counts = count(model, inputs, task=t)
                inside_dense, state.dense = state.dense, False  # routed, inside a caller's modpass.dense too
                try:
                    routed_counts = count(model, inputs, task=t)
                finally:
                    state.dense = inside_dense
                for path in blocks:
                    report.blocks.setdefault(path, {})[t] = (dense_counts.get(path, 0), routed_counts.get(path, 0))
                report.total[t] = (dense_counts.get("", 0), routed_counts.get("", 0))
    finally:
        for path, block in blocks.items():
            block.last_routing = records[path]
    return report
