"""Graph-level tests of each pass on small graphs: node counts, op presence, annotations."""

from __future__ import annotations

import functools
import math
import operator
from collections import Counter
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modpass
from modpass import _compat, _structure, routing
from modpass.api import record_block_calls
from modpass.passes import token_mixing as token_mixing_module
from modpass.passes.capture import capture
from modpass.passes.capture_block import capture_block, placeholders_written_in_place, refuse_size_assumptions
from modpass.passes.find_blocks import find_blocks
from modpass.passes.residual_stream import residual_stream
from modpass.passes.rewrite import mask_input, rewrite
from modpass.passes.token_axes import token_axes, user_inputs
from modpass.passes.token_mixing import token_mixing
from modpass.passes.unbacked_attention_masks import unbacked_attention_masks
from modpass.passes.unbacked_views import unbacked_views
from tests import models


def blocks_of(model, inputs):
    return find_blocks(capture(model, inputs)).meta["modpass_blocks"]


@pytest.mark.parametrize(
    "build, inputs, prefix, width",
    [
        (models.llama, {"input_ids": torch.randint(0, 97, (2, 9)), "use_cache": False}, "model.layers.", 48),
        (models.gpt2, {"input_ids": torch.randint(0, 97, (2, 9)), "use_cache": False}, "transformer.h.", 48),
        (models.vit, {"pixel_values": torch.randn(2, 3, 32, 32)}, "layers.", 48),
        (lambda: models.NanoGPT(), {"idx": torch.randint(0, 61, (2, 9))}, "h.", 32),
    ],
    ids=["llama", "gpt2", "vit", "nanogpt"],
)
def test_find_blocks_finds_the_layers_and_nothing_inside_them(build, inputs, prefix, width):
    blocks = blocks_of(build(), inputs)
    assert [b.path for b in blocks] == [f"{prefix}{i}" for i in range(4)]
    assert [b.index for b in blocks] == [0, 1, 2, 3]
    assert {b.hidden_size for b in blocks} == {width}


class ModeRegionStack(nn.Module):
    """The blocks of tests/models.py's ModeRegionGPT, which attend under autocast only, on hidden states given as
    they are: the last block's output is the model's."""

    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList(models.ModeRegionBlock(32, 4) for _ in range(4))

    def forward(self, x):
        for block in self.h:
            x = block(x)
        return x


def test_find_blocks_finds_blocks_that_attend_inside_an_autocast_region_the_last_one_too():
    """Export keeps the attention in a subgraph, which find_blocks reads in line; the last block, whose output only
    the model's output uses, was missed while that reading left the output out."""
    assert [b.path for b in blocks_of(ModeRegionStack(), (torch.randn(2, 9, 32),))] == [f"h.{i}" for i in range(4)]


class EinsumBlock(models.NanoBlock):
    """Attention written with einsum, which takes its operands as one list."""

    def attend(self, x, **attention):
        q, k, v = self.c_attn(self.ln_1(x)).split(x.shape[-1], dim=2)
        scores = torch.einsum("btd,bsd->bts", q, k).tril().softmax(-1)
        return self.c_proj(torch.einsum("bts,bsd->btd", scores, v))


class EinsumGPT(models.NanoGPT):
    block_class = EinsumBlock


def test_find_blocks_finds_blocks_that_attend_with_einsum_alone():
    """Their products were not read as attention, so the model had no blocks (NoBlocksError)."""
    assert [b.path for b in modpass.list_blocks(EinsumGPT().eval())] == ["h.0", "h.1", "h.2", "h.3"]


def test_find_blocks_records_side_inputs_of_llama_blocks():
    (first, *_) = blocks_of(models.llama(), {"input_ids": torch.randint(0, 97, (2, 9)), "use_cache": False})
    ranks = sorted(len(shape) for _, shape in first.side_inputs)
    assert 4 in ranks and 3 in ranks, "the causal mask and the rotary tables flow into the block"


def test_find_blocks_refuses_a_model_without_blocks():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(modpass.NoBlocksError, match="repeated sibling modules"):
        find_blocks(capture(model, (torch.randn(2, 5, 8),)))


def test_capture_computes_what_the_model_computes_when_it_calls_a_module_twice():
    """The hooks that record each module's first call must not replay its arguments into later calls."""
    torch.manual_seed(0)
    model = models.ConditionedGPT().eval()  # calls its token embedding on the ids, then on their first column
    idx = torch.randint(0, 61, (2, 9))
    gm = capture(model, (idx,))
    assert gm.meta["modpass_traced_calls"]["wte"][0][0].dim() == 2
    torch.testing.assert_close(gm(idx), model(idx))


def analysed_llama_block():
    model = models.llama(layers=2)
    ids = torch.randint(0, 97, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    (args, kwargs) = record_block_calls(model, ["model.layers.1"], {"input_ids": ids, "attention_mask": mask, "use_cache": False})["model.layers.1"]
    return token_mixing(token_axes(capture_block(model.model.layers[1], args, kwargs)))


def test_token_axes_follow_the_sequence_symbol_only():
    gm = analysed_llama_block()
    axes = [(tuple(n.meta["val"].shape).__len__(), n.meta["modpass_token_axes"]) for n in user_inputs(gm)]
    # hidden (B,T,D); mask (B,1,T,T); cos, sin (1,T,hd); position ids (1,T) are unused by the block.
    assert axes[0] == (3, (1,))
    assert (4, (2, 3)) in axes
    assert axes.count((3, (1,))) == 3
    assert (2, ()) in axes


def test_rewrite_inserts_router_select_gather_block_scatter():
    gm = rewrite(analysed_llama_block(), ratio=Fraction(1, 2))
    roles = Counter(n.meta.get("modpass_role") for n in gm.graph.nodes if "modpass_role" in n.meta)
    assert roles["router"] == 1
    assert roles["scatter"] == 1
    targets = Counter(n.target for n in gm.graph.nodes if n.op == "call_function")
    assert targets[routing.padding_from_attention_mask] == 1, "padding comes from the 4-D mask"
    assert (targets[routing.take_tokens], targets[routing.gather_tokens]) == (1, 3), "hidden; mask, cos and sin"
    assert targets[routing.select_tokens] == 1
    assert targets[routing.scatter_update] == 1
    assert targets[torch.ops.aten.scaled_dot_product_attention.default] == 1
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders[-2:] == ["router_weight", "router_bias"]
    assert gm.meta["modpass_inputs"][-2:] == [("router", "weight"), ("router", "bias")]
    outputs = gm.graph.output_node().args[0]
    assert [o.target for o in outputs[:-1]] == [routing.scatter_update, routing.router_logits, routing.select_tokens,
                                                routing.padding_from_attention_mask], "(new hidden, logits, index, padding)"
    assert outputs[-1] is None, "no extra slots at one capacity per call"


def test_rewrite_explicit_capacity_takes_k_and_route_mask():
    gm = rewrite(analysed_llama_block(), ratio=Fraction(1, 2), explicit_capacity=True)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"][-2:] == ["capacity", "route_mask"]
    assert not any(n.target is routing.capacity for n in gm.graph.nodes)


def test_rewrite_with_row_capacities_hides_the_extra_slots_in_the_gathered_mask():
    gm = rewrite(analysed_llama_block(), ratio=Fraction(1, 2), explicit_capacity=True, row_capacities=True)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"][-3:] == ["capacity", "route_mask", "row_capacity"]
    assert gm.meta["modpass_inputs"][-1] == ("row_capacity", None)
    targets = Counter(n.target for n in gm.graph.nodes if n.op == "call_function")
    assert (targets[routing.select_tokens_per_row], targets[routing.select_tokens]) == (1, 0)
    (hide,) = gm.graph.find_nodes(op="call_function", target=routing.hide_extra_slots)
    assert hide.args[0].target is routing.gather_tokens and hide.args[0].args[0].meta["val"].dim() == 4
    (attention,) = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.scaled_dot_product_attention.default)
    assert attention.args[3] is hide, "the attention reads the mask that hides the extra slots"
    (scatter,) = gm.graph.find_nodes(op="call_function", target=routing.scatter_update)
    extra = scatter.args[-1]
    assert extra.args[0].target is routing.select_tokens_per_row and gm.graph.output_node().args[0][-1] is extra


class QKV(nn.Module):
    """A block with one fused query/key/value projection; subclasses attend in different ways."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)


class Bidirectional(QKV):
    """Attention over every token without a mask: extra slots would be seen."""

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return x + F.scaled_dot_product_attention(q, k, v)


class BidirectionalInFloat32(QKV):
    """The same attention run with autocast off, as models guard it: export keeps it in a subgraph."""

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        with torch.autocast("cpu", enabled=False):
            return x + F.scaled_dot_product_attention(q.float(), k.float(), v.float())


class HandWritten(QKV):
    """Causal attention written out by hand: its mask is not one modpass can edit."""

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        tokens = x.shape[1]
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=x.device).tril()
        scores = (q @ k.transpose(1, 2)).masked_fill(~causal, float("-inf"))
        return x + scores.softmax(-1) @ v


class Broadcasting(QKV):
    """Attention weights from pairwise differences, summed over keys without a product op."""

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        weights = (q.unsqueeze(2) - k.unsqueeze(1)).square().sum(-1).neg().softmax(-1)
        return x + (weights.unsqueeze(-1) * v.unsqueeze(1)).sum(2)


class LinearAttention(QKV):
    """Linear attention: keys and values summed over tokens first (``k.T @ v``), a product with no token axis left."""

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return x + q @ (k.transpose(1, 2) @ v)


class CrossAttention(nn.Module):
    """Attends to another sequence's states: the extra slots are only ever queries."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.q = nn.Linear(width, width)

    def forward(self, x, memory):
        return x + F.scaled_dot_product_attention(self.q(x), memory, memory)


