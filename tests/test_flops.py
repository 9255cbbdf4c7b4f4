"""Matmul and attention FLOPs of routed models drop with the capacity."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import modpass
from modpass.flops import register_cpu_attention_flops
from tests import models


def test_cpu_attention_is_counted():
    register_cpu_attention_flops()
    q = torch.randn(2, 4, 16, 8)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert counter.get_total_flops() == 2 * (2 * 2 * 4 * 16 * 16 * 8)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["forward", "forward-and-backward"])
def test_cpu_attention_over_grouped_keys_counts_every_query_head(requires_grad):
    """Grouped-query attention (Llama's enable_gqa) costs what attention over keys repeated per query head costs."""
    register_cpu_attention_flops()
    q = torch.randn(2, 4, 16, 8, requires_grad=requires_grad)
    kv = torch.randn(2, 2, 16, 8, requires_grad=requires_grad)

    def flops(attend) -> dict:
        with FlopCounterMode(display=False) as counter:
            out = attend()
            if requires_grad:
                out.sum().backward()
        return counter.get_flop_counts()["Global"]

    sdpa = torch.nn.functional.scaled_dot_product_attention
    grouped = flops(lambda: sdpa(q, kv, kv, is_causal=True, enable_gqa=True))
    repeated = flops(lambda: sdpa(q, kv.repeat_interleave(2, 1), kv.repeat_interleave(2, 1), is_causal=True))
    if grouped.keys() != repeated.keys():
        # Torch 2.6 runs grouped attention on the math kernels, whose backward keeps the scores instead of recomputing them.
        pytest.skip(f"this torch runs other kernels for grouped attention: {sorted(map(str, grouped))}")
    assert sum(grouped.values()) == sum(repeated.values()) > 0


@pytest.fixture(scope="module")
def nano():
    return models.NanoGPT(layers=4, width=32, block_size=128).eval()


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25, 0.125])
def test_block_flops_follow_the_ratio(nano, ratio):
    routed = modpass.transform(nano, ratio, layers="every_other")
    tokens = 96
    report = modpass.flops(routed, {"idx": torch.randint(0, 61, (2, tokens))})
    k = math.ceil(ratio * tokens)
    width = 32
    # Per sequence: projections and MLP scale with k, attention with k^2; the router reads all T
    # tokens to rank them, and the k selected ones again for the gate.
    linear = 2 * (3 * width * width + width * width + 8 * width * width)
    attention = 2 * 2 * width
    want_routed = 2 * (k * linear + k * k * attention + (tokens + k) * 2 * width)
    want_dense = 2 * (tokens * linear + tokens * tokens * attention)
    for per_task in report.blocks.values():
        dense_flops, routed_flops = per_task["default"]
        assert dense_flops == want_dense
        assert routed_flops == want_routed
    dense_total, routed_total = report.total["default"]
    assert dense_total - routed_total == 2 * (want_dense - want_routed)
    assert "whole model" in str(report)


def test_flops_refuses_unrouted_models(nano):
    with pytest.raises(modpass.ConfigError):
        modpass.flops(nano, {"idx": torch.randint(0, 61, (1, 4))})


def test_flops_counts_the_routed_model_inside_a_dense_context_and_takes_one_task_by_name(nano):
    """Inside modpass.dense the routed count was the dense one; a list of tasks was a raw TypeError (unhashable)."""
    routed = modpass.transform(nano, 0.25, layers="every_other")
    inputs = {"idx": torch.randint(0, 61, (2, 16))}
    outside = modpass.flops(routed, inputs).total
    with modpass.dense(routed):
        assert modpass.flops(routed, inputs).total == outside
    dense_total, routed_total = outside["default"]
    assert routed_total < dense_total
    with pytest.raises(modpass.ConfigError, match=r"task= takes a name of \['default'\], got list"):
        modpass.flops(routed, inputs, task=["default", "default"])


def test_flops_keeps_the_last_forwards_routing_records_buffers_and_random_stream():
    """Until the eighth session flops replaced the routing records of the caller's forward, so that aux_loss after it
    gave another loss, without gradient; in training mode it also updated a batch norm's statistics and drew dropout
    from the random stream."""
    routed = modpass.transform(models.NormedEmbeddingGPT(), 0.5, layers=[1], aux_loss_weight=0.1).train()
    models.randomise_routers(routed, seed=1)
    ids = torch.randint(0, 61, (2, 12))
    routed(ids)
    loss = modpass.aux_loss(routed)
    statistics = {k: v.clone() for k, v in routed.norm.state_dict().items()}
    state = torch.get_rng_state()
    modpass.flops(routed, ids[:, :5])
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(value, statistics[key]) for key, value in routed.norm.state_dict().items())
    after = modpass.aux_loss(routed)
    assert after.requires_grad and torch.equal(after, loss)
    after.backward()
    assert routed.h[1].mod_routers["default"].weight.grad.abs().sum() > 0


def test_a_task_among_the_inputs_is_refused_for_the_task_argument(nano):
    """Until the eighth session a 'task' key raised TypeError (multiple values for 'task') with the model's repr; a
    route mask among the inputs is counted."""
    routed = modpass.transform(nano, {"a": 0.25, "b": 0.5})
    ids = torch.randint(0, 61, (2, 16))
    with pytest.raises(modpass.ConfigError, match=r"inputs has a 'task' key \(\['a', 'b'\]\); leave it out and pass flops\(model, inputs, task=name\)"):
        modpass.flops(routed, {"idx": ids, "task": ["a", "b"]})
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[:, :8] = False
    masked = modpass.flops(routed, {"idx": ids, "route_mask": mask}, task="a").total["a"]
    assert masked[1] > modpass.flops(routed, {"idx": ids}, task="a").total["a"][1]


@pytest.mark.parametrize("mask", ["causal-float", "learned-bias"])
def test_flops_counts_transformer_encoder_layers_given_a_shared_mask(mask):
    """torch's fused eval path of ``nn.TransformerEncoderLayer`` is one op the counter cannot read (the dense count was
    0), and a parameter's view made under the count's no_grad (``bias[:T, :T]``), passed into the routed graph, made
    the counter's module tracker fail (``AssertionError: Expected gradient function to be set``)."""
    from tests.test_token_tables import EncoderWithSharedMask

    idx = torch.randint(0, 50, (2, 16))
    routed = modpass.transform(EncoderWithSharedMask(mask).eval(), 0.5, layers="all", example_inputs=(idx,))
    report = modpass.flops(routed, (idx,))
    (dense, routed_count), = report.total.values()
    assert dense > 0 and 0.45 < routed_count / dense < 0.6
    assert torch.backends.mha.get_fastpath_enabled()  # given back
