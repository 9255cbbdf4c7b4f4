"""The same guarantees on CUDA, and Triton kernels from the modpass backend (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import modpass
from modpass.kernels import selection
from tests import models
from tests.test_reliability import best_k_by_position

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_full_capacity_matches_dense_on_cuda(dtype):
    dense = models.llama().to("cuda", dtype)
    routed = modpass.transform(dense, 1.0, layers="all")
    ids = torch.randint(0, 97, (3, 40), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    with torch.no_grad():
        want = dense(input_ids=ids, attention_mask=mask).logits.float()
        got = routed(input_ids=ids, attention_mask=mask).logits.float()
    real = mask.bool()
    assert ((got[real] - want[real]).abs().max() / want[real].abs().max()).item() <= TOLERANCE[dtype]


def test_mixed_tasks_and_training_on_cuda():
    routed = modpass.transform(models.NanoGPT().cuda().train(), {"a": 0.25, "b": 0.75}, aux_loss_weight=0.01)
    idx = torch.randint(0, 61, (4, 24), device="cuda")
    logits = routed(idx, task=["a", "b", "b", "a"])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()) + modpass.aux_loss(routed)
    loss.backward()
    assert routed.h[1].mod_routers.a.weight.grad.abs().sum() > 0


def test_cached_generation_on_cuda_decodes_as_the_uncached_model():
    """kv_cache's positions, masks and gathers on the GPU (the CPU tests are test_kv_cache.py): a mixed-task batch
    (rows of different capacities) and Gemma 2's sliding-window layers past the window, each routed."""
    from tests.test_kv_cache import decode_and_compare

    prompt = torch.randint(1, 97, (2, 13), device="cuda")
    padding = torch.ones_like(prompt)
    padding[1, :3] = 0
    mixed = models.randomise_routers(modpass.transform(models.llama(), {"a": 0.5, "b": 0.25}), std=0.5).cuda()
    sliding = models.randomise_routers(modpass.transform(models.gemma2(), 0.5, layers="all"), std=0.5).cuda()
    with torch.no_grad():
        decode_and_compare(mixed, prompt, padding, steps=4, task=["a", "b"])
        decode_and_compare(sliding, prompt, padding, steps=4)


@pytest.mark.filterwarnings("ignore:modpass. cached generation")
def test_static_cache_decoding_compiles_with_cuda_graphs_on_cuda():
    """Hugging Face's compiled decoding as it runs on a GPU by default: a StaticCache, the decode call compiled with
    mode="reduce-overhead" (CUDA graphs), which needs a routed layer's in-place updates at fixed addresses."""
    from tests.test_kv_cache import cache_name, decode_and_compare, static_cache

    routed = models.randomise_routers(modpass.transform(models.llama(), 0.5), std=0.5).cuda()
    prompt = torch.randint(1, 97, (2, 13), device="cuda")
    padding = torch.ones_like(prompt)
    padding[1, :3] = 0
    greedy = dict(max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0, attention_mask=padding)
    with torch.no_grad():
        decode_and_compare(routed, prompt, padding, steps=4, cache=static_cache(routed, 24))
        eager = routed.generate(prompt, **greedy)
        torch._dynamo.reset()
        for _ in range(2):  # the second generation replays the recorded graphs
            compiled = routed.generate(prompt, **{cache_name(): static_cache(routed, 24)}, **greedy)
            torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_backend_emits_triton_kernels_for_routed_blocks():
    from torch._inductor.utils import run_and_get_code

    routed = modpass.transform(models.llama(layers=2).to("cuda", torch.bfloat16), 0.25, layers=[1])
    ids = torch.randint(0, 97, (2, 64), device="cuda")
    compiled = torch.compile(routed, backend="modpass", fullgraph=True)
    with torch.no_grad():
        want = routed(input_ids=ids).logits.float()
        got, code = run_and_get_code(lambda: compiled(input_ids=ids).logits.float())
    code = "".join(code)
    assert "@triton.jit" in code
    assert "select_rows" in code and "sort" not in code, "selection is modpass's Triton kernel, called from Inductor's code"
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kernel", [True, False], ids=["triton-kernel", "sorts"])
@pytest.mark.parametrize("length", [77, 4096, 10000, selection.MAX_TOKENS, selection.MAX_TOKENS + 1])
def test_selection_on_cuda_keeps_ties_to_the_earlier_position(monkeypatch, kernel, length):
    """Selection on the GPU, eager and compiled: modpass's Triton kernel (rows of one chunk and of
    several, up to ``MAX_TOKENS``; one token past it the sorts again), and the two sorts it replaces, which Inductor
    lowers differently by size (a library sort, a Triton sort). Equal scores must stay in position
    order either way."""
    monkeypatch.setattr(modpass.routing, "SELECTION_KERNEL", kernel)
    generator = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.randint(-50, 50, (2, length), device="cuda", generator=generator).float()  # many ties
    scores[0, :3] = float("inf")
    scores[1, -3:] = float("-inf")
    scores[1, ::5] = -0.0
    k = (length + 7) // 8
    want = best_k_by_position(scores, k)
    assert modpass.routing.select_tokens(scores, k).tolist() == want
    compiled = torch.compile(modpass.routing.select_tokens, backend="inductor", fullgraph=True)
    assert compiled(scores, k).tolist() == want