class CausalWithExperts(QKV):
    """Causal attention, then sparse experts that multiply each token's copies by its experts' weights (``bmm``
    with the token axis, folded, on both operands): a product within each token, which cannot see extra slots."""

    def __init__(self, width: int = 16):
        super().__init__(width)
        self.experts = TokenwiseExperts(width)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.experts(x + F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_rewrite_with_row_capacities_accepts_products_within_each_token():
    gm = token_mixing(token_axes(capture_block(CausalWithExperts(), (torch.randn(2, 6, 16),), {})))
    assert any(n.target is torch.ops.aten.bmm.default for n in gm.graph.nodes)
    gm = rewrite(gm, ratio=Fraction(1, 2), explicit_capacity=True, row_capacities=True)
    assert gm.graph.find_nodes(op="call_function", target=routing.select_tokens_per_row)


def test_rewrite_with_row_capacities_accepts_cross_attention():
    gm = token_mixing(token_axes(capture_block(CrossAttention(), (torch.randn(2, 6, 16), torch.randn(2, 5, 16)), {})))
    gm = rewrite(gm, ratio=Fraction(1, 2), explicit_capacity=True, row_capacities=True)
    assert not gm.graph.find_nodes(op="call_function", target=routing.hide_extra_slots), "no mask to edit"


@pytest.mark.parametrize(
    "block, reason",
    [(Bidirectional, "without a mask and not causally"), (BidirectionalInFloat32, "without a mask and not causally"),
     (HandWritten, "written out by hand"), (Broadcasting, "token pairs"),
     (LinearAttention, "relates tokens to each other")],
)
def test_rewrite_refuses_row_capacities_where_attention_could_see_the_extra_slots(block, reason):
    gm = token_mixing(token_axes(capture_block(block(), (torch.randn(2, 6, 16),), {})))
    with pytest.raises(modpass.UnroutableBlockError, match=reason):
        rewrite(gm, ratio=Fraction(1, 2), explicit_capacity=True, row_capacities=True)
    rewrite(gm, ratio=Fraction(1, 2), explicit_capacity=True)  # one capacity per call is fine


def graph_inputs(gm: torch.fx.GraphModule, block: nn.Module, leaves) -> list:
    """The inputs of a captured block graph: the call's tensors by position, then the block's parameters."""
    return [leaves[target] if role == "input" else block.get_parameter(target) for role, target in gm.meta["modpass_inputs"]]


def test_capture_block_writes_out_inferred_view_sizes_so_an_empty_batch_runs():
    model = models.gpt2(layers=2)
    ids = torch.randint(0, 97, (2, 11))
    (args, kwargs) = record_block_calls(model, ["transformer.h.1"], {"input_ids": ids, "use_cache": False})["transformer.h.1"]
    gm = capture_block(model.transformer.h[1], args, kwargs)
    reshapes = [n for n in gm.graph.nodes if n.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default)]
    assert len(reshapes) >= 5, "GPT-2 writes -1 in its head split, head merge and Conv1D flattening"
    assert not [n for n in reshapes if -1 in [s for s in n.args[1] if isinstance(s, int)]]
    written = [s for n in reshapes for s in n.args[1] if isinstance(s, torch.fx.Node)]
    assert written and all("val" in s.meta for s in written), "later passes read meta['val'] of every size"
    # An empty group of sequences (a task absent from a mixed batch under compile) flows through.
    leaves = [leaf[:0] if leaf.shape[0] == 2 else leaf for leaf in _structure.tensors((args, kwargs))]
    block = model.transformer.h[1]
    assert gm(*graph_inputs(gm, block, leaves))[0].shape == (0, 11, 48)


class CrossBlock(nn.Module):
    """Self-attention over x, then cross-attention to memory of another sequence."""

    def __init__(self, width=16):
        super().__init__()
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)

    def forward(self, x, memory):
        k, v = self.kv(memory).chunk(2, dim=-1)
        return x + F.scaled_dot_product_attention(self.q(x), k, v)


def test_cross_attention_memory_is_not_gathered_even_when_its_length_equals_t():
    block = CrossBlock()
    gm = token_axes(capture_block(block, (torch.randn(2, 7, 16), torch.randn(2, 7, 16)), {}))
    hidden, memory = user_inputs(gm)
    assert hidden.meta["modpass_token_axes"] == (1,)
    assert memory.meta["modpass_token_axes"] == ()


class RotaryBlock(nn.Module):
    """A block with a (1, T, head) table, captured where head size equals T."""

    def forward(self, x, table):
        return x + (x.unflatten(-1, (2, 8)) * table.unsqueeze(2)).flatten(-2)


def test_head_size_equal_to_t_is_not_a_token_axis():
    gm = token_axes(capture_block(RotaryBlock(), (torch.randn(2, 8, 16), torch.randn(1, 8, 8)), {}))
    assert user_inputs(gm)[1].meta["modpass_token_axes"] == (1,)


class LeafWeightBlock(nn.Module):
    """A block region as the ``options=`` entry cuts it from a Dynamo graph: its weight arrives as a call input."""

    def forward(self, x, weight):
        return x + F.linear(x, weight)


def test_capture_block_makes_only_the_given_axes_symbolic():
    """Symbols for a weight's sizes would only slow the capture down (5x on a Llama block)."""
    args = (torch.randn(2, 6, 8), torch.randn(8, 8))
    hidden, weight = user_inputs(capture_block(LeafWeightBlock(), args, {}))
    assert all(isinstance(size, torch.SymInt) for size in weight.meta["val"].shape), "by default every axis > 1 is symbolic"
    hidden, weight = user_inputs(capture_block(LeafWeightBlock(), args, {}, dynamic_axes=((0, 1), ())))
    assert [isinstance(size, torch.SymInt) for size in hidden.meta["val"].shape] == [True, True, False]
    assert tuple(weight.meta["val"].shape) == (8, 8)


class ConvBlock(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.conv = nn.Conv1d(width, width, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x.transpose(1, 2)).transpose(1, 2)


class CumsumBlock(nn.Module):
    def forward(self, x):
        return x + x.cumsum(dim=1)


class PoolBlock(nn.Module):
    def forward(self, x):
        return x + x.mean(dim=1, keepdim=True)


class ShiftBlock(nn.Module):
    def forward(self, x):
        return x + F.pad(x[:, :-1], (0, 0, 1, 0))


class ReinterpretBlock(nn.Module):
    """Reads (B, T, D) as (T, B, D) without a transpose: its 'batch' axis then pairs neighbouring tokens."""

    def forward(self, x):
        batch, tokens, width = x.shape
        pairs = x.reshape(tokens, batch, width)
        return x + pairs.mean(1, keepdim=True).expand(tokens, batch, width).reshape(batch, tokens, width)


class FoldBlock(nn.Module):
    """Folds features into the token axis: a softmax over the 'feature' axis then spans tokens."""

    def forward(self, x):
        batch, tokens, width = x.shape
        return x + x.reshape(-1).reshape(width, batch * tokens).softmax(0).reshape(batch, tokens, width)


class TransposedRowsBlock(nn.Module):
    """Adds the rows of (B*T, D) to those of (T*B, D): equal sizes, different tokens in each row."""

    def forward(self, x):
        batch, tokens, width = x.shape
        rows = x.reshape(batch * tokens, width) + x.transpose(0, 1).reshape(tokens * batch, width)
        return x + rows.reshape(batch, tokens, width)


class LengthNormalisedBlock(nn.Module):
    """Divides its update by the sequence length: routed, by the k routed tokens' count."""

    def forward(self, x):
        return x + x.tanh() / x.shape[1]


class LengthScaledBlock(nn.Module):
    """Scales its update by ``T ** -0.5``, a symbolic float computed from the token count."""

    def forward(self, x):
        return x + x.tanh() * x.shape[1] ** -0.5


class LengthFilledBlock(nn.Module):
    def forward(self, x):
        return x + torch.full_like(x, x.shape[1])


class PoolUnderNoGradBlock(nn.Module):
    def forward(self, x):
        with torch.no_grad():
            mean = x.mean(dim=1, keepdim=True)
        return x + mean


class PoolUnderAutocastBlock(nn.Module):
    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            return x + x.float().mean(dim=1, keepdim=True)


class PoolInNestedRegionsBlock(nn.Module):
    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            with torch.no_grad():
                mean = x.float().mean(dim=1, keepdim=True)
            return x + mean


class EinsumPoolBlock(nn.Module):
    """Sums over its tokens in an einsum, which also reads as a product: only one operand carries the tokens."""

    def __init__(self, equation: str):
        super().__init__()
        self.equation = equation

    def forward(self, x):
        return x + torch.einsum(self.equation, x, x.sum(1)).unsqueeze(1)


class LambdaBlock(nn.Module):
    """``x + update(x)``."""

    def __init__(self, update):
        super().__init__()
        self.update = update

    def forward(self, x):
        return x + self.update(x)


class BranchingOnTokensBlock(nn.Module):
    """``torch.cond`` over its tokens: modpass does not read the branches."""

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda x: x.tanh(), lambda x: x.sin(), (x,))


