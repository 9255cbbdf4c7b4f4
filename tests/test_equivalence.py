"""Full capacity equals the dense model; capacity c processes exactly ceil(c*T) tokens."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import modpass
from modpass import routing
from tests import models


def close_to_dense(routed_out: torch.Tensor, dense_out: torch.Tensor) -> None:
    scale = dense_out.abs().max().clamp(min=1.0)
    assert ((routed_out - dense_out).abs().max() / scale).item() <= 1e-5


FAMILIES = {
    "llama": (lambda: models.llama(), lambda b, t, g: {"input_ids": torch.randint(0, 97, (b, t), generator=g)}, lambda o: o.logits),
    "gpt2": (lambda: models.gpt2(), lambda b, t, g: {"input_ids": torch.randint(0, 97, (b, t), generator=g)}, lambda o: o.logits),
    "nanogpt": (lambda: models.NanoGPT().eval(), lambda b, t, g: {"idx": torch.randint(0, 61, (b, t), generator=g)}, lambda o: o),
    "mixtral": (lambda: models.mixtral(), lambda b, t, g: {"input_ids": torch.randint(0, 97, (b, t), generator=g)}, lambda o: o.logits),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    build, make_inputs, output = FAMILIES[request.param]
    torch.manual_seed(1)
    dense = build()
    return dense, modpass.transform(dense, 1.0, layers="all"), make_inputs, output


@given(batch=st.integers(1, 3), tokens=st.integers(2, 24), seed=st.integers(0, 2**16))
def test_full_capacity_equals_dense(family, batch, tokens, seed):
    dense, routed, make_inputs, output = family
    inputs = make_inputs(batch, tokens, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        close_to_dense(output(routed(**inputs)), output(dense(**inputs)))


@pytest.fixture(scope="module")
def vit_pair():
    dense = models.vit()
    return dense, modpass.transform(dense, 1.0, layers="all")


@given(batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_full_capacity_equals_dense_vit(vit_pair, batch, seed):
    dense, routed = vit_pair
    pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        close_to_dense(routed(pixel_values=pixels).last_hidden_state, dense(pixel_values=pixels).last_hidden_state)


@pytest.fixture(scope="module")
def llama_pair():
    dense = models.llama()
    return dense, modpass.transform(dense, 1.0, layers="all")


@given(tokens=st.integers(3, 20), pads=st.lists(st.integers(0, 2), min_size=2, max_size=3), seed=st.integers(0, 2**16))
def test_full_capacity_equals_dense_left_padded(llama_pair, tokens, pads, seed):
    dense, routed = llama_pair
    ids = torch.randint(0, 97, (len(pads), tokens), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    with torch.no_grad():
        want = dense(input_ids=ids, attention_mask=mask).logits
        got = routed(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    close_to_dense(got[real], want[real])


@pytest.fixture(scope="module")
def nano_routed():
    return modpass.transform(models.NanoGPT().eval(), Fraction(1, 3), layers="all")


def test_capacity_is_exact_for_decimal_ratios():
    # Float ceil gives 56 here; the plan stores 11/20 and computes 55.
    assert math.ceil(0.55 * 100) == 56
    routed = modpass.transform(models.NanoGPT(block_size=128).eval(), 0.55, layers=[0])
    with torch.no_grad():
        routed(idx=torch.randint(0, 61, (2, 100)))
    (record,) = routed.h[0].last_routing
    assert record.index.shape == (2, 55)


@given(batch=st.integers(1, 3), tokens=st.integers(1, 40), num=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_routed_block_processes_ceil_ratio_tokens_and_skips_the_rest(batch, tokens, num, seed):
    ratio = Fraction(num, 8)
    routed = _routed_nano(ratio)
    generator = torch.Generator().manual_seed(seed)
    for block in modpass.routed_blocks(routed).values():
        for router in block.mod_routers.values():
            torch.nn.init.normal_(router.weight, generator=generator)
    seen = {}
    hooks = [
        block.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, (a[0], out)))
        for name, block in modpass.routed_blocks(routed).items()
    ]
    try:
        with torch.no_grad():
            routed(idx=torch.randint(0, 61, (batch, tokens), generator=generator))
    finally:
        for hook in hooks:
            hook.remove()
    k = max(1, math.ceil(ratio * tokens))
    for name, block in modpass.routed_blocks(routed).items():
        (record,) = block.last_routing
        assert record.index.shape == (batch, k)
        assert bool((record.index.diff(dim=1) > 0).all()), "indices are unique and sorted by position"
        x, out = seen[name]
        skipped = torch.ones(batch, tokens, dtype=torch.bool)
        skipped.scatter_(1, record.index, False)
        assert torch.equal(out[skipped], x[skipped]), "unselected tokens pass through bit for bit"
        assert not torch.equal(out[~skipped], x[~skipped])


_NANO_CACHE: dict = {}


def _routed_nano(ratio: Fraction):
    if ratio not in _NANO_CACHE:
        torch.manual_seed(0)
        _NANO_CACHE[ratio] = modpass.transform(models.NanoGPT().eval(), ratio, layers="every_other")
    return _NANO_CACHE[ratio]


def test_a_block_that_writes_its_hidden_state_in_place_routes_as_the_same_block_out_of_place():
    """``x += ...`` in the block: before capture_block gave it a copy to write, the routed update read the selected
    tokens after the block had changed them, 0.2 off, eager and compiled."""
    torch.manual_seed(0)
    plain = models.NanoGPT()
    in_place = models.InPlaceGPT()
    in_place.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():  # the dense in-place block cannot train either: its first norm keeps x for the backward
        routed = [models.randomise_routers(modpass.transform(m, 0.5, layers="all"), seed=0) for m in (plain, in_place)]
        want = routed[0](ids)
        torch.testing.assert_close(routed[1](ids), want, rtol=0, atol=1e-6)
        compiled = torch.compile(routed[1], backend="modpass", fullgraph=True)
        torch.testing.assert_close(compiled(ids), want, rtol=1e-5, atol=1e-5)


def test_blocks_with_no_grad_and_autocast_regions_route_and_compile():
    """Export keeps code run under ``no_grad`` or ``autocast`` as subgraphs, which the analyses read in line
    (tests/test_passes.py checks that token mixing and state updates there are refused); a block whose regions are
    position-wise routes, trains and compiles, with dynamic shapes too (which Dynamo refused until the ninth session,
    "wrap_with_autocast: unexpected freevars", while the regions stayed higher-order ops in the routed graphs)."""
    torch.manual_seed(0)
    dense = models.ModeRegionGPT()
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        close_to_dense(modpass.transform(dense, 1.0, layers="all")(ids), dense(ids))
    routed = models.randomise_routers(modpass.transform(dense, 0.5, layers="all"), seed=0)
    routed(ids).sum().backward()
    assert routed.h[0].mod_routers.default.weight.grad.abs().sum() > 0
    compiled = torch.compile(routed, backend="modpass", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for length in (12, 9):
            torch.testing.assert_close(compiled(ids[:, :length]), routed(ids[:, :length]), rtol=1e-5, atol=1e-5)


def test_a_bfloat16_model_at_full_capacity_is_the_dense_model_bit_for_bit():
    """The gated update was ``x + w * (y - x)``, which in bfloat16 equals ``y`` for two elements in three at ``w = 1``:
    a bf16 Llama's logits were 3.9e-3 off, and greedy generation diverged."""
    torch.manual_seed(0)
    dense = models.NanoGPT(layers=2).eval().to(torch.bfloat16)
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(modpass.transform(dense, 1.0, layers="all")(ids), dense(ids), rtol=0, atol=0)


