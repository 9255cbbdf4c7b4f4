"""Blocks that trace alike share one capture (modpass.capture_sharing); a block whose forward reads a value of its own
captures its own graph, and each runs with its own weights."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn

import modpass
from modpass._export import AttributeReads
from modpass.capture_sharing import SharedCaptures, TraceDependencies, frozen
from modpass.passes.capture_block import capture_block
from tests import models
from tests.test_equivalence import close_to_dense


class ScaledBlock(models.NanoBlock):
    """A block whose residual branches are scaled by ``scale``, which its forward reads; ``index`` is never read."""

    scale = 1.0
    index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.scale * self.attend(x, is_causal=True)
        return x + self.scale * self.mlp(self.ln_2(x))


class ScaledGPT(models.NanoGPT):
    block_class = ScaledBlock

    def __init__(self, scales: list[float]):
        super().__init__(layers=len(scales))
        for index, (block, scale) in enumerate(zip(self.h, scales)):
            block.index, block.scale = index, scale


class WholeDictBlock(models.NanoBlock):
    """Reads its own ``__dict__``: any attribute it holds may change what it computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + vars(self).get("scale", 1.0) * self.attend(x, is_causal=True)


class WholeDictGPT(ScaledGPT):
    block_class = WholeDictBlock


def captures(model: nn.Module) -> list[set[int]]:
    """The captures the routed blocks of ``model`` run, one set of graph ids per call structure."""
    blocks = list(modpass.routed_blocks(model).values())
    return [{id(block._analyses[key][0]) for block in blocks} for key in blocks[0]._analyses]


def unshared(monkeypatch) -> None:
    monkeypatch.setattr(SharedCaptures, "find", lambda self, structure, block: None)


def test_blocks_that_differ_only_in_what_their_forward_never_reads_share_one_capture(monkeypatch):
    torch.manual_seed(0)
    dense = ScaledGPT([0.5] * 4).eval()
    ids = torch.randint(0, 61, (2, 12))
    routed = models.randomise_routers(modpass.transform(dense, 0.5, layers="all"), seed=1)
    assert [len(graphs) for graphs in captures(routed)] == [1]
    unshared(monkeypatch)
    alone = models.randomise_routers(modpass.transform(dense, 0.5, layers="all"), seed=1)
    assert [len(graphs) for graphs in captures(alone)] == [4]
    with torch.no_grad():
        torch.testing.assert_close(routed(ids), alone(ids), rtol=0, atol=0)
        close_to_dense(modpass.transform(dense, 1.0, layers="all")(ids), dense(ids))


@pytest.mark.parametrize("model", ["scaled", "whole_dict"])
def test_a_value_the_forward_reads_keeps_each_layer_to_the_captures_of_its_value(model):
    """Layers 0 and 2 scale by 1, layers 1 and 3 by 0.5: two captures, each taken by the layers of its scale. A forward
    that reads its ``__dict__`` depends on every attribute, the unread ``index`` too: four captures."""
    torch.manual_seed(0)
    dense = (ScaledGPT if model == "scaled" else WholeDictGPT)([1.0, 0.5, 1.0, 0.5]).eval()
    routed = modpass.transform(dense, 1.0, layers="all")
    blocks = list(modpass.routed_blocks(routed).values())
    (graphs,) = captures(routed)
    if model == "scaled":
        assert len(graphs) == 2
        assert blocks[0]._analyses == blocks[2]._analyses and blocks[1]._analyses == blocks[3]._analyses
    else:
        assert len(graphs) == 4
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        close_to_dense(routed(ids), dense(ids))


