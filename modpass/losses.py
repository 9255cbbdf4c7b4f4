"""Auxiliary router loss (MoD's fix for causal sampling)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .api import require_module, routed_blocks, routing_plan_of, routing_state
from .errors import ConfigError


def aux_loss(model: torch.nn.Module) -> torch.Tensor:
    """Router BCE of the last forward, times the plan's ``aux_loss_weight``.

    Each routed block's logits are trained towards its own top-k membership
    (1 for selected tokens, 0 for skipped ones), so that at inference
    ``sigmoid(logit) > 0.5`` predicts selection without looking at future
    tokens. Tokens outside a route mask are always processed, and padding is
    never real work (it may fill spare top-k slots), so both are excluded.
    The loss is the mean BCE over a task's tokens in a routed block, summed
    over tasks and blocks, so it does not depend on how a batch was split
    into calls (eager splits a task's rows by capacity under a route mask,
    torch.compile keeps them in one call); it is a zero tensor when the
    weight is 0 or no routed forward has run.
    """
    plan = routing_plan_of(require_module(model, "aux_loss"))
    if plan is None:
        raise ConfigError("aux_loss() takes a model routed by modpass.transform or modpass.load.")
    total = None
    if plan.aux_loss_weight > 0:
        for block in routed_blocks(model).values():
            sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for record in block.last_routing:
                warn_of_scores_without_gradient(block, record)
                target = record.selected.to(record.logits.dtype)
                per_token = F.binary_cross_entropy_with_logits(record.logits, target, reduction="none")
                counted = record.route_mask
                if record.padding is not None:
                    counted = ~record.padding if counted is None else counted & ~record.padding
                if counted is None:
                    counted = torch.ones_like(per_token, dtype=torch.bool)
                loss, tokens = sums.get(record.task, (0, 0))
                sums[record.task] = (loss + torch.where(counted, per_token, 0).sum(), tokens + counted.sum())
            for loss, tokens in sums.values():
                # A mean that is 0, not NaN, over no tokens: a fully masked
                # group, or a task absent from a batch split under compile.
                loss = loss / tokens.clamp(min=1)
                total = loss if total is None else total + loss
    if total is None:
        state = routing_state(model, "aux_loss")
        if plan.aux_loss_weight > 0 and state.last_forward_dense and not torch.compiler.is_compiling():
            state.warn_once("aux loss after a dense forward", (
                "modpass: aux_loss() is 0: the model's last forward ran inside modpass.dense(...), which routes "
                "nothing and leaves no routing records (a dense teacher pass, say). Take aux_loss() after the routed "
                "forward, before the dense one."), stacklevel=2)
        reference = next(model.parameters())
        return torch.zeros((), device=reference.device, dtype=reference.dtype)
    return total * plan.aux_loss_weight


def warn_of_scores_without_gradient(block, record) -> None:
    """Say once when a block's router trains but the scores of its last call carry no gradient, so that the loss
    cannot train it: the block ran without autograd, as inside a reentrant checkpoint around it, whose forward does
    (torch's ``checkpoint_wrapper`` with ``CheckpointImpl.REENTRANT``)."""
    state = block._state
    if (record.logits.requires_grad or not torch.is_grad_enabled() or torch.compiler.is_compiling()
            or not any(p.requires_grad for p in block.mod_routers.parameters())):
        return
    state.warn_once(
        "scores without gradient",
        f"modpass.aux_loss: {block.plan.path}: the router scores of its last call carry no gradient, though its router "
        "trains, so this loss does not train it. The block ran without autograd: under torch.no_grad(), or inside a "
        "reentrant checkpoint around it (torch's checkpoint_wrapper with CheckpointImpl.REENTRANT), whose forward "
        "runs so and keeps only the block's outputs. Checkpoint routed blocks without reentrance "
        "(CheckpointImpl.NO_REENTRANT), or with Hugging Face's activation checkpointing, either kind.",
        stacklevel=3,
    )
