"""The demo itself: check a full-capacity transform, then train dense vs MoD vs UniMoD at matched training FLOPs."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import modpass
from modpass import schedules

from . import data
from .model import UnifiedTransformer

EQUIVALENCE_TOLERANCE = 1e-5
DEPTH = 6
# UniMoD's recipe for Show-o, scaled to 6 blocks: the first third stays dense for
# both tasks (early layers matter most), generation keeps 75% of its image tokens
# in the routed blocks (every image token is a prediction target), and
# understanding keeps a shrinking share (its image tokens are context only).
UNIMOD_RATIOS: dict[str, Any] = {
    "t2i": schedules.LastN(0.75, 4),
    "mmu": [1.0, 1.0, 0.5, 0.375, 0.25, 0.125],
}


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    steps: int = 400
    batch_size: int = 64
    width: int = 64
    heads: int = 4
    lr: float = 3e-3
    aux_loss_weight: float = 0.01
    eval_points: int = 10
    out: Path = Path("modpass-demo-out")


@dataclass(frozen=True)
class Variant:
    """A model to train; ``routing`` picks the forward arguments a batch needs."""

    name: str
    model: nn.Module
    routing: str  # "dense", "shared" (one router, image tokens routable) or "per_task"
    description: str

    def forward(self, batch: data.Batch) -> torch.Tensor:
        if self.routing == "dense":
            return self.model(batch.tokens)
        if self.routing == "shared":
            return self.model(batch.tokens, route_mask=batch.route_mask)
        return self.model(batch.tokens, task=batch.tasks, route_mask=batch.route_mask)


@dataclass
class Outcome:
    """One variant's run: its per-step FLOPs, steps, wall time and eval history."""

    description: str
    forward_flops: dict[str, int]  # per task, one batch of batch_size // 2 sequences
    train_flops_per_step: int
    steps: int = 0
    train_flops: int = 0
    wall_s: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def run(settings: Settings) -> int:
    """Both parts of the demo; returns a process exit code (non-zero when equivalence fails)."""
    # Before minutes of training, not after them: --out may name a file, or a place that cannot be written.
    settings.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    digits = data.load(settings.seed)
    base = UnifiedTransformer(data.VOCAB_SIZE, data.SEQ_LEN, width=settings.width, depth=DEPTH, heads=settings.heads)
    half = settings.batch_size // 2
    probe = data.concat([data.sequences(t, digits.test_images[:half], digits.test_labels[:half]) for t in data.TASKS])

    print("== Part 1: transform a tiny unified transformer ==")
    error = full_capacity_error(base, probe.tokens)
    passed = error <= EQUIVALENCE_TOLERANCE
    print(f"full capacity (ratio 1.0, all blocks) vs dense: max |diff| / max |output| = {error:.2e} "
          f"(tolerance {EQUIVALENCE_TOLERANCE:.0e}) -> {'PASS' if passed else 'FAIL'}")
    if not passed:
        return 1

    base.train()
    unimod = modpass.transform(base, UNIMOD_RATIOS, layers="all", aux_loss_weight=settings.aux_loss_weight,
                               example_inputs=(probe.tokens,))
    layers, shared_ratio = matching_shared_ratio(unimod)
    mod = modpass.transform(base, shared_ratio, layers=layers, aux_loss_weight=settings.aux_loss_weight,
                            example_inputs=(probe.tokens,))
    variants = [
        Variant("dense", copy.deepcopy(base), "dense", "plain transformer, every token through every block"),
        Variant("mod", mod, "shared",
                f"plain MoD: one router for both tasks, capacity {float(shared_ratio):.4g} of image tokens in blocks {layers}"),
        Variant("unimod", unimod, "per_task",
                f"UniMoD: one router and capacity per task, ratios {describe_ratios(unimod)}"),
    ]
    reports = {v.name: task_flops(v.model, digits, half, per_task=v.routing == "per_task") for v in variants[1:]}
    for name, report in reports.items():
        print(f"\nforward FLOPs per block and task, {name} ({half} sequences of {data.SEQ_LEN} tokens per task, "
              "only image tokens routable):")
        print(report)
    outcomes = {}
    for variant in variants:
        if variant.routing == "dense":
            # Every report's dense column measures this same dense model.
            forward = {t: reports["unimod"].total[t][0] for t in data.TASKS}
        else:
            forward = {t: reports[variant.name].total[t][1] for t in data.TASKS}
        # A training step is one forward and a backward of about twice its cost.
        outcomes[variant.name] = Outcome(variant.description, forward, 3 * sum(forward.values()))
    print(f"\nPart 1 took {time.perf_counter() - started:.1f} s")

    print("\n== Part 2: train dense vs MoD vs UniMoD on sklearn digits at matched training FLOPs ==")
    print("tasks: t2i = label -> 64 image tokens (next-token loss), mmu = image -> label (accuracy on held-out digits)")
    budget = settings.steps * outcomes["unimod"].train_flops_per_step
    for variant in variants:
        outcome = outcomes[variant.name]
        print(f"{variant.name}: {variant.description}")
        train(variant, outcome, digits, round(budget / outcome.train_flops_per_step), settings)
    print_results(outcomes)
    plot(outcomes, settings.out / "loss_vs_flops.png")
    write_json(settings, error, outcomes, settings.out / "results.json")
    print(f"\nwrote {settings.out / 'loss_vs_flops.png'} and {settings.out / 'results.json'} "
          f"(total {time.perf_counter() - started:.0f} s)")
    return 0