class PoolingBlock(nn.Module):
    def forward(self, x):
        return x + F.avg_pool1d(x.transpose(1, 2), 3, 1, 1).transpose(1, 2)


def scores_attention(x, scores):
    return x + scores.softmax(-1) @ x


def causal_mask(tokens: int) -> torch.Tensor:
    positions = torch.arange(tokens)
    return (positions[:, None] >= positions[None, :]).float()


def banded_attention(x):
    """Attends to the last three positions, the band counted as ``L @ L`` (distance + 1) with ``L`` causal."""
    causal = torch.ones(x.shape[1], x.shape[1]).tril()
    return scores_attention(x, (x @ x.transpose(1, 2)).masked_fill((causal @ causal > 3) | (causal == 0), float("-inf")))


def write_first_and_fourth(y):
    y[:, [0, 3]] = 1.0
    return y


TABLE = torch.randn(1, 8, 32)  # a fixed-size table of positions, read at the token count
MEMORY = torch.randn(1, 5, 8)  # a memory of its own length, for attention from the tokens


class SlidingWindowBlock(nn.Module):
    """Attends to the last three positions: a band counted in slots once routed."""

    def forward(self, x):
        scores = x @ x.transpose(1, 2)
        ones = torch.ones_like(scores, dtype=torch.bool)
        return scores_attention(x, scores.masked_fill(~(ones.tril() & ~ones.tril(-3)), float("-inf")))


class TokenFeatureTriangleBlock(nn.Module):
    """``tril`` of a ``(B, T, D)`` tensor keeps features up to the token's slot index."""

    def forward(self, x):
        return x + x.tril()


class NeighbourScoreBlock(nn.Module):
    """Reads each token's score with its successor (an off-diagonal of the scores)."""

    def forward(self, x):
        following = (x @ x.transpose(1, 2)).diagonal(offset=1, dim1=1, dim2=2)
        return x + torch.cat([following, following[:, -1:]], 1).unsqueeze(-1)


class SinkAttention(nn.Module):
    """GPT-OSS's attention sinks: a learned logit per head appended to the scores as an extra key, dropped after the
    softmax. ``extra="scores"`` appends the scores a second time instead: keys that are tokens, not extras."""

    def __init__(self, extra: str = "sink"):
        super().__init__()
        self.extra = extra
        self.sink = nn.Parameter(torch.randn(()))

    def forward(self, x):
        scores = x @ x.transpose(1, 2)
        extra = self.sink.expand(*scores.shape[:2], 1) if self.extra == "sink" else scores
        probs = torch.cat([scores, extra], dim=-1).softmax(-1)
        return x + probs[..., : x.shape[1]] @ x


@pytest.mark.parametrize(
    "block, reason",
    [(ConvBlock(), "convolves"), (CumsumBlock(), "cumsum"), (PoolBlock(), "reduces over the token axis"), (ShiftBlock(), "token"),
     (ReinterpretBlock(), "spreads one token's position over several axes"),
     (FoldBlock(), "spreads one token's position over several axes"),
     (TransposedRowsBlock(), "whose tokens are laid out differently"),
     (LengthNormalisedBlock(), r"div.Tensor computes with the token count as a number \(other="),
     (LengthScaledBlock(), r"mul.Tensor computes with the token count as a number"),
     (LengthFilledBlock(), r"full_like.default computes with the token count as a number \(fill_value="),
     (PoolingBlock(), "pools or resamples along the token axis"), (SlidingWindowBlock(), r"distance.*tril with offset -3"),
     (TokenFeatureTriangleBlock(), r"relates token indices to the indices of another axis \(features, or a memory.s keys\) \(tril\)"),
     (NeighbourScoreBlock(), r"distance.*diagonal with offset 1"),
     (SinkAttention(extra="scores"), r"cat.default operates along the token axis"),
     (PoolUnderNoGradBlock(), r"mean.dim reduces over the token axis .*test_passes\.py"),
     (PoolUnderAutocastBlock(), r"mean.dim reduces over the token axis"),
     (PoolInNestedRegionsBlock(), r"mean.dim reduces over the token axis"),
     (BranchingOnTokensBlock(), "runs cond, a higher-order op whose subgraphs modpass does not read"),
     (EinsumPoolBlock("btd,bd->bd"), r"reduces over the token axis \(einsum 'btd,bd->bd'\)"),
     (EinsumPoolBlock("...td,...d->...d"), r"reduces over the token axis \(einsum '...td,...d->...d'\)"),
     (LambdaBlock(lambda x: x.transpose(1, 2).sort().values.transpose(1, 2)), r"sort.default operates along the token axis"),
     (LambdaBlock(lambda x: x.masked_scatter(x > 0, 2 * x)), "selects tokens depending on their values"),
     (LambdaBlock(lambda x: x.take(torch.zeros_like(x, dtype=torch.long))), "indexes the tensor flattened"),
     (LambdaBlock(lambda x: x.median() + x.new_zeros(x.shape[-1])), r"median.default reduces the token axis away"),
     (LambdaBlock(lambda x: torch.eye(x.shape[1]).argmax(-1)[:, None]), r"argmax.default sums a pattern over positions"),
     (LambdaBlock(lambda x: causal_mask(x.shape[1]).sum(-1, keepdim=True)), r"sum.dim_IntList sums a pattern over positions"),
     (LambdaBlock(lambda x: x / torch.ones(x.shape[1], x.shape[1]).tril().sum(-1, keepdim=True)), r"sum.dim_IntList sums a pattern"),
     (LambdaBlock(lambda x: x * torch.zeros(x.shape[1], x.shape[1]).softmax(-1)[:, :1]), r"softmax.int sums a pattern"),
     (LambdaBlock(lambda x: x.new_ones(x.shape[0], 1, x.shape[1]) @ x), r"matmul.default sums a pattern over positions"),
     (LambdaBlock(lambda x: torch.einsum("bt,btd->bd", x.new_ones(x.shape[:2]), x)[:, None]), r"einsum.default sums a pattern"),
     (LambdaBlock(lambda x: banded_attention(x)), r"matmul.default sums a pattern over positions"),
     (LambdaBlock(lambda x: write_first_and_fourth(torch.zeros_like(x))), "index_put_.default writes into the token axis at given indices"),
     (LambdaBlock(lambda x: F.interpolate(TABLE, size=x.shape[1]).transpose(1, 2)), r"upsample_nearest1d.vec reads a fixed-size tensor at the token count"),
     (LambdaBlock(lambda x: TABLE[0].as_strided((x.shape[1], 8), (1, 16))), r"as_strided.default reads a fixed-size tensor at the token count"),
     (LambdaBlock(lambda x: x - x.mean(0, keepdim=True)), r"mean.dim relates positions along .* combining its sequences token by token"),
     (LambdaBlock(lambda x: F.scaled_dot_product_attention(x, *[MEMORY.expand(x.shape[0], -1, -1)] * 2, is_causal=True)),
      r"attends causally \(is_causal=True\) between the tokens and keys or queries of another sequence")],
    ids=["conv", "cumsum", "mean-pool", "token-shift", "reinterpret-as-t-b", "fold-features-into-tokens", "transposed-rows",
         "divides-by-length", "scales-by-length", "fills-with-length", "avg-pool", "sliding-window-tril", "tril-over-features",
         "off-diagonal-scores", "scores-appended-twice", "mean-pool-under-no-grad", "mean-pool-under-autocast",
         "mean-pool-in-nested-regions",
         "cond-on-tokens", "einsum-pool", "einsum-pool-under-ellipsis",
         "sort-along-its-default-dim", "masked-scatter", "flat-take", "global-median",
         "positions-from-eye", "positions-counted-from-a-causal-mask", "positions-from-ones-tril", "length-from-a-softmax",
         "pool-with-ones-matmul", "pool-with-ones-einsum", "window-from-a-mask-product", "write-at-listed-tokens",
         "table-interpolated-to-length", "table-read-by-as-strided", "batch-mean-at-each-token",
         "causal-attention-to-a-memory"],
)
def test_token_mixing_refuses_mixing_outside_attention(block, reason):
    gm = token_axes(capture_block(block, (torch.randn(2, 9, 8),), {}))
    with pytest.raises(modpass.UnroutableBlockError, match=reason):
        token_mixing(gm)


