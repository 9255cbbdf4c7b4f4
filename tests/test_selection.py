"""modpass.attention_rank: γ-MoD's attention rank per block and task, and the ratios UniMoD's rule derives from it."""

from __future__ import annotations

import copy

import pytest
import torch

import modpass
from modpass.selection import attention_probabilities
from tests import models


def hand_computed_ranks(model, calls) -> list[float]:
    """γ-MoD's ARank from the maps an eager Hugging Face model returns: mean over heads and rows of rank(tril(map, -1)) / T."""
    sums, counts = None, 0
    for ids in calls:
        attentions = model(input_ids=ids, output_attentions=True).attentions
        ranks = [torch.linalg.matrix_rank(a.float().tril(diagonal=-1)) for a in attentions]
        per_layer = [r.sum().item() / ids.shape[1] for r in ranks]
        sums = per_layer if sums is None else [s + p for s, p in zip(sums, per_layer)]
        counts += ranks[0].numel()
    return [s / counts for s in sums]


@pytest.fixture(scope="module")
def llama_pair():
    """One Llama with grouped-query attention, as SDPA runs it and as eager attention runs it."""
    torch.manual_seed(0)
    sdpa = models.llama(layers=4, attn_implementation="sdpa")
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    return sdpa, eager


def test_attention_rank_equals_the_maps_the_model_returns(llama_pair):
    sdpa, eager = llama_pair
    torch.manual_seed(1)
    samples = {"t2i": [torch.randint(0, 97, (2, 24)) for _ in range(2)], "mmu": [torch.randint(0, 10, (3, 16))]}
    with torch.no_grad():
        want = {task: hand_computed_ranks(eager, calls) for task, calls in samples.items()}
    for model in (sdpa, eager):  # maps recomputed from SDPA's inputs, and the softmax of eager attention
        got = modpass.attention_rank(model, {task: [{"input_ids": ids} for ids in calls] for task, calls in samples.items()})
        assert got.paths == tuple(f"model.layers.{i}" for i in range(4)) and got.sequences == {"t2i": 4, "mmu": 3}
        for task in samples:
            assert got.ranks[task] == pytest.approx(want[task], abs=1e-9)
    assert want["t2i"] != want["mmu"], "the tasks' samples give different ranks"


def test_sdpa_maps_follow_masks_causality_scale_and_grouped_heads():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    bias = torch.randn(2, 1, 6, 6)
    keep = torch.rand(2, 1, 6, 6) > 0.3
    keep[..., 0] = True
    for kwargs in ({"is_causal": True}, {"attn_mask": bias, "scale": 0.3}, {"attn_mask": keep}):
        maps = attention_probabilities(q, k, None, **kwargs, enable_gqa=True)
        values = torch.eye(6).expand(2, 4, 6, 6)  # attention over identity values returns the map itself
        want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), values, **kwargs)
        torch.testing.assert_close(maps, want)


def test_ratios_route_the_lowest_ranked_fraction_of_blocks_per_task():
    ranks = modpass.AttentionRanks(paths=("h.0", "h.1", "h.2", "h.3"), within="h",
                                   ranks={"a": (0.9, 0.31, 0.5, 0.2), "b": (0.15, 0.7, 0.7, 0.05)}, sequences={"a": 8, "b": 8})
    assert ranks.ratios() == {"a": [1.0, 0.31, 1.0, 0.2], "b": [0.15, 1.0, 1.0, 0.125]}
    assert ranks.ratios(fraction=0.25, ratio=0.5) == {"a": [1.0, 1.0, 1.0, 0.5], "b": [1.0, 1.0, 1.0, 0.5]}
    assert "h.3" in str(ranks)
    with pytest.raises(modpass.ConfigError, match="fraction must be a number in"):
        ranks.ratios(fraction=0)


def test_the_ratios_route_the_blocks_they_name_within_one_stack():
    model, inputs = models.prefix_vision_gpt()
    before = {name: module.training for name, module in model.train().named_modules()}
    torch.manual_seed(2)
    samples = {"t2i": [inputs], "mmu": [{"idx": torch.randint(0, 61, (2, 10)), "patches": torch.randn(2, 6, 12)}]}
    ranks = modpass.attention_rank(model, samples, within="h", progress=False)
    assert ranks.paths == ("h.0", "h.1", "h.2", "h.3") and ranks.within == "h"
    assert {name: module.training for name, module in model.named_modules()} == before, "modes restored"
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules()), "no hook left behind"
    ratios = ranks.ratios(ratio=0.5)
    routed = modpass.transform(model.eval(), ratios, layers="all", within=ranks.within, example_inputs=inputs)
    plan = modpass.routing_plan_of(routed)
    for task, per_block in ratios.items():
        assert sorted(b.path for b in plan.blocks if b.ratios[task] is not None) == sorted(
            path for path, ratio in zip(ranks.paths, per_block) if ratio < 1)


def test_attention_rank_refusals():
    model, inputs = models.prefix_vision_gpt()
    with pytest.raises(modpass.ConfigError, match="has no inputs"):
        modpass.attention_rank(model, {"a": []})
    with pytest.raises(modpass.ConfigError, match="holds none of the model's blocks"):
        modpass.attention_rank(model, [inputs], within="decoder")
    blind = models.NanoGPT()
    blind.h = torch.nn.ModuleList(HandWrittenSoftmaxBlock(32, 4) for _ in blind.h)
    with pytest.raises(modpass.ConfigError, match=r"no self-attention maps were seen in \['h.0', 'h.1', 'h.2'\]\.\.\."):
        modpass.attention_rank(blind, [torch.randint(0, 61, (2, 10))])


class HandWrittenSoftmaxBlock(models.NanoBlock):
    """Attends with a softmax of its own (exp, then a sum): no map that modpass reads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(self.ln_1(x)).split(x.shape[-1], dim=2)
        weights = (q @ k.transpose(1, 2) * x.shape[-1] ** -0.5).exp()
        x = x + self.c_proj(weights / weights.sum(-1, keepdim=True) @ v)
        return x + self.mlp(self.ln_2(x))