def test_gpt2_scaling_attention_by_its_layer_index_captures_each_layer():
    """GPT-2's scale_attn_by_inverse_layer_idx divides each layer's scores by its layer_idx + 1; without that setting
    the layers share one capture per call structure."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ids = torch.randint(0, 97, (2, 9))
    layers = 3
    for by_layer, per_structure in ((True, layers), (False, 1)):
        config = GPT2Config(n_layer=layers, n_embd=48, n_head=4, vocab_size=97, n_positions=128,
                            scale_attn_by_inverse_layer_idx=by_layer, attn_implementation="eager")
        dense = GPT2LMHeadModel(config).eval()
        routed = modpass.transform(dense, 1.0, layers="all")
        assert {len(graphs) for graphs in captures(routed)} == {per_structure}
        with torch.no_grad():
            close_to_dense(routed(input_ids=ids).logits, dense(input_ids=ids).logits)


def test_what_a_capture_read_is_kept_as_it_was_then():
    """A list the forward reads, changed after the capture, no longer matches what the capture traced."""

    class ListScaledBlock(models.NanoBlock):
        def forward(self, x):
            return x + self.scales[0] * self.mlp(self.ln_2(x))

    block = ListScaledBlock(32, 4)
    block.scales = [0.5]
    gm = capture_block(block, (torch.randn(2, 5, 32),), {})
    dependencies = gm.meta["modpass_trace_dependencies"]
    assert dependencies.hold_for(block)
    twin = copy.deepcopy(block)
    assert dependencies.hold_for(twin)  # its own list, the same values
    block.scales[0] = 2.0
    assert not dependencies.hold_for(block)
    twin.ln_2 = nn.LayerNorm(32, eps=1e-3)  # a part replaced by another with other settings (eps is read)
    assert not dependencies.hold_for(twin)


def test_a_parameter_of_a_tensor_subclass_is_never_shared():
    class Tagged(nn.Parameter):
        pass

    block = models.NanoBlock(32, 4)
    block.ln_1.weight = Tagged(block.ln_1.weight.detach().clone())
    assert TraceDependencies.of(block, {}) is None
    assert TraceDependencies.of(models.NanoBlock(32, 4), {}) is not None


def test_frozen_values_compare_plain_values_by_value_and_other_objects_by_identity():
    assert frozen([1, "a", (2.5, None)]) == frozen([1, "a", (2.5, None)])
    assert frozen(0.0) != frozen(-0.0)
    assert frozen(math.nan) == frozen(math.nan)
    assert frozen(1) != frozen(True) != frozen(1.0)
    assert frozen({"a": torch.float16}) == frozen({"a": torch.float16}) != frozen({"a": torch.bfloat16})
    assert frozen(functools.partial(torch.tanh, out=None)) == frozen(functools.partial(torch.tanh, out=None))
    assert frozen(functools.partial(torch.tanh)) != frozen(functools.partial(torch.sigmoid))
    assert frozen(nn.GELU("tanh")) == frozen(nn.GELU("tanh")) != frozen(nn.GELU())  # no tensors: by what they hold
    assert frozen(nn.Linear(2, 2)) != frozen(nn.Linear(2, 2))  # tensors: by identity
    shared = object()
    assert frozen(shared) == frozen(shared) != frozen(object())
    looped: list = []
    looped.append(looped)
    assert frozen(looped) == frozen(looped)



def test_attribute_reads_name_what_a_call_read_and_put_torch_back():
    class Reading(nn.Module):
        scale = 2.0

        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(2, 2)

        def forward(self, x):
            return self.inner(x) * self.scale + getattr(self, "shift", 0.0)

    class OwnLookup(Reading):
        def __getattribute__(self, name):
            return super().__getattribute__(name)

    module = Reading()
    reads = AttributeReads()
    with reads.watching(module):
        module(torch.ones(2))
    assert {"scale", "shift", "inner"} <= reads.by_path[""] and "weight" in reads.by_path["inner"]
    assert "__dict__" not in reads.by_path[""]  # torch's own lookup of parameters and children reads it
    assert "__getattribute__" not in vars(nn.Module)
    reads = AttributeReads()
    with pytest.raises(ZeroDivisionError), reads.watching(OwnLookup()):
        raise ZeroDivisionError
    assert reads.by_path is None and "__getattribute__" not in vars(nn.Module)
    with reads.watching(OwnLookup()):
        pass
    assert reads.by_path is None  # its reads cannot be watched