@pytest.mark.parametrize("norm_first", [False, True])
def test_token_mixing_refuses_a_sequence_first_block_and_routes_it_batch_first(norm_first):
    """torch's nn.TransformerEncoder takes (T, B, D) unless built with batch_first=True: its layers' second axis, which
    routing takes as the tokens, is the batch, and routing would pick one sequence per position (equal to the dense
    model at full capacity all the same)."""
    torch.manual_seed(0)
    for batch_first in (False, True):
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        x = torch.randn(2, 9, 16) if batch_first else torch.randn(9, 2, 16)
        if not batch_first:
            with pytest.raises(modpass.UnroutableBlockError, match=r"sequence-first \(T, B, D\) layout.*batch_first=True"):
                modpass.transform(encoder, 0.5, example_inputs=(x,))
            continue
        routed = modpass.transform(encoder, 0.5, example_inputs=(x,))
        routed(x)
        assert modpass.routed_blocks(routed)["layers.1"].last_routing[0].index.shape == (2, 5)


class HandWrittenAttention(nn.Module):
    """Two-head self-attention over (T, B, D) written by hand, as ``kind`` does it rather than through a kernel; with
    ``batch_first``, the same code between two transposes, which makes it a batch-first block."""

    def __init__(self, kind, batch_first):
        super().__init__()
        self.kind, self.batch_first = kind, batch_first
        self.qkv, self.out, self.mha = nn.Linear(8, 24), nn.Linear(8, 8), nn.MultiheadAttention(8, 2)

    def forward(self, x):
        if self.batch_first:
            return x + self.attend(x.transpose(0, 1)).transpose(0, 1)
        return x + self.attend(x)

    def attend(self, x):
        if self.kind == "multihead":
            return self.mha(x, x, x)[0]  # need_weights=True, its default, takes the bmm path, not SDPA
        t, b, d = x.shape
        q, k, v = self.qkv(x).split(d, -1)
        if self.kind.startswith("linear"):  # softmax feature maps; the keys and values summed over the tokens
            q, k = q.softmax(-1), k.softmax(-1)
            if self.kind == "linear-einsum":
                return self.out(torch.einsum("tbd,bde->tbe", q, torch.einsum("tbd,tbe->bde", k, v)))
            if self.kind == "linear-causal":  # a running sum of the key-value products along the tokens
                return self.out((q.unsqueeze(-2) @ (k.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(0)).squeeze(-2))
            q, k, v = (z.transpose(0, 1) for z in (q, k, v))
            return self.out((q @ (k.transpose(1, 2) @ v)).transpose(0, 1))
        if self.kind == "matmul-4d":
            q, k, v = (z.view(t, b, 2, d // 2).permute(1, 2, 0, 3) for z in (q, k, v))
            y = (q @ k.transpose(-1, -2)).softmax(-1) @ v
            return self.out(y.permute(2, 0, 1, 3).reshape(t, b, d))
        q, k, v = (z.reshape(t, b * 2, d // 2).transpose(0, 1) for z in (q, k, v))  # fairseq's (B*H, T, dh)
        if self.kind == "bmm":
            scores = torch.bmm(q, k.transpose(1, 2))
        else:  # Megatron's: scaled into a buffer, then causally masked
            scores = torch.baddbmm(torch.zeros(b * 2, t, t), q, k.transpose(1, 2), beta=0.0, alpha=0.5)
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -1e9)
        y = torch.bmm(scores.softmax(-1), v)
        return self.out(y.transpose(0, 1).reshape(t, b, d))


@pytest.mark.parametrize("kind", ["bmm", "matmul-4d", "baddbmm", "multihead", "linear-matmul", "linear-einsum", "linear-causal"])
def test_token_mixing_refuses_sequence_first_attention_written_by_hand(kind):
    """Without a kernel to read the queries of, the products show the layout: q @ k.T pairs rows along the first axis,
    and linear attention sums its keys and values over it, or runs a sum along it. Routed, such a block changed one
    sequence's outputs when another sequence changed, and equalled the dense model at full capacity all the same."""
    torch.manual_seed(0)
    for batch_first in (False, True):
        x = torch.randn(2, 9, 8) if batch_first else torch.randn(9, 2, 8)
        gm = token_axes(capture_block(HandWrittenAttention(kind, batch_first).eval(), (x,), {}))
        if batch_first and kind == "linear-causal":  # a running sum over the tokens, which routing cannot keep
            with pytest.raises(modpass.UnroutableBlockError, match=r"along the token axis \(cumsum\)"):
                token_mixing(gm)
            continue
        if batch_first:
            token_mixing(gm)
            continue
        with pytest.raises(modpass.UnroutableBlockError, match=r"sequence-first \(T, B, D\) layout.*batch_first=True"):
            token_mixing(gm)


class RepeatedCumsumBlock(nn.Module):
    """One line of code making the same token-mixing op three times (as an experts loop makes its indexing)."""

    def forward(self, x):
        for _ in range(3):
            x = x + x.cumsum(dim=1)
        return x


def test_token_mixing_names_each_reason_once_with_a_count():
    gm = token_axes(capture_block(RepeatedCumsumBlock(), (torch.randn(2, 9, 8),), {}))
    with pytest.raises(modpass.UnroutableBlockError) as refusal:
        token_mixing(gm)
    assert str(refusal.value).count("aten.cumsum") == 1
    assert "(3 times)" in str(refusal.value)


class FoldedBiasBlock(nn.Module):
    """Adds a ``(batch * heads, 1, T)`` bias to per-head scores, as Bloom adds its ALiBi tensor."""

    def forward(self, x, bias):
        batch, tokens, width = x.shape
        heads = x.reshape(batch * 4, tokens, width // 4)
        scores = torch.baddbmm(bias, heads, heads.transpose(1, 2)).softmax(-1)
        return x + (scores @ heads).reshape(batch, tokens, width)


def test_token_axes_refuse_a_token_indexed_input_with_the_batch_folded_into_its_first_axis():
    gm = capture_block(FoldedBiasBlock(), (torch.randn(2, 9, 8), torch.randn(8, 1, 9)), {})
    with pytest.raises(modpass.UnroutableBlockError, match=r"input 1 .* is not batch-first: its first axis is the batch folded"):
        token_axes(gm)


def attend(x: torch.Tensor) -> torch.Tensor:
    return (x @ x.transpose(1, 2)).softmax(-1) @ x


class PositionFirstBlock(nn.Module):
    """Takes a per-token embedding first and its residual stream second (``forward(self, pos, x)``)."""

    def forward(self, pos, x):
        x = x + attend(x + pos)
        return x + x.tanh()


class UpdateOnlyBlock(nn.Module):
    """Returns its update alone, which its caller adds to the stream (``x = x + block(x)``, as x-transformers does)."""

    def forward(self, x):
        return attend(x).tanh()


def analysed(block: nn.Module, *args: torch.Tensor) -> torch.fx.GraphModule:
    return token_mixing(token_axes(capture_block(block, args, {})))


def test_residual_stream_refuses_a_block_that_would_pass_skipped_tokens_out_wrong():
    """Routed, the first block passed skipped tokens out as their position embedding, and the second passed them out
    unchanged for its caller to add again (doubled); both equalled the dense model at full capacity."""
    x = torch.randn(2, 9, 8)
    with pytest.raises(modpass.UnroutableBlockError, match=r"residual stream is its tensor input 1 .* not its first argument"):
        residual_stream(analysed(PositionFirstBlock(), torch.randn(2, 9, 8), x))
    with pytest.raises(modpass.UnroutableBlockError, match=r"never adds its input back .* x = x \+ block\(x\)"):
        residual_stream(analysed(UpdateOnlyBlock(), x))


class FunctionBlock(nn.Module):
    """A block whose forward is ``forward``, written out in the test."""

    def __init__(self, forward):
        super().__init__()
        self.function = forward

    def forward(self, x):
        return self.function(x)


def post_norm(x):
    return F.layer_norm(x + attend(x), (8,))


def scaled_residual(x):
    return 0.5 * x + attend(x)


def cast_residual_beside_autocast(x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        update = attend(x)
    return (x.double() + update.double()).float()


@pytest.mark.parametrize("block", [
    LambdaBlock(attend), models.NanoBlock(8, 2), models.InPlaceBlock(8, 2),
    FunctionBlock(post_norm), FunctionBlock(scaled_residual), FunctionBlock(cast_residual_beside_autocast),
], ids=["pre-norm", "nanogpt", "in-place", "post-norm", "scaled", "cast"])
def test_residual_stream_accepts_the_residuals_blocks_write(block):
    gm = analysed(block, torch.randn(2, 9, 8))
    assert residual_stream(gm) is gm


class UpdateOnlyNanoBlock(models.NanoBlock):
    def forward(self, x):
        return self.attend(x, is_causal=True)


class SelfMemoryBlock(nn.Module):
    """Cross-attends to its memory, called with the hidden state as that memory too (``block(x, x)``)."""

    def forward(self, x, memory):
        return x + (x @ memory.transpose(1, 2)).softmax(-1) @ memory.tanh()


class PostNormSelfMemoryBlock(SelfMemoryBlock):
    def forward(self, x, memory):
        return F.layer_norm(super().forward(x, memory), (8,))


def test_residual_stream_refuses_a_block_that_changes_its_hidden_states_dtype():
    """Compiled, the routed block cast its output back to the input's dtype (fp32 where the dense block gave bf16, 1e-2
    off at full capacity); eagerly, it failed inside the router."""
    block = FunctionBlock(lambda x: (x + attend(x)).bfloat16())
    with pytest.raises(modpass.UnroutableBlockError, match=r"takes its hidden state as torch.float32 and returns it as torch.bfloat16"):
        residual_stream(analysed(block, torch.randn(2, 9, 8)))


def test_residual_stream_accepts_the_hidden_state_passed_again_as_another_argument():
    """The capture passes the second a copy, so that export traces them through placeholders of their own (through one,
    the second, the stream looked like input 1 until the eighth session)."""
    x = torch.randn(2, 9, 8)
    for block in (SelfMemoryBlock(), PostNormSelfMemoryBlock()):
        gm = analysed(block, x, x)
        assert residual_stream(gm) is gm
    with pytest.raises(modpass.UnroutableBlockError, match="residual stream is its tensor input 1"):
        residual_stream(analysed(PositionFirstBlock(), x, x.clone()))


class MemoryBlock(models.NanoBlock):
    """A decoder block: causal self-attention, then attention to a memory of its own length (no projections)."""

    def forward(self, x, memory):
        x = x + self.attend(x, is_causal=True)
        x = x + F.scaled_dot_product_attention(self.ln_2(x)[:, None], memory[:, None], memory[:, None])[:, 0]
        return x + self.mlp(self.ln_2(x))


class EmbeddingMemoryGPT(models.NanoGPT):
    """Each block attends to the embedding as its memory: block 0 is called ``block(x, x)``, one tensor for both."""

    block_class = MemoryBlock

    def forward(self, idx, copy_memory=False):
        x = memory = self.embed(idx)
        if copy_memory:
            memory = memory.clone()
        for block in self.h:
            x = block(x, memory)
        return self.lm_head(self.ln_f(x))


def test_a_tensor_passed_twice_to_a_block_routes_as_two_equal_tensors():
    """Export traced one tensor passed twice through one placeholder, so block 0 took its memory for a token-carrying
    input and gathered it with the selected tokens (8% off), unlike block 1 and a copy; and the graph captured so was
    kept for later calls with distinct tensors (wrong again, or a raw size error for a memory of another length)."""
    ids = torch.randint(0, 61, (2, 12))
    routed = {}
    for copy_memory in (False, True):
        torch.manual_seed(0)
        model = EmbeddingMemoryGPT(layers=2).eval()
        routed[copy_memory] = models.randomise_routers(
            modpass.transform(model, 0.5, layers="all", example_inputs={"idx": ids, "copy_memory": copy_memory}), seed=0)
    with torch.no_grad():
        want = routed[True](ids, copy_memory=True)
        for model, copy_memory in ((routed[False], False), (routed[False], True), (routed[True], False)):
            torch.testing.assert_close(model(ids, copy_memory=copy_memory), want, rtol=0, atol=1e-6)


class CallerAddsGPT(models.NanoGPT):
    """Adds each block's output to the stream itself."""

    block_class = UpdateOnlyNanoBlock

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.h:
            x = x + block(x)
        return self.lm_head(self.ln_f(x))


def test_transform_refuses_blocks_whose_caller_adds_the_residual_or_leaves_them_dense_on_request():
    ids = torch.randint(0, 61, (2, 12))
    model = CallerAddsGPT().eval()
    with pytest.raises(modpass.UnroutableBlockError, match=r"block 1 \(h\.1\).*never adds its input back"):
        modpass.transform(model, 0.5, example_inputs=(ids,))
    with pytest.warns(UserWarning, match="leaving a block dense.*never adds its input back"), \
            pytest.raises(modpass.UnroutableBlockError, match="no block could be routed"):
        modpass.transform(model, 0.5, example_inputs=(ids,), unroutable="dense")


class KeywordsOnlyNanoBlock(models.NanoBlock):
    def forward(self, *args, **kwargs):
        return super().forward(kwargs["x"])


class KeywordCallGPT(models.NanoGPT):
    """Calls its blocks with the hidden state by keyword, into a forward that takes ``**kwargs``."""

    block_class = KeywordsOnlyNanoBlock

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.h:
            x = block(x=x)
        return self.lm_head(self.ln_f(x))


def test_a_block_given_no_hidden_state_first_is_refused_by_name():
    """Such a call failed inside modpass with an IndexError."""
    ids = torch.randint(0, 61, (2, 12))
    with pytest.raises(modpass.UnroutableBlockError, match=r"h\.1: a routed block takes the hidden state as its first argument .*"
                       r"not by keyword: its forward's first parameter takes no keyword\); this call gave it keywords 'x'"):
        modpass.transform(KeywordCallGPT().eval(), 0.5, example_inputs=(ids,))
    routed = modpass.transform(models.NanoGPT().eval(), 0.5)
    with pytest.raises(modpass.RoutingInputError, match=r"by the name of the block's first parameter, 'x'\); this call gave it no argument"):
        routed.h[1]()


class FlaggedBlock(nn.Module):
    """Attends over its tokens and then reads a boolean ``(B, T)`` or ``(B, 1, T, T)`` input in ``use``'s way."""

    def __init__(self, use):
        super().__init__()
        self.use = use

    def forward(self, x, flags):
        scores = x @ x.transpose(1, 2)
        return x + self.use(scores, flags, x)


MASK_USES = {  # use -> (flags are 4-D, read as a mask that attends where True)
    "sdpa-attends-where-true": (lambda s, m, x: F.scaled_dot_product_attention(x, x, x, attn_mask=m[:, 0]), True, True),
    "masked-fill-where-false": (lambda s, m, x: s.masked_fill(~m[:, None], -math.inf).softmax(-1) @ x, False, True),
    "masked-fill-where-zero": (lambda s, m, x: s.masked_fill(m[:, None] == 0, torch.finfo(s.dtype).min).softmax(-1) @ x, False, True),
    "where-true-else-minus-inf": (lambda s, m, x: torch.where(m[:, 0], s, -math.inf).softmax(-1) @ x, True, True),
    "masked-fill-where-true": (lambda s, m, x: s.masked_fill(m[:, 0], -1e9).softmax(-1) @ x, True, False),
    "mha-key-padding-mask": (lambda s, m, x: s.masked_fill(m[:, None], -math.inf).softmax(-1) @ x, False, False),
    "picks-between-two-updates": (lambda s, m, x: torch.where(m[..., None], s.softmax(-1) @ x, x.tanh()), False, False),
    "zeroes-where-false": (lambda s, m, x: s.softmax(-1) @ x.masked_fill(~m[..., None], 0.0), False, False),
}


@pytest.mark.parametrize("use", MASK_USES)
def test_a_boolean_input_is_read_as_padding_only_where_it_masks_attention_true_for_attend(use):
    """Padding flags keep their tokens out of the block. A boolean input used otherwise (a modality flag that picks
    an MLP, nn.MultiheadAttention's key_padding_mask, True where padding) was read as padding all the same, and the
    routed model left those tokens unchanged at full capacity too."""
    function, four_d, read = MASK_USES[use]
    flags = torch.rand(2, 9) > 0.3
    flags = flags[:, None, None, :].expand(2, 1, 9, 9) if four_d else flags
    gm = analysed(FlaggedBlock(function), torch.randn(2, 9, 8), flags)
    found = mask_input(user_inputs(gm))
    assert (found is user_inputs(gm)[1]) == read


FLOAT_KEY_MASK_USES = {  # use -> read as an additive key mask
    "sdpa-attn-mask": (lambda s, m, x: F.scaled_dot_product_attention(x, x, x, attn_mask=m[:, None]), True),
    "added-to-scores": (lambda s, m, x: (s + m[:, None]).softmax(-1) @ x, True),
    "scales-the-values": (lambda s, m, x: s.softmax(-1) @ (x * m[..., None]), False),
}


@pytest.mark.parametrize("use", FLOAT_KEY_MASK_USES)
def test_a_floating_key_mask_is_read_as_padding_where_it_is_added_to_attention_scores(use):
    """BERT's extended mask, ``(1 - mask) * -10000`` (of shape ``(B, 1, 1, T)`` there, ``(B, T)`` here): unread until the
    ninth session, so its padding could be selected and counted as work."""
    function, read = FLOAT_KEY_MASK_USES[use]
    keep = torch.ones(2, 9)
    keep[0, 6:] = 0
    additive = (1 - keep) * -10000.0
    gm = analysed(FlaggedBlock(function), torch.randn(2, 9, 8), additive)
    found = mask_input(user_inputs(gm))
    assert (found is user_inputs(gm)[1]) == read
    if read:
        assert routing.padding_from_key_mask(additive[:, None, None], 2).tolist() == (keep == 0).tolist()


class ModalityBlock(models.NanoBlock):
    """One MLP for image tokens, another for text (a mixture of modality experts), picked by a per-token flag."""

    def forward(self, x, is_image):
        x = x + self.attend(x, is_causal=True)
        h = self.ln_2(x)
        return x + torch.where(is_image[..., None], self.mlp(h), h.tanh())


class ModalityGPT(models.NanoGPT):
    block_class = ModalityBlock

    def forward(self, idx, is_image):
        x = self.embed(idx)
        for block in self.h:
            x = block(x, is_image)
        return self.lm_head(self.ln_f(x))


def test_a_per_token_flag_picking_the_update_routes_like_the_dense_model_at_full_capacity():
    model = ModalityGPT().eval()
    ids, is_image = torch.randint(0, 61, (2, 12)), torch.rand(2, 12) > 0.5
    routed = modpass.transform(model, 1.0, example_inputs=(ids, is_image))
    with torch.no_grad():
        torch.testing.assert_close(routed(ids, is_image), model(ids, is_image))


def test_capture_block_gives_a_block_that_writes_its_hidden_state_in_place_a_copy_to_write():
    """``x += ...``: the routed graph reads the selected tokens again after the block, so the block must not write
    into them (tests/test_equivalence.py checks the routed outputs)."""
    hidden = torch.randn(2, 9, 32)
    written = capture_block(models.InPlaceBlock(32, 4), (hidden,), {})
    assert written.meta["modpass_writes_hidden_state"]
    assert [user.target for user in user_inputs(written)[0].users] == [torch.ops.aten.clone.default]
    assert not placeholders_written_in_place(written)
    plain = capture_block(models.NanoBlock(32, 4), (hidden,), {})
    assert not plain.meta["modpass_writes_hidden_state"]
    assert torch.ops.aten.clone.default not in {node.target for node in plain.graph.nodes}


class SideInputWritingBlock(nn.Module):
    """Zeroes the first key of its additive mask in place, through a view: a later block would read the change."""

    def forward(self, x, bias):
        bias[..., 0] = 0.0
        return x + (x.softmax(1) + bias.sum(-1, keepdim=True))


class StashingBlock(nn.Module):
    """Keeps its update for a later look (a debugging hook, an auxiliary loss read after the forward)."""

    def forward(self, x):
        self.stash = x.tanh()
        return x + self.stash


class CountingBlock(nn.Module):
    """Counts its calls in a buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x.tanh()


class RunningMeanBlock(nn.Module):
    """Keeps a running mean of its tokens, updated without gradient as running statistics are: export keeps the
    update in a subgraph (``wrap_with_set_grad_enabled``)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(8))

    def forward(self, x):
        with torch.no_grad():
            self.mean.mul_(0.9).add_(0.1 * x.mean((0, 1)))
        return x.tanh()


STATE_CHANGES = {
    "side-input-written": (SideInputWritingBlock, 2, r"writes its input 1 \(shape \(s\d+, s\d+, s\d+\)\) in place \(aten\.(fill_|copy_)\.\w+ at File .*test_passes\.py"),
    "attribute-assigned": (StashingBlock, 1, r"assigns tensor attributes \(stash\)\. A routed call runs the block's captured graph"),
    "buffer-updated": (CountingBlock, 1, r"updates state in place \(calls\)"),
    "buffer-updated-without-grad": (RunningMeanBlock, 1, r"updates state in place \(mean\)"),
}


@pytest.mark.parametrize("change", STATE_CHANGES)
def test_capture_block_refuses_a_block_that_changes_state_a_routed_call_would_not(change):
    block_class, inputs, message = STATE_CHANGES[change]
    args = (torch.randn(2, 9, 8), torch.randn(2, 9, 9))[:inputs]
    with pytest.raises(modpass.CaptureError, match=message):
        capture_block(block_class(), args, {})


class LengthBranchingBlock(nn.Module):
    """Scales its update only for sequences longer than 8 tokens: a graph traced at 9 tokens drops the other branch."""

    def forward(self, x):
        update = x.tanh()
        return x + (2 * update if x.shape[1] > 8 else update)


def test_capture_block_refuses_a_block_whose_code_branches_on_the_token_count():
    for tokens, holds_for in ((9, r"\[9, int_oo\]"), (5, r"\[2, 8\]")):
        with pytest.raises(modpass.CaptureError, match=rf"branches on the size of its hidden state.*a token count in {holds_for}"):
            capture_block(LengthBranchingBlock(), (torch.randn(2, tokens, 8),), {})


    with pytest.raises(modpass.CaptureError, match=r"holds only where Eq\(Mod\(T, 2\), 0\) \(at .*test_passes.py:\d+ in <lambda>\), which fails for a token count of 3"):
        capture_block(LambdaBlock(lambda x: 2 * x if x.shape[1] % 2 == 0 else x), (torch.randn(2, 16, 8),), {})
    with pytest.raises(modpass.CaptureError, match=r"holds only where Eq\(Mod\(B, 2\), 0\) .*, which fails for a batch of 3"):
        capture_block(LambdaBlock(lambda x: 2 * x if x.shape[0] % 2 == 0 else x), (torch.randn(4, 16, 8),), {})


def test_token_axes_says_why_export_fixed_the_token_count():
    gm = capture_block(LambdaBlock(lambda x: x * math.log(x.shape[1])), (torch.randn(2, 16, 8),), {})
    with pytest.raises(modpass.UnroutableBlockError, match=r"export fixed the block's token count to 16: its code takes the length as a Python number \(math.log\(T\)"):
        token_axes(gm)
    empty = capture_block(LambdaBlock(torch.tanh), (torch.randn(2, 0, 8),), {})  # blamed the block's code until the ninth session
    with pytest.raises(modpass.UnroutableBlockError, match=r"the call has no tokens \(a sequence length of 0\)"):
        token_axes(empty)


@pytest.mark.parametrize("upper, refused", [(2**63 + 1, False), (2**16, True)], ids=["past-any-size", "bounded"])
def test_capture_block_reads_an_upper_bound_no_tensor_reaches_as_no_bound(upper, refused):
    """Torch before 2.8 bounds the token count by 2**63 + 1, not infinity, after ``diagonal(offset=1)``."""
    from torch.utils._sympy.value_ranges import ValueRanges

    program = torch.export.export(nn.Tanh(), (torch.randn(2, 9, 8),), dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},), strict=False)
    tokens = next(iter(program.graph.find_nodes(op="placeholder"))).meta["val"].shape[1].node.expr
    program._range_constraints = {**program.range_constraints, tokens: ValueRanges(2, upper)}
    if refused:
        with pytest.raises(modpass.CaptureError, match=rf"a token count in \[2, {upper}\]"):
            refuse_size_assumptions(program, "block")
    else:
        refuse_size_assumptions(program, "block")

# The ways of reading the first T rows of a table that stay refused (``table[:T]`` and ``narrow`` are read per
# sequence, see test_token_tables.py); export records the range [2, 64] for split_with_sizes, and traces split for
# one token count without a guard (so only the table check can refuse it).
def split_without_grad(table, tokens):
    with torch.no_grad():  # export keeps this in a subgraph, which the check reads too
        return table.split(tokens)[0]


TABLE_READS = {
    "split": (lambda table, tokens: table.split(tokens)[0], r"table split to the token count along dim 0 \[File .*test_passes.py.*\]\)\. Routed"),
    "split_with_sizes": (lambda table, tokens: table.split([tokens, 64 - tokens])[0], r"table split .* in \[2, 64\]"),
    "split-under-no-grad": (split_without_grad, r"table split to the token count along dim 0 \[File .*test_passes.py.*\]\)\. Routed"),
}


class PositionTableBlock(nn.Module):
    """Adds learned positions read by length (``read(table, T)``, say ``table[:T]``): routed, the k selected
    tokens would get rows 0..k-1."""

    def __init__(self, as_buffer: bool, read):
        super().__init__()
        table = torch.randn(64, 8)
        if as_buffer:
            self.register_buffer("table", table)
        else:
            self.table = nn.Parameter(table)
        self.read = read

    def forward(self, x):
        return x + self.read(self.table, x.shape[1])


@pytest.mark.parametrize("as_buffer", [False, True], ids=["parameter", "buffer"])
@pytest.mark.parametrize("read", TABLE_READS)
def test_capture_block_refuses_a_block_that_reads_a_table_by_its_token_count(as_buffer, read):
    cut, message = TABLE_READS[read]
    with pytest.raises(modpass.CaptureError, match=r"reads a fixed-size table by its token count \(" + message):
        capture_block(PositionTableBlock(as_buffer, cut), (torch.randn(2, 16, 8),), {})


class PassedTableBlock(nn.Module):
    def forward(self, x, table):
        return x + table.split(x.shape[1])[0]


def test_a_table_passed_in_and_cut_to_the_token_count_is_named_by_its_place_in_the_call():
    """Named by export's placeholder (``tensors_1``) until the ninth session."""
    block = PassedTableBlock()
    with pytest.raises(modpass.CaptureError, match=r"tensor input 1 of the call \(counting from 0\) split to the token count"):
        capture_block(block, (torch.randn(2, 16, 8), torch.randn(64, 8)), {})


def test_unflatten_is_followed_like_any_view():
    """Flattening the tokens with the features and unflattening them back keeps each token's position (refused as
    "operates along the token axis" until the tenth session); unflattening them the other way spreads it."""
    back = LambdaBlock(lambda x: x.flatten(1).unflatten(1, (x.shape[1], x.shape[2])).softmax(-1))
    token_mixing(token_axes(capture_block(back, (torch.randn(2, 9, 8),), {})))
    spread = LambdaBlock(lambda x: x.flatten(1).unflatten(1, (x.shape[2], x.shape[1])).transpose(1, 2))
    with pytest.raises(modpass.UnroutableBlockError, match="spreads one token's position over several axes"):
        token_mixing(token_axes(capture_block(spread, (torch.randn(2, 9, 8),), {})))


def test_a_slice_of_tokens_joined_with_other_rows_is_not_called_a_token_shift():
    registers = torch.randn(1, 2, 8)
    block = LambdaBlock(lambda x: torch.cat([registers.expand(x.shape[0], -1, -1), x], 1)[:, 2:])
    with pytest.raises(modpass.UnroutableBlockError, match="slices an axis holding the tokens and other rows") as refusal:
        token_mixing(token_axes(capture_block(block, (torch.randn(2, 9, 8),), {})))
    assert "token shift" not in str(refusal.value)


class ChannelFirstBlock(nn.Module):
    """Attention over a ``(B, D, T)`` hidden state, projected by 1-D convolutions."""

    def __init__(self, width=8):
        super().__init__()
        self.qkv, self.out = nn.Conv1d(width, 3 * width, 1), nn.Conv1d(width, width, 1)

    def forward(self, x):
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).chunk(3, 1))
        return x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2))