def test_router_logits_are_taken_in_the_wider_dtype_and_not_in_autocasts():
    """Eagerly as compiled: under autocast the logits were bf16 (eager and compiled calls selected different tokens),
    and a router kept in fp32 in a bf16 model failed (mat1 and mat2 must have the same dtype)."""
    hidden, weight, bias = torch.randn(2, 16, 32), torch.randn(1, 32), torch.randn(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = routing.router_logits(hidden, weight, bias)
    torch.testing.assert_close(logits, F.linear(hidden, weight, bias).squeeze(-1), rtol=0, atol=0)
    stream = hidden.bfloat16()
    want = F.linear(stream.float(), weight, bias).squeeze(-1).bfloat16()
    torch.testing.assert_close(routing.router_logits(stream, weight, bias), want, rtol=0, atol=0)


def test_zero_router_selects_first_tokens_deterministically():
    routed = modpass.transform(models.NanoGPT().eval(), 0.5, layers=[1])
    with torch.no_grad():
        routed(idx=torch.randint(0, 61, (2, 10)))
    (record,) = routed.h[1].last_routing
    assert record.index.tolist() == [[0, 1, 2, 3, 4]] * 2


def causal(tokens: int) -> torch.Tensor:
    return torch.ones(tokens, tokens, dtype=torch.bool).tril()


def padded(allowed: torch.Tensor, real: list[bool]) -> torch.Tensor:
    """``allowed`` with the keys of the tokens ``real`` marks False forbidden to every query (a padding mask)."""
    return allowed & torch.tensor(real)[None, :]


def others_only(tokens: int) -> torch.Tensor:
    return ~torch.eye(tokens, dtype=torch.bool)


def additive(allowed: torch.Tensor, forbidden: float) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, forbidden)


