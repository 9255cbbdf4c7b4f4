"""Blocks that trace alike share one capture (modpass.capture_sharing); a block whose forward reads a value of its own
captures its own graph, and each runs with its own weights. Regions of Dynamo's graphs (the backend's routing
options) share a capture where their graphs compute the same thing."""

from __future__ import annotations

import copy
import functools
import math
import operator

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import modpass
from modpass._export import AttributeReads
from modpass.capture_sharing import RegionCaptures, SharedCaptures, TraceDependencies, frozen, graph_structure
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


def symbolic_fakes(*shapes: tuple[int, ...], numbered_before: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    """Fake tensors whose sizes are symbols of a fresh shape environment, after ``numbered_before`` other symbols."""
    mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake(shape):
        return mode.from_tensor(torch.empty(shape, dtype=dtype),
                                symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * len(shape)))

    for number in range(numbered_before):
        fake((100 + number,))
    return [fake(shape) for shape in shapes]


def region(values: list[torch.Tensor], body, *, prefix: str = "x", root: nn.Module | None = None) -> torch.fx.GraphModule:
    """A graph of placeholders for ``values`` (named with ``prefix``) and the nodes ``body(graph, *placeholders)`` adds,
    reading the attributes of ``root``."""
    graph = torch.fx.Graph()
    inputs = []
    for number, value in enumerate(values):
        inputs.append(graph.placeholder(f"{prefix}{number}"))
        inputs[-1].meta["val"] = value
    graph.output(body(graph, *inputs))
    return torch.fx.GraphModule(root or nn.Module(), graph)


def scaled_softmax(scale=0.5, op=torch.softmax):
    return lambda graph, x: graph.call_function(op, (graph.call_function(operator.mul, (x, scale)), -1))


def test_region_graphs_compare_by_what_they_compute_not_by_names_or_symbol_numbers():
    reference = graph_structure(region(symbolic_fakes((4, 6)), scaled_softmax()))
    assert graph_structure(region(symbolic_fakes((4, 6), numbered_before=3), scaled_softmax(), prefix="hidden")) == reference
    for differing in (region(symbolic_fakes((4, 6)), scaled_softmax(0.25)),
                      region(symbolic_fakes((4, 6)), scaled_softmax(op=torch.log_softmax)),
                      region(symbolic_fakes((4, 6), dtype=torch.float64), scaled_softmax()),
                      region(symbolic_fakes((4, 7)), scaled_softmax()),  # another example size: captured anew
                      region([torch.empty(4, 6)], scaled_softmax())):  # a real tensor: not a region of a traced graph
        assert graph_structure(differing) != reference

    def reads_an_attribute(graph, x):
        return graph.call_function(operator.add, (x, graph.get_attr("offset")))

    holder = nn.Module()
    holder.register_buffer("offset", torch.zeros(()))
    assert graph_structure(region(symbolic_fakes((4, 6)), reads_an_attribute, root=holder)) is None


@pytest.mark.parametrize("call, moves", [((operator.truediv, (2.0, math.pi)), True),
                                          ((torch._C._set_grad_enabled, (False,)), False)])
def test_arithmetic_on_constants_compares_wherever_it_is_placed_and_nothing_else_does(call, moves):
    """GPT-2's ``sqrt(2 / pi)``: where the graph computes it does not matter; where it switches grad mode does."""

    def computed(early: bool):
        def body(graph, x):
            value = graph.call_function(*call) if early else None
            y = graph.call_function(torch.tanh, (x,))
            value = value or graph.call_function(*call)
            return graph.call_function(operator.mul, (y, value)) if moves else (y, value)
        return body

    first, last = (graph_structure(region(symbolic_fakes((4, 6)), computed(early))) for early in (True, False))
    assert (first == last) is moves


def test_region_captures_keep_the_ones_used_last():
    captures = RegionCaptures(limit=2)
    graphs = [torch.fx.GraphModule(nn.Module(), torch.fx.Graph()) for _ in range(3)]
    captures.add(("a",), graphs[0])
    captures.add(("b",), graphs[1])
    assert captures.find(("a",)) is graphs[0]
    captures.add(("c",), graphs[2])
    assert captures.find(("b",)) is None and captures.find(("a",)) is graphs[0] and captures.find(("c",)) is graphs[2]
    captures.add(None, graphs[1])
    assert captures.find(None) is None and len(captures.by_key) == 2