def test_a_channel_first_block_is_refused_naming_the_layout():
    """Refused as a block that fixes its token count (to the width, 8), without a word of the layout, until the ninth
    session."""
    with pytest.raises(modpass.UnroutableBlockError, match=r"fixed the block's token count to 8: .* Or the block is "
                       r"channel-first, \(batch, features, tokens\), its second axis the width"):
        token_axes(capture_block(ChannelFirstBlock(), (torch.randn(2, 8, 12),), {}))


class TokenwiseExperts(nn.Module):
    """A sparse MoE dispatched row by row, as transformers' ``batched_mm`` experts: each token's k copies
    meet their experts' weights, then fold back onto the token."""

    def __init__(self, width=8, experts=4, top=2):
        super().__init__()
        self.top = top
        self.gate = nn.Linear(width, experts, bias=False)
        self.weights = nn.Parameter(torch.randn(experts, width, width) / width**0.5)

    def forward(self, x):
        batch, tokens, width = x.shape
        rows = x.view(-1, width)
        scores, experts = self.gate(rows).softmax(-1).topk(self.top, dim=-1)
        copies = rows.repeat_interleave(self.top, dim=0)
        out = torch.bmm(self.weights[experts.reshape(-1)], copies.unsqueeze(-1)).squeeze(-1) * scores.reshape(-1, 1)
        return x + out.view(batch * tokens, self.top, width).sum(1).reshape(batch, tokens, width)