REAL = [False, False, True, True, True, False]  # padding left and right
PADDING_MASKS = {
    "causal, padded": (padded(causal(6), REAL), [not r for r in REAL]),
    "causal, padded, additive finfo.min": (additive(padded(causal(6), REAL), torch.finfo(torch.float32).min), [not r for r in REAL]),
    "causal, padded, additive -1e4 (BERT's)": (additive(padded(causal(6), REAL), -1e4), [not r for r in REAL]),
    "each token attends to the others only": (others_only(6), [False] * 6),
    "the earlier tokens only": (causal(6) & others_only(6), [False] * 6),
    "the others only, padded": (padded(others_only(6), REAL), [False] * 6),
    "a bias, no mask": (-torch.arange(6.0)[None, :].expand(6, 6).abs(), [False] * 6),
    "all padding, nothing attended": (torch.zeros(6, 6, dtype=torch.bool), [True] * 6),
}


@pytest.mark.parametrize("name", PADDING_MASKS)
def test_padding_is_read_from_a_mask_where_real_tokens_attend_to_themselves(name):
    """A token is padding where the mask forbids its own entry and no self-attending query attends to it. Until the
    ninth session the diagonal alone decided: a mask forbidding it everywhere made every token padding, and the
    blocks were skipped at full capacity too; and additive masks counted only below finfo.min / 2, not BERT's -1e4."""
    mask, padding = PADDING_MASKS[name]
    assert routing.padding_from_attention_mask(mask[None, None], 1).tolist() == [padding]


class OthersOnlyBlock(models.NanoBlock):
    def forward(self, x, allowed):
        return self.mix(x, attn_mask=allowed)


class OthersOnlyGPT(models.NanoGPT):
    """Each token attends to every other token, never to itself."""

    block_class = OthersOnlyBlock

    def forward(self, idx):
        x = self.embed(idx)
        allowed = others_only(idx.shape[1])[None, None].expand(idx.shape[0], 1, -1, -1)
        for block in self.h:
            x = block(x, allowed)
        return self.lm_head(self.ln_f(x))


def test_a_mask_that_forbids_attending_to_oneself_routes_every_token_at_full_capacity():
    torch.manual_seed(0)
    dense = OthersOnlyGPT(layers=2).eval()
    ids = torch.randint(0, 61, (2, 8))
    with torch.no_grad():
        close_to_dense(modpass.transform(dense, 1.0, layers="all")(ids), dense(ids))


def test_padding_is_never_selected_while_real_tokens_remain():
    routed = modpass.transform(models.llama(), 0.5, layers=[1])
    ids = torch.randint(0, 97, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        routed(input_ids=ids, attention_mask=mask)
    (record,) = routed.model.layers[1].last_routing
    assert record.index[0].min().item() >= 5
    assert record.index[1].tolist() == list(range(6))