def full_capacity_error(model: nn.Module, tokens: torch.Tensor) -> float:
    """Max abs difference between ``model`` and its ratio-1.0 transform, relative to the output scale."""
    model.eval()
    full = modpass.transform(model, 1.0, layers="all", example_inputs=(tokens,))
    with torch.no_grad():
        reference = model(tokens)
        routed = full(tokens)
    return ((routed - reference).abs().max() / reference.abs().max()).item()


def matching_shared_ratio(routed: nn.Module) -> tuple[list[int], Fraction]:
    """Blocks and one ratio for plain MoD that process as many image tokens as ``routed`` does per task pair.

    Matching token counts matches the linear layers' FLOPs exactly and
    attention's nearly (its cost grows with the square of the kept tokens);
    the demo measures both variants' FLOPs rather than trusting this.
    """
    plan = modpass.routing_plan_of(routed)
    kept = [
        data.IMAGE_TOKENS if r is None else math.ceil(r * data.IMAGE_TOKENS)
        for block in plan.blocks for r in block.ratios.values()
    ]
    return [b.index for b in plan.blocks], Fraction(sum(kept), len(kept) * data.IMAGE_TOKENS)


def describe_ratios(routed: nn.Module) -> dict[str, list[float]]:
    plan = modpass.routing_plan_of(routed)
    per_block = {b.index: b.ratios for b in plan.blocks}
    return {
        task: [1.0 if per_block.get(i, {}).get(task) is None else float(per_block[i][task]) for i in range(plan.num_blocks)]
        for task in plan.tasks
    }


def task_flops(routed: nn.Module, digits: data.Digits, rows: int, *, per_task: bool) -> modpass.FlopReport:
    """Dense and routed forward FLOPs of ``rows`` sequences of each task, with the training route mask.

    A model with one shared router has a single task of its own; its rows
    are filed under the demo task whose sequences were measured.
    """
    merged = modpass.FlopReport()
    for task in data.TASKS:
        batch = data.sequences(task, digits.train_images[:rows], digits.train_labels[:rows])
        inputs = {"tokens": batch.tokens, "route_mask": batch.route_mask}
        report = modpass.flops(routed, inputs, task=task if per_task else None)
        (measured,) = report.total
        merged.total[task] = report.total[measured]
        for path, per_block in report.blocks.items():
            merged.blocks.setdefault(path, {})[task] = per_block[measured]
    return merged


def task_losses(logits: torch.Tensor, batch: data.Batch) -> dict[str, torch.Tensor]:
    """Mean next-token cross-entropy over each task's targets, so both tasks weigh the same."""
    per_token = F.cross_entropy(logits.transpose(1, 2), batch.targets, reduction="none")
    counted = batch.targets != data.IGNORE
    losses = {}
    for task in data.TASKS:
        rows = torch.tensor([t == task for t in batch.tasks])
        losses[task] = per_token[counted & rows[:, None]].mean()
    return losses