@torch.library.custom_op("modpass_tests::shift_tokens", mutates_args=())
def shift_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.roll(1, dims=1)


@torch.library.custom_op("modpass_tests::fused_norm", mutates_args=())
def fused_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, x.shape[-1:])


for _op in (shift_tokens, fused_norm):
    _op.register_fake(torch.empty_like)


def test_token_mixing_refuses_custom_ops_on_tokens_until_declared_position_wise(monkeypatch):
    """An op outside aten could shift tokens (as this one does) as well as normalise each (as the other does):
    modpass cannot tell, so both are refused, and a declared op routes."""
    monkeypatch.setattr(token_mixing_module, "POSITION_WISE_OPS", set(token_mixing_module.POSITION_WISE_OPS))
    for op, name in ((shift_tokens, "modpass_tests::shift_tokens"), (fused_norm, "modpass_tests::fused_norm")):
        gm = token_axes(capture_block(LambdaBlock(op), (torch.randn(2, 9, 8),), {}))
        with pytest.raises(modpass.UnroutableBlockError, match=rf"runs {name}, an op modpass cannot read, on tokens; .* "
                                                             rf"modpass.declare_position_wise\('{name}'\)"):
            token_mixing(gm)
    modpass.declare_position_wise(torch.ops.modpass_tests.fused_norm)
    assert token_mixing(gm) is gm
    with pytest.raises(modpass.ConfigError, match="custom ops as 'namespace::name'"):
        modpass.declare_position_wise(torch.ops.aten.cumsum.default)