def train(variant: Variant, outcome: Outcome, digits: data.Digits, steps: int, settings: Settings) -> None:
    """Train ``variant`` for ``steps`` mixed batches, evaluating at evenly spaced steps into ``outcome``."""
    model = variant.model
    model.train()
    routed = variant.routing != "dense"
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)
    # Linear warmup, then cosine decay to a tenth over the variant's own steps (an isoFLOP run each).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(s, steps) / steps)),
    )
    eval_steps = {round(i * steps / settings.eval_points) for i in range(settings.eval_points + 1)}
    batches = data.mixed_batches(digits, settings.batch_size, settings.seed)
    outcome.history.append(evaluate(variant, digits, 0, 0))
    wall = 0.0
    progress = tqdm(range(1, steps + 1), desc=f"{variant.name:>6}", unit="step", dynamic_ncols=True)
    for step in progress:
        batch = next(batches)
        start = time.perf_counter()
        losses = task_losses(variant.forward(batch), batch)
        loss = sum(losses.values())
        if routed:
            loss = loss + modpass.aux_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        wall += time.perf_counter() - start
        if step % 10 == 0:
            progress.set_postfix({f"{t} loss": f"{v.item():.3f}" for t, v in losses.items()})
        if step in eval_steps:
            outcome.history.append(evaluate(variant, digits, step, step * outcome.train_flops_per_step))
    outcome.steps = steps
    outcome.train_flops = steps * outcome.train_flops_per_step
    outcome.wall_s = wall


@torch.no_grad()
def evaluate(variant: Variant, digits: data.Digits, step: int, train_flops: int) -> dict[str, float]:
    """Held-out t2i loss (nats per pixel), mmu loss and accuracy, and the routers' causal accuracy.

    Routed variants are evaluated with top-k routing, as they train. The
    router accuracy is how often ``sigmoid(logit) > 0.5`` agrees with top-k
    membership on routable tokens: what causal sampling would rely on.
    """
    variant.model.eval()
    result: dict[str, float] = {"step": step, "train_flops": train_flops}
    agree = counted = 0
    for task in data.TASKS:
        batch = data.sequences(task, digits.test_images, digits.test_labels)
        logits = variant.forward(batch)
        result[f"{task}_loss"] = task_losses(logits, batch)[task].item()
        if task == "mmu":
            label_logits = logits[:, -1, data.LABEL_OFFSET : data.LABEL_OFFSET + data.NUM_CLASSES]
            result["mmu_accuracy"] = (label_logits.argmax(-1) == digits.test_labels).float().mean().item()
        for block in modpass.routed_blocks(variant.model).values():
            for record in block.last_routing:
                hits = (record.logits > 0) == record.selected
                mask = record.route_mask if record.route_mask is not None else torch.ones_like(hits)
                agree += (hits & mask).sum().item()
                counted += mask.sum().item()
    if counted:
        result["router_accuracy"] = agree / counted
    variant.model.train()
    return result


def print_results(outcomes: Mapping[str, Outcome]) -> None:
    dense = outcomes["dense"]
    print(f"\n{'variant':<8}{'steps':>7}{'train GFLOPs':>14}{'GFLOPs/step':>13}{'vs dense':>10}"
          f"{'t2i loss':>10}{'mmu loss':>10}{'mmu acc':>9}{'router acc':>12}{'train s':>9}{'s/step':>8}")
    for name, o in outcomes.items():
        final = o.history[-1]
        router = f"{final['router_accuracy']:.1%}" if "router_accuracy" in final else "-"
        print(f"{name:<8}{o.steps:>7}{o.train_flops / 1e9:>14.1f}{o.train_flops_per_step / 1e9:>13.3f}"
              f"{o.train_flops_per_step / dense.train_flops_per_step:>10.1%}{final['t2i_loss']:>10.4f}"
              f"{final['mmu_loss']:>10.4f}{final['mmu_accuracy']:>9.1%}{router:>12}{o.wall_s:>9.1f}"
              f"{o.wall_s / max(o.steps, 1):>8.3f}")
    print("t2i loss: held-out next-token cross-entropy per image token (nats); routed variants evaluated with "
          "top-k routing as in training.")


def plot(outcomes: Mapping[str, Outcome], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("t2i_loss", "t2i eval loss (nats / image token)"), ("mmu_loss", "mmu eval loss (nats)"),
              ("mmu_accuracy", "mmu eval accuracy")]
    figure, axes = plt.subplots(1, len(panels), figsize=(15, 4.2))
    for ax, (key, title) in zip(axes, panels):
        for name, outcome in outcomes.items():
            xs = [h["train_flops"] / 1e12 for h in outcome.history]
            ax.plot(xs, [h[key] for h in outcome.history], marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("cumulative training TFLOPs")
        ax.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_json(settings: Settings, error: float, outcomes: Mapping[str, Outcome], path: Path) -> None:
    results = {
        "settings": {**asdict(settings), "out": str(settings.out), "depth": DEPTH},
        "full_capacity_relative_error": error,
        "variants": {name: asdict(o) for name, o in outcomes.items()},
    }
    path.write_text(json.dumps(results, indent=2))