def test_token_mixing_reads_quantization_blocks_along_the_tokens():
    """torchao's dynamic activation quantization: scales per token route, one scale over the tokens does not."""
    torchao = pytest.importorskip("torchao.quantization.quant_primitives")

    class Quantized(nn.Module):
        def __init__(self, per_token: bool):
            super().__init__()
            self.per_token = per_token

        def forward(self, x):
            block = [1, 1, x.shape[-1]] if self.per_token else list(x.shape)
            scale, zero = torchao.choose_qparams_affine(x, torchao.MappingType.SYMMETRIC, block, torch.int8)
            return x + torchao.dequantize_affine(torchao.quantize_affine(x, block, scale, zero, torch.int8), block, scale, zero, torch.int8)

    routable = token_axes(capture_block(Quantized(per_token=True), (torch.randn(2, 9, 8),), {}))
    assert token_mixing(routable) is routable
    shared = token_axes(capture_block(Quantized(per_token=False), (torch.randn(2, 9, 8),), {}))
    with pytest.raises(modpass.UnroutableBlockError, match=r"quantizes with parameters shared across tokens \(block_size=\[s"):
        token_mixing(shared)


def test_token_mixing_follows_token_copies_through_an_experts_dispatch():
    gm = token_axes(capture_block(TokenwiseExperts(), (torch.randn(2, 9, 8),), {}))
    assert token_mixing(gm) is gm


def test_token_mixing_accepts_a_causal_mask_from_positions_counted_inside_the_block():
    class InnerCausalMask(nn.Module):
        def forward(self, x):
            positions = torch.arange(x.shape[1], device=x.device)
            causal = positions[:, None] >= positions[None, :]  # order only: the gather keeps it
            return x + (x @ x.transpose(1, 2)).masked_fill(~causal, float("-inf")).softmax(-1) @ x

    gm = token_axes(capture_block(InnerCausalMask(), (torch.randn(2, 9, 8),), {}))
    assert token_mixing(gm) is gm


class FeatureBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` over the features of a ``(B, T, D)`` hidden state, in place of a layer norm (as PatchTST's layers)."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class BatchNormBlock(models.NanoBlock):
    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__(width, heads, causal)
        self.ln_2 = FeatureBatchNorm(width)


class BatchNormGPT(models.NanoGPT):
    block_class = BatchNormBlock


def test_batch_norm_routes_in_eval_and_is_refused_where_it_computes_statistics():
    torch.manual_seed(0)
    model = BatchNormGPT(layers=2)
    for block in model.h:
        block.ln_2.running_mean.normal_()
        block.ln_2.running_var.uniform_(0.5, 2.0)
    model.eval()
    ids = torch.randint(0, 61, (2, 12))
    routed = modpass.transform(model, 0.5, layers=[1], example_inputs=ids)
    hidden = model.h[0](model.embed(ids))
    # Zero routers select the first six tokens, which causal attention keeps to themselves.
    torch.testing.assert_close(routed.h[1](hidden), torch.cat([model.h[1](hidden[:, :6]), hidden[:, 6:]], 1))
    with pytest.raises(modpass.CaptureError, match=r"updates state in place \(ln_2\.num_batches_tracked\)"):
        routed.train()  # the switch prepares the blocks' training graphs
    torch.testing.assert_close(routed.eval().h[1](hidden)[:, 6:], hidden[:, 6:])
    stateless = BatchNormBlock(8, 2)
    stateless.ln_2 = FeatureBatchNorm(8, track_running_stats=False)  # batch statistics in eval too
    gm = token_axes(capture_block(stateless.eval(), (torch.randn(2, 9, 8),), {}))
    with pytest.raises(modpass.UnroutableBlockError, match=r"batch_norm.default normalises with statistics over tokens"):
        token_mixing(gm)


def test_token_mixing_accepts_patterns_that_compare_order_and_writes_by_a_per_token_mask():
    def masked_attention(x):
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        return scores_attention(x, (x @ x.transpose(1, 2)).masked_fill(~causal, float("-inf")))

    def zero_where_negative(x):
        y = x.clone()
        y[x[..., 0] < 0] = 0.0  # a boolean (B, T) mask: each token's own
        return y

    def scores_kept_in_a_buffer(x):
        scores = torch.zeros(x.shape[0], x.shape[1], x.shape[1])
        scores[:, :] = x @ x.transpose(1, 2)  # written through a view: a pattern no more, it holds the scores
        return scores.softmax(-1) @ x

    for update in (masked_attention, zero_where_negative, scores_kept_in_a_buffer):
        gm = token_axes(capture_block(LambdaBlock(update), (torch.randn(2, 9, 8),), {}))
        assert token_mixing(gm) is gm


def test_token_mixing_accepts_attention_sinks_appended_to_the_scores():
    gm = token_axes(capture_block(SinkAttention(), (torch.randn(2, 9, 8),), {}))
    assert token_mixing(gm) is gm


def test_token_mixing_accepts_eager_attention():
    class EagerAttention(nn.Module):
        def forward(self, x):
            scores = (x @ x.transpose(1, 2)).softmax(dim=-1)
            return x + scores @ x

    gm = token_axes(capture_block(EagerAttention(), (torch.randn(2, 9, 8),), {}))
    assert token_mixing(gm) is gm


def test_token_mixing_accepts_attention_written_as_einsums():
    class EinsumAttention(nn.Module):
        def forward(self, x):
            heads = x.unflatten(-1, (2, 4))
            scores = torch.einsum("bqhd,bkhd->bhqk", heads, heads).softmax(dim=-1)
            return x + torch.einsum("...qk,b k h d -> b q h d", scores, heads).flatten(-2)

    gm = token_axes(capture_block(EinsumAttention(), (torch.randn(2, 9, 8),), {}))
    assert token_mixing(gm) is gm


def test_token_mixing_reads_stack_as_pairing_positions():
    """``stack`` pairs the elements at each position, whichever axis it adds: along the tokens' (``dim=1``) or, by
    default, the batch's (read with its default axis, it would have counted as combining sequences)."""
    for dim in (0, 1):
        gm = token_axes(capture_block(LambdaBlock(lambda x, dim=dim: torch.stack([x, x.tanh()], dim).sum(dim)), (torch.randn(2, 9, 8),), {}))
        assert token_mixing(gm) is gm
        assert not gm.meta["modpass_batch_mixing"]


def test_token_mixing_reads_a_two_tensor_max_as_elementwise_and_notes_what_mixes_the_batch():
    class ClampedAndCentred(nn.Module):
        def forward(self, x, c):
            floor = torch.full((), -1.0)
            return torch.max(x, floor) + (c - c.mean(dim=0))[:, None]  # XGLM clamps its scores so

    gm = token_mixing(token_axes(capture_block(ClampedAndCentred(), (torch.randn(2, 9, 8), torch.randn(2, 8)), {})))
    assert [reason.split(" [")[0] for reason in gm.meta["modpass_batch_mixing"]] == ["aten.mean.dim"]


def test_token_mixing_accepts_the_token_count_as_a_size():
    class SizedByLength(nn.Module):
        def __init__(self, width=8):
            super().__init__()
            self.bias = nn.Parameter(torch.randn(width))

        def forward(self, x, mask):
            batch, tokens, width = x.shape
            heads = x.view(batch, tokens, 2, width // 2).transpose(1, 2)
            scores = heads @ heads.transpose(-1, -2) + mask[:, :, :tokens, :tokens]
            mixed = (scores.softmax(-1) @ heads).transpose(1, 2).reshape(batch, tokens, width)
            return x + mixed + self.bias.expand(tokens, width) + x.new_zeros(batch, tokens, 1)

    gm = token_axes(capture_block(SizedByLength(), (torch.randn(2, 9, 8), torch.zeros(2, 1, 9, 9)), {}))
    assert token_mixing(gm) is gm


def test_token_mixing_accepts_index_relations_that_compare_only_order():
    class OrderOnly(nn.Module):
        def forward(self, x):
            scores = x @ x.transpose(1, 2)
            causal = scores + torch.full_like(scores, float("-inf")).triu(1)  # keys after the query
            own = scores.diagonal(dim1=1, dim2=2).unsqueeze(-1)  # each token with itself
            return scores_attention(x, causal - torch.eye(x.shape[1])) + own

    gm = token_axes(capture_block(OrderOnly(), (torch.randn(2, 9, 8),), {}))
    assert token_mixing(gm) is gm


@pytest.mark.parametrize("misreads", [True, False], ids=["torch-2.6", "torch-2.7+"])
def test_unbacked_views_copy_only_what_a_view_reads_out_of_order(monkeypatch, misreads):
    """nanoGPT splits q, k, v off one projection and views each: those inputs are strided, the rest are not."""
    monkeypatch.setattr(_compat, "INDUCTOR_MISREADS_UNBACKED_VIEWS", misreads)
    model = models.NanoGPT(layers=2)
    (args, kwargs) = record_block_calls(model, ["h.1"], {"idx": torch.randint(0, 61, (2, 9))})["h.1"]
    gm = capture_block(model.h[1], args, kwargs)
    reshapes = [n for n in gm.graph.nodes if n.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default)]
    split_views = [n for n in reshapes if n.args[0].target is operator.getitem]
    assert len(split_views) == 3, "q, k and v, each viewed once"
    gm = unbacked_views(gm)
    copies = [n for n in gm.graph.nodes if n.target is _compat.contiguous_while_compiling]
    if not misreads:
        assert not copies
        return
    assert len(copies) == 3
    assert all(n.args[0] in copies for n in split_views)
    assert all(n.args[0].meta["val"].is_contiguous() for n in reshapes if n not in split_views)
    block = model.h[1]
    torch.testing.assert_close(gm(*graph_inputs(gm, block, args))[0], block(*args, **kwargs), rtol=0, atol=0,
                               msg="eager mode copies nothing")


@pytest.mark.parametrize("guards", [True, False], ids=["torch-2.12-and-older", "torch-2.13+"])
def test_unbacked_attention_masks_take_only_masked_cpu_attention(monkeypatch, guards):
    """Llama's attention reads a 4-D mask in a padded batch and none without padding; eager mode runs the same op."""
    monkeypatch.setattr(_compat, "CPU_ATTENTION_GUARDS_ON_MASK_BATCH", guards)
    model = models.llama(layers=2)
    ids = torch.randint(0, 97, (2, 9))
    padding = torch.ones_like(ids)
    padding[0, :3] = 0
    for attention_mask, masked in ((padding, True), (None, False)):
        (args, kwargs) = record_block_calls(model, ["model.layers.1"], {"input_ids": ids, "attention_mask": attention_mask, "use_cache": False})[
            "model.layers.1"]
        gm = capture_block(model.model.layers[1], args, kwargs)
        attention = [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
        assert len(attention) == 1
        gm = unbacked_attention_masks(gm)
        assert attention[0].target is (_compat.masked_attention_while_compiling if guards and masked else
                                       torch.ops.aten.scaled_dot_product_attention.default)
        block = model.model.layers[1]
        got = gm(*graph_inputs(gm, block, _structure.tensors((args, kwargs))))[0]
        want = block(*args, **kwargs)
        want = want if isinstance(want, torch.Tensor) else want[0]
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg="eager mode runs the aten op")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("enable_gqa", [False, True], ids=["heads", "grouped-heads"])
@pytest.mark.parametrize("key_strided", [False, True], ids=["contiguous-mask", "key-strided-mask"])
def test_masked_attention_while_compiling_runs_what_attention_runs(autocast, mask_dtype, enable_gqa, key_strided):
    """The flash-attention call the workaround makes while compiling gives what attention gives, on a data-dependent
    batch, also for a mask whose key axis is strided, as a gathered mask's is (torch 2.6 and 2.7's kernel misreads it)."""
    q = torch.randn(4, 4, 8, 6)
    k, v = torch.randn(2, 4, 2 if enable_gqa else 4, 8, 6).unbind(0)
    q = q.bfloat16() if autocast else q  # a projection's output under autocast, beside keys rotated in float32
    allowed = torch.rand(4, 1, 8, 8) > 0.3
    allowed[..., 0] = True
    mask = allowed if mask_dtype == torch.bool else torch.zeros(allowed.shape).masked_fill(~allowed, -1e4)
    ids = torch.tensor([0, 1, 0, 0])

    def attend(attention, q, k, v, mask, ids):
        rows = (ids == 0).nonzero().squeeze(1)  # a task's group: its size depends on data
        q, k, v, mask = (t.index_select(0, rows) for t in (q, k, v, mask))
        if key_strided:
            mask = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
        return attention(q, k, v, mask, enable_gqa=enable_gqa)

    torch._dynamo.reset()  # each case compiles `attend` afresh, not as a recompile of the last
    compiled = torch.compile(functools.partial(attend, _compat.masked_attention_while_compiling), backend="eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = compiled(q, k, v, mask, ids)
        want = attend(torch.nn.functional.scaled_dot_product_attention, q, k, v, mask, ids)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-2 if autocast else 1e-5, atol=1e-2 if autocast else 1e-5)
