"""torch.compile(backend="modpass"): discovery, fullgraph on routed models, parity with Inductor.

Tests whose subject is what Dynamo and AOTAutograd trace of a routed model (no new structure, the records a
checkpoint hands out, a split by capacity through graph breaks) compile with ``TRACING_BACKEND``; those of what
Inductor makes of routed graphs, and of routing in the backend, compile with ``backend="modpass"``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import math
import subprocess
import sys
import textwrap
import warnings
from collections import Counter

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

import modpass
from modpass import graph_routing
from modpass.block import SLOT_MULTIPLE
from modpass.capture_sharing import RegionCaptures
from modpass.graph_routing import module_path, rooted_at_graph
from modpass.pipeline import capture_block_graph
from tests import models

#: Dynamo and AOTAutograd (the forward and backward graphs) without Inductor's code generation: under half the time.
TRACING_BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@functools.cache
def dynamo_compiles_transformers() -> bool:
    """Whether this torch's Dynamo can trace a dense Hugging Face model at all (torch 2.6 cannot trace 5.x)."""
    try:
        with torch.no_grad():
            torch.compile(models.llama(layers=1), backend="eager", fullgraph=True)(input_ids=torch.zeros(1, 4, dtype=torch.long))
        return True
    except Exception:
        return False
    finally:
        torch._dynamo.reset()


# The CPU everywhere; CUDA too where a GPU is present (benchmarks/cuda_all.sh runs those with ``-k cuda``).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]

needs_hf_dynamo = pytest.mark.skipif(
    "not dynamo_compiles_transformers()", reason="this torch's Dynamo cannot compile the dense transformers model either"
)


@contextlib.contextmanager
def backend_refuses(error: type[modpass.ModpassError], match: str):
    """Dynamo wraps what a backend raises; the error inside must be modpass's own."""
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=match) as caught:
        yield
    assert isinstance(caught.value.inner_exception, error), caught.value.inner_exception


# What fullgraph says at a graph break modpass makes (torch.compiler.disable(reason=...)); torch 2.6 takes no reason.
GRAPH_BREAKS_REPORT_MODPASS_REASON = "reason" in inspect.signature(torch.compiler.disable).parameters


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_backend_is_found_without_importing_modpass():
    script = textwrap.dedent(
        """
        import sys, torch
        assert "modpass" not in sys.modules
        assert "modpass" in torch._dynamo.list_backends(exclude_tags=())
        model = torch.nn.Linear(4, 3)
        x = torch.randn(2, 4)
        out = torch.compile(model, backend="modpass")(x)
        assert torch.allclose(out, model(x), atol=1e-6)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_unknown_options_are_refused():
    model = torch.nn.Linear(4, 3)
    compiled = torch.compile(model, backend="modpass", options={"ratio": 0.5})
    with backend_refuses(modpass.ConfigError, "unknown modpass backend option"):
        compiled(torch.randn(2, 4))


@pytest.mark.parametrize("options", [{"ratios": 0.5}, {"plan": "saved"}], ids=["ratios", "plan"])
def test_routing_options_on_a_routed_model_are_refused(options, tmp_path):
    routed = modpass.transform(models.NanoGPT(layers=2).eval(), 0.5)
    if "plan" in options:
        modpass.save(routed, tmp_path)
        options = {"plan": str(tmp_path)}
    compiled = torch.compile(routed, backend="modpass", dynamic=True, options=options)
    with backend_refuses(modpass.ConfigError, r"the model is already routed .*compile it without routing options"):
        compiled(torch.randint(0, 61, (2, 11)))


def test_unrouted_model_compiles_exactly_as_inductor():
    model = models.NanoGPT(layers=2).eval()
    idx = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        ours = torch.compile(model, backend="modpass")(idx)
        torch._dynamo.reset()
        inductor = torch.compile(model, backend="inductor")(idx)
    assert torch.equal(ours, inductor)


def padded_batch_case(tokens: int, device: str = "cpu"):
    ids = torch.randint(0, 97, (2, tokens), device=device)
    mask = torch.ones_like(ids)
    mask[0, : tokens // 3] = 0  # left padding
    return dict(input_ids=ids, attention_mask=mask), lambda out: out.logits[mask.bool()]


@needs_hf_dynamo
@pytest.mark.compile_defaults
@pytest.mark.parametrize("device", DEVICES)
def test_causal_lm_fullgraph_recompiles_once_for_a_length_and_once_for_a_capacity(device):
    """A left-padded batch: the padding mask is one more input of the same graphs."""
    torch.manual_seed(0)
    routed = modpass.transform(models.llama(layers=2, max_position_embeddings=8192).to(device), 0.5, layers=[1])
    models.randomise_routers(routed)
    compiled = torch.compile(routed, backend="modpass", fullgraph=True)

    def check(ratio, tokens):
        inputs, real_tokens = padded_batch_case(tokens, device)
        with torch.no_grad():
            want = real_tokens(routed(**inputs))
            torch.testing.assert_close(real_tokens(compiled(**inputs)), want, rtol=1e-4, atol=1e-4)
        assert routed.model.layers[1].last_routing[0].index.shape[1] == math.ceil(ratio * tokens)

    # On CUDA the lengths span several of the selection kernel's chunks: it must not specialise on them.
    lengths = (16, 23) if device == "cpu" else (16, 2100, 4500)
    check(0.5, lengths[0])  # the transform's own capacity and the first length, both compiled as constants
    for tokens in lengths[1:]:
        check(0.5, tokens)
    assert compiled_graphs() <= 2, "one static graph, then one dynamic graph for every other length"
    for ratio in (0.25, 0.125, 0.375, 0.55):
        modpass.set_ratios(routed, ratio)
        for tokens in lengths:
            check(ratio, tokens)
    assert compiled_graphs() <= 3, "then one graph with a symbolic capacity for every later capacity"


def causal_case(tokens: int):
    return dict(input_ids=torch.randint(0, 97, (2, tokens))), lambda out: out.logits


def encoder_case(tokens: int):
    # ViT patches are 8x8, plus the CLS token: a (8 * (tokens - 1)) x 8 image gives `tokens` tokens.
    pixels = torch.randn(2, 3, 8 * (tokens - 1), 8)
    return dict(pixel_values=pixels, interpolate_pos_encoding=True), lambda out: out.last_hidden_state


@needs_hf_dynamo
@pytest.mark.parametrize(
    ("build", "case", "lengths"),
    # A padded batch is checked with the recompiles above.
    [(models.vit, encoder_case, (17, 26)), (models.mixtral, causal_case, (12, 21))],
    ids=["encoder", "sparse-moe"],
)
def test_encoder_and_moe_fullgraph_match_eager_over_two_lengths_and_two_capacities(build, case, lengths):
    torch.manual_seed(0)
    routed = modpass.transform(build(layers=2), 0.5, layers=[1])
    (block,) = modpass.routed_blocks(routed).values()
    with torch.no_grad():
        block.mod_routers.default.weight.normal_()
    compiled = torch.compile(routed, backend="modpass", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for ratio in (0.5, 0.25):
            modpass.set_ratios(routed, ratio)
            for tokens in lengths:
                inputs, output = case(tokens)
                with torch.no_grad():
                    torch.testing.assert_close(output(compiled(**inputs)), output(routed(**inputs)), rtol=1e-4, atol=1e-4)
    # The routing graph uses no op whose lowering warns (torch.diagonal's prints a FutureWarning).
    assert not [str(w.message) for w in caught if "_inductor" in w.filename]
    # set_ratios before the first call makes the capacity symbolic from the start.
    assert compiled_graphs() <= 2, "one graph, then one recompile for the second length and none for the capacity"


@pytest.fixture
def reinplaced_graphs(monkeypatch) -> list[torch.fx.Graph]:
    """Every post-grad graph Inductor compiles, as it is after reinplacing (forward, then backward)."""
    from torch._inductor.fx_passes import post_grad

    graphs = []
    reinplace = post_grad.reinplace_inplaceable_ops

    def observe(*args):
        reinplace(*args)
        graphs.append(args[-1])

    monkeypatch.setattr(post_grad, "reinplace_inplaceable_ops", observe)
    return graphs


# Caches off so the post-grad passes run; Dynamo then says its profile cache is off too.
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
@pytest.mark.parametrize(
    ("training", "aux_loss_weight", "in_place"),
    [(False, 0.0, True), (True, 0.0, True), (True, 0.1, False)],
    ids=["inference", "training", "training-with-aux-loss"],
)
def test_compiled_forward_writes_the_selected_tokens_into_the_residual_stream_in_place(
    reinplaced_graphs, training, aux_loss_weight, in_place
):
    """No full-size copy of the hidden states: where a routed block's input is dead after it,
    Inductor's reinplacing turns the routed ``index_put`` into ``index_put_`` on that buffer.
    In training that holds as long as nothing differentiates the full router logits; an aux
    loss does (its weight gradient needs every token), so the input stays alive and is copied."""
    routed = modpass.transform(models.NanoGPT(layers=4).train(training), 0.25, aux_loss_weight=aux_loss_weight)
    idx = torch.randint(0, 61, (2, 16))
    with torch.set_grad_enabled(training), torch._inductor.config.patch(force_disable_caches=True):
        got = torch.compile(routed, backend="modpass", fullgraph=True)(idx)
        torch.testing.assert_close(got, routed(idx), rtol=1e-4, atol=1e-4)
    # The forward graph; a training backward graph is compiled only when it first runs, and the
    # compiled backward's gradients are test_routed_training_fullgraph_matches_eager_gradients's.
    forward = Counter(str(node.target) for node in reinplaced_graphs[0].nodes)
    assert (forward["aten.index_put_.default"], forward["aten.index_put.default"]) == ((2, 0) if in_place else (0, 2))


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
@pytest.mark.parametrize("one_buffer", [True, False])
def test_compiled_backward_accumulates_the_gathered_rows_into_one_gradient_buffer(reinplaced_graphs, monkeypatch, one_buffer):
    """``routing.take_tokens``: a routed block input's gradient is the write-back's gradient with
    the gathered rows' gradient accumulated in place at the k indices. Autograd's default
    (``ONE_GRADIENT_BUFFER`` off, the check's control) scatters them into a zero-filled
    ``(B, T, D)`` buffer and adds the two full-size gradients."""
    monkeypatch.setattr(modpass.routing, "ONE_GRADIENT_BUFFER", one_buffer)
    routed = modpass.transform(models.NanoGPT(layers=2, width=32).train(), 0.25, layers=[1])
    idx = torch.randint(0, 61, (2, 16))
    with torch._inductor.config.patch(force_disable_caches=True):
        torch.compile(routed, backend="modpass", fullgraph=True)(idx).sum().backward()
    _, backward = reinplaced_graphs
    hidden_sized = [node for node in backward.nodes if isinstance(val := node.meta.get("val"), torch.Tensor)
                    and tuple(val.shape) == (2, 16, 32)]
    zero_filled = [node for node in hidden_sized if node.target is torch.ops.aten.full.default]
    accumulated = [node for node in hidden_sized if node.target is torch.ops.aten.index_put_.default and node.args[3:] == (True,)]
    if one_buffer:
        assert (len(zero_filled), len(accumulated)) == (0, 1), "one in-place accumulation, for the routed block"
    else:
        assert zero_filled, "the control: autograd's default fills a buffer with zeros"


@pytest.mark.compile_defaults
@pytest.mark.parametrize("device", DEVICES)
def test_routed_training_fullgraph_matches_eager_gradients(device):
    torch.manual_seed(0)
    routed = modpass.transform(models.NanoGPT(layers=2).to(device).train(), 0.5, layers=[1])
    models.randomise_routers(routed)
    idx = torch.randint(0, 61, (2, 16), device=device)

    def step(model):
        routed.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in routed.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = step(routed)
    compiled_loss, compiled_grads = step(torch.compile(routed, backend="modpass", fullgraph=True))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-4)
    assert eager_grads.keys() == compiled_grads.keys()
    assert compiled_grads["h.1.mod_routers.default.weight"].abs().sum() > 0
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-4)


def captured_structures(routed: torch.nn.Module) -> int:
    return sum(len(block._analyses) for block in modpass.routed_blocks(routed).values())


@needs_hf_dynamo
def test_a_batch_of_one_runs_the_prepared_graphs_under_fullgraph_in_inference_and_training():
    """``transform`` prepares batch-2 calls; export specialises size-1 axes, so a batch of one has a
    structure of its own, which compiling would capture through a graph break (fullgraph refuses it).
    It runs the prepared graphs instead, eager and compiled, and captures nothing new."""
    torch.manual_seed(0)
    routed = modpass.transform(models.llama(layers=2), 0.5, layers=[1])
    models.randomise_routers(routed)
    compiled = torch.compile(routed, backend=TRACING_BACKEND, fullgraph=True)
    ids = torch.randint(0, 97, (1, 15))
    prepared = captured_structures(routed)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, routed(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

    routed.train()
    prepared = captured_structures(routed)

    def step(model):
        routed.zero_grad()
        model(input_ids=ids).logits.logsumexp(-1).mean().backward()
        return {name: p.grad.clone() for name, p in routed.named_parameters() if p.grad is not None}

    eager, got = step(routed), step(compiled)
    assert got["model.layers.1.mod_routers.default.weight"].abs().sum() > 0
    for name, grad in eager.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-4)
    assert captured_structures(routed) == prepared


CONVERSIONS = [
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


@needs_hf_dynamo
@pytest.mark.parametrize("conversion", CONVERSIONS)
def test_a_model_converted_after_transform_compiles_fullgraph(conversion):
    """``transform`` on the CPU in fp32, then ``.to(dtype or device)``: the prepared calls follow the
    conversion, so compiling meets no new structure, in inference or training."""
    torch.manual_seed(0)
    routed = modpass.transform(models.llama(layers=2), 0.5, layers=[1])
    models.randomise_routers(routed)
    prepared = captured_structures(routed)
    routed.to("cpu")
    assert captured_structures(routed) == prepared, "a conversion that changes nothing prepares nothing"
    routed.to(conversion)
    ids = torch.randint(0, 97, (2, 15), device=routed.device)
    compiled = torch.compile(routed, backend=TRACING_BACKEND, fullgraph=True)
    tolerance = 2e-2 if routed.dtype == torch.bfloat16 else 1e-4
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, routed(input_ids=ids).logits, rtol=tolerance, atol=tolerance)
    routed.train()
    compiled(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    assert routed.model.layers[1].mod_routers.default.weight.grad.abs().sum() > 0


@needs_hf_dynamo
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_training_compiles_fullgraph_once_prepared(device):
    """Autocast is part of a call's structure; unprepared, fullgraph stops at the capture and says how to prepare it."""
    torch.manual_seed(0)
    routed = modpass.transform(models.llama(layers=2).to(device), 0.5, layers=[1])
    models.randomise_routers(routed)
    routed.train()
    ids = torch.randint(0, 97, (2, 15), device=device)
    autocast = functools.partial(torch.autocast, device, dtype=torch.bfloat16)
    with pytest.raises(Exception) as refused, autocast():
        torch.compile(routed, backend="modpass", fullgraph=True)(input_ids=ids)
    if GRAPH_BREAKS_REPORT_MODPASS_REASON:
        assert "modpass.prepare_autocast(model, dtype)" in str(refused.value)

    torch._dynamo.reset()
    routed.eval()
    modpass.prepare_autocast(routed, torch.bfloat16)
    routed.train()  # the switch prepares the autocast calls of training mode too
    prepared = captured_structures(routed)

    def step(model):
        routed.zero_grad()
        with autocast():
            model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
        return {name: p.grad.clone() for name, p in routed.named_parameters() if p.grad is not None}

    eager, got = step(routed), step(torch.compile(routed, backend="modpass", fullgraph=True))
    assert got["model.layers.1.mod_routers.default.weight"].abs().sum() > 0
    for name, grad in eager.items():
        torch.testing.assert_close(got[name], grad, rtol=2e-2, atol=2e-2)
    assert captured_structures(routed) == prepared


@needs_hf_dynamo
def test_gradient_checkpointing_compiles_fullgraph_and_keeps_the_routing_records():
    """A checkpointed function must not change state outside it: the records leave it as outputs.

    Only the routed layer is checkpointed: where the ``kernels`` package is installed (a dependency of
    transformers >= 5.25), a dense layer's attention and norms set a context variable, which Dynamo
    refuses inside a checkpoint, so a checkpointed dense layer breaks fullgraph in the untouched model too.
    """
    torch.manual_seed(0)
    routed = modpass.transform(models.llama(layers=2), 0.5, layers=[1], aux_loss_weight=0.01).train()
    models.randomise_routers(routed)
    models.enable_checkpointing(routed)
    routed.model.layers[0].gradient_checkpointing = False
    ids = torch.randint(0, 97, (2, 15))

    def step(model):
        routed.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        aux = modpass.aux_loss(routed)
        (loss + aux).backward()
        return aux.detach(), {name: p.grad.clone() for name, p in routed.named_parameters() if p.grad is not None}

    eager_aux, eager = step(routed)
    compiled_aux, got = step(torch.compile(routed, backend=TRACING_BACKEND, fullgraph=True))
    assert len(routed.model.layers[1].last_routing) == 1
    torch.testing.assert_close(compiled_aux, eager_aux, rtol=1e-4, atol=1e-4)
    for name, grad in eager.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-4)


def test_one_row_groups_of_a_mixed_batch_of_names_compile_without_a_break():
    """Task names are read in Python, so each group's rows are concrete: a task with one row is a batch of one."""
    routed = modpass.transform(models.NanoGPT(layers=2).eval(), {"a": 0.5, "b": 0.25}, layers="all")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in modpass.routed_blocks(routed).values():
            for router in block.mod_routers.values():
                router.weight.copy_(torch.randn(router.weight.shape, generator=generator))
    prepared = captured_structures(routed)
    idx = torch.randint(0, 61, (3, 14), generator=generator)
    tasks = ["b", "a", "b"]
    with torch.no_grad():
        got = torch.compile(routed, backend="eager", fullgraph=True)(idx, task=tasks)
        torch.testing.assert_close(got, routed(idx, task=tasks), rtol=1e-6, atol=1e-6)
    assert captured_structures(routed) == prepared


def test_compiled_router_is_a_row_reduction_and_the_generic_form_a_linear_layer(monkeypatch):
    """``routing.COMPILED_FORMS``: the router's one-column ``Linear`` is traced as ``sum(x * w) + b``
    (one fused reduction kernel) with the same values; switched off, compiling traces the
    ``Linear`` again (Dynamo guards on the switch, so it recompiles rather than reusing the graph)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append({node.target for node in gm.graph.nodes})
        return gm

    router = torch.compile(modpass.routing.router_logits, backend=record, fullgraph=True)
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=generator) for shape in ((2, 9, 16), (1, 16), (1,)))
    want = torch.nn.functional.linear(x, weight, bias).squeeze(-1)
    torch.testing.assert_close(router(x, weight, bias), want)
    monkeypatch.setattr(modpass.routing, "COMPILED_FORMS", False)
    torch.testing.assert_close(router(x, weight, bias), want)
    reduction, generic = graphs
    assert torch._C._nn.linear not in reduction and torch._C._nn.linear in generic
    monkeypatch.setattr(modpass.routing, "COMPILED_FORMS", True)
    x, weight, bias = x.double(), weight.double(), bias.double()  # a float64 model's logits stay float64 all through
    torch.testing.assert_close(router(x, weight, bias), torch.nn.functional.linear(x, weight, bias).squeeze(-1), rtol=1e-12, atol=1e-12)


def nanogpt_logits(model, idx):
    return model(idx)


class InPlaceEmbeddingGPT(models.NanoGPT):
    """nanoGPT whose embeddings are written into an empty tensor half by half, in place through views (as
    DeepSeek-V3's attention assembles its keys): Dynamo's graph holds ``copy_`` calls that nothing uses."""

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        tokens, positions = self.wte(idx), self.wpe(torch.arange(idx.shape[1], device=idx.device))
        x = tokens.new_empty(tokens.shape)
        half = x.shape[-1] // 2
        x[..., :half].copy_(tokens[..., :half] + positions[..., :half])
        x[..., half:].copy_(tokens[..., half:] + positions[..., half:])
        return x


def count_region_captures(monkeypatch) -> list[str]:
    """The regions the backend's routing options capture from now on (none shared from earlier tests)."""
    monkeypatch.setattr(graph_routing, "REGION_CAPTURES", RegionCaptures())
    captured = []

    def capture(region, *args, where, **kwargs):
        captured.append(where)
        return capture_block_graph(region, *args, where=where, **kwargs)

    monkeypatch.setattr(graph_routing, "capture_block_graph", capture)
    return captured


def causal_lm_logits(model, idx):
    return model(input_ids=idx, use_cache=False).logits


@pytest.mark.parametrize(
    "build, logits",
    [(lambda: models.NanoGPT(layers=2).eval(), nanogpt_logits),
     (lambda: InPlaceEmbeddingGPT(layers=2).eval(), nanogpt_logits),
     pytest.param(lambda: models.gpt2(layers=2), causal_lm_logits, marks=[needs_hf_dynamo, pytest.mark.compile_defaults]),
     pytest.param(lambda: models.gemma2(layers=2), causal_lm_logits, marks=needs_hf_dynamo)],
    # GPT-2's gelu_new shares one sqrt(2 / pi) between all blocks of the Dynamo graph (with symbolic
    # floats, as by default, a scalar input of each block; each later block gets its own copy, placed
    # elsewhere in its region); Gemma 2's eager attention multiplies q by k.transpose(), a call_method
    # node in Dynamo's graph, and its layers alternate sliding and full attention masks, which are inputs.
    ids=["nanogpt", "nanogpt-in-place-embedding", "gpt2", "gemma2"],
)
def test_ratios_option_equals_transform(build, logits, monkeypatch, caplog):
    """Routed in Dynamo's graph, the model compiles fullgraph to one dynamic graph, which matches ``transform``'s model
    (eager; its compiled form is the other tests') at two lengths. The two blocks' regions are the same graph and share
    one capture, also where Dynamo traces the frame again (GPT-2's float attributes make it restart)."""
    model = build()
    routed = modpass.transform(model, 0.5, layers="all")
    inputs = [torch.randint(0, 61, (2, tokens)) for tokens in (14, 21)]
    captured = count_region_captures(monkeypatch)
    caplog.set_level(logging.WARNING, logger="torch._inductor.codecache")
    with torch.no_grad():
        with pytest.warns(UserWarning, match="identity-gated"):
            options = torch.compile(model, backend="modpass", dynamic=True, fullgraph=True, options={"ratios": 0.5, "layers": "all"})
            got = [logits(options, idx) for idx in inputs]
        assert compiled_graphs() == 1
        assert len(captured) == 1, captured
        # The routed regions pickle into Inductor's FX graph cache key (GPT-2's held a per-region class and bypassed it).
        assert "Failed to pickle cache key" not in caplog.text
        for g, idx in zip(got, inputs):
            torch.testing.assert_close(g, logits(routed, idx), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got[0], logits(model, inputs[0]), atol=1e-3), "routing changed the output"


def test_options_routing_of_a_static_graph_asks_for_dynamic_shapes():
    model = models.NanoGPT(layers=2).eval()
    compiled = torch.compile(model, backend="modpass", dynamic=False, options={"ratios": 0.5, "layers": [1]})
    with backend_refuses(modpass.ConfigError, "the graph is static: compile with .*dynamic=True"), pytest.warns(UserWarning):
        compiled(torch.randint(0, 61, (2, 14)))


@needs_hf_dynamo
def test_options_routing_of_a_model_that_fixes_its_sequence_length_points_to_transform():
    model = models.vit(layers=2)
    compiled = torch.compile(model, backend="modpass", dynamic=True, options={"ratios": 0.5, "layers": "all"})
    refusal = r"fixed sequence length of 17.*the model's code fixes it.*modpass.transform"
    with backend_refuses(modpass.ConfigError, refusal), pytest.warns(UserWarning):
        compiled(pixel_values=torch.randn(2, 3, 32, 32))


class LengthBranchingBlock(models.NanoBlock):
    """A nanoGPT block whose update depends on the sequence length through ``condition``."""

    def __init__(self, condition):
        super().__init__(32, 4)
        self.condition = condition

    def forward(self, x):
        update = super().forward(x) - x
        return x + (2 * update if self.condition(x.shape[1]) else update)


@pytest.mark.parametrize(
    "condition, refused",
    [(lambda tokens: tokens > 8, "holds only where T > 8"), (lambda tokens: tokens <= 64, None)],
    ids=["longer-than-8", "at-most-64"],
)
def test_options_routing_refuses_a_graph_that_branched_on_the_token_count_where_fewer_tokens_differ(condition, refused):
    model = models.NanoGPT(layers=2).eval()
    model.h = torch.nn.ModuleList(LengthBranchingBlock(condition) for _ in model.h)
    idx = torch.randint(0, 61, (2, 16))
    compiled = torch.compile(model, backend="modpass", dynamic=True, options={"ratios": 1.0, "layers": "all"})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the identity-gated routers' warning
        if refused:
            with backend_refuses(modpass.UnroutableBlockError, rf"{refused} for the token count.*at T = 2 of 16"):
                compiled(idx)
        else:
            torch.testing.assert_close(compiled(idx), model(idx), rtol=1e-5, atol=1e-5)


class LengthNormalisedBlock(models.NanoBlock):
    """A nanoGPT block that divides its update by the sequence length: routed, it would divide by k."""

    def __init__(self):
        super().__init__(32, 4)

    def forward(self, x):
        return x + (super().forward(x) - x) / x.shape[1]


def test_both_entries_refuse_a_block_that_computes_with_the_token_count():
    model = models.NanoGPT(layers=2).eval()
    model.h = torch.nn.ModuleList(LengthNormalisedBlock() for _ in model.h)
    refusal = r"block 0 \(h.0\) cannot run on a subset of tokens.*computes with the token count as a number"
    with pytest.raises(modpass.UnroutableBlockError, match=refusal):
        modpass.transform(model, 0.5, layers="all")
    compiled = torch.compile(model, backend="modpass", dynamic=True, options={"ratios": 0.5, "layers": "all"})
    with torch.no_grad(), backend_refuses(modpass.UnroutableBlockError, refusal), pytest.warns(UserWarning):
        compiled(torch.randint(0, 61, (2, 16)))


@needs_hf_dynamo
@pytest.mark.parametrize("device", DEVICES)
def test_plan_option_serves_a_stock_model_with_trained_routers(tmp_path, device):
    model = models.llama(layers=2).to(device)
    routed = modpass.transform(model, {"t2i": 0.25, "mmu": 0.75}, layers=[1])
    with torch.no_grad():
        for router in routed.model.layers[1].mod_routers.values():
            router.weight.normal_()
            router.bias.normal_()
    modpass.save(routed, tmp_path)
    ids = torch.randint(0, 97, (2, 16), device=device)
    with torch.no_grad():
        want = routed(input_ids=ids, task="mmu").logits
        got = torch.compile(model, backend="modpass", dynamic=True, options={"plan": str(tmp_path), "task": "mmu"})(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_plan_option_needs_a_task_for_multi_task_plans(tmp_path):
    model = models.NanoGPT(layers=2).eval()
    modpass.save(modpass.transform(model, {"a": 0.5, "b": 0.25}, layers=[1]), tmp_path)
    with backend_refuses(modpass.ConfigError, "pick one with options"):
        torch.compile(model, backend="modpass", dynamic=True, options={"plan": str(tmp_path)})(torch.randint(0, 61, (2, 8)))


@pytest.mark.parametrize(
    "dynamo_path, path",
    [("L['self']", ""), ("L['self'].layers.0", "layers.0"), ("L['self']._modules['layers']._modules['0']", "layers.0"),
     ("L['self'].model.layers[3].mlp", "model.layers.3.mlp"), ("L['args'][0]", ""),
     ("L['args'][0].model.layers.1", "model.layers.1"), ("L['model'].h[2]", "h.2")],
)
def test_dynamo_module_paths_of_every_torch_release_read_as_named_modules(dynamo_path, path):
    assert module_path(dynamo_path) == path


def test_a_saved_plan_fits_a_frame_rooted_below_the_model():
    routed = modpass.transform(models.llama(layers=2), {"t2i": 0.5}, layers=[1])
    plan = modpass.routing_plan_of(routed)
    routers = {k: v for k, v in routed.state_dict().items() if ".mod_routers." in k}
    moved_plan, moved = rooted_at_graph(plan, routers, ["layers.0", "layers.1"])
    assert [b.path for b in moved_plan.blocks] == ["layers.1"]
    assert set(moved) == {"layers.1.mod_routers.t2i.weight", "layers.1.mod_routers.t2i.bias"}
    assert rooted_at_graph(plan, routers, ["model.layers.0", "model.layers.1"]) == (plan, routers)
    with pytest.raises(modpass.PlanError, match="the graph has"):
        rooted_at_graph(plan, routers, ["layers.0", "layers.1", "layers.2"])


def test_a_plan_within_one_stack_fits_a_frame_rooted_below_the_model():
    routed = modpass.transform(models.llama(layers=2), {"t2i": 0.5}, layers=[1])
    plan = dataclasses.replace(modpass.routing_plan_of(routed), within="model.layers")
    routers = {k: v for k, v in routed.state_dict().items() if ".mod_routers." in k}
    moved_plan, moved = rooted_at_graph(plan, routers, ["vision.0", "vision.1", "layers.0", "layers.1"])
    assert ([b.path for b in moved_plan.blocks], moved_plan.within) == (["layers.1"], "layers")
    assert set(moved) == {"layers.1.mod_routers.t2i.weight", "layers.1.mod_routers.t2i.bias"}
    with pytest.raises(modpass.PlanError, match="of 2 blocks in 'model.layers'; the graph has"):
        rooted_at_graph(plan, routers, ["vision.0", "layers.0", "layers.1", "layers.2"])


def test_options_route_the_blocks_within_one_stack_as_transform_does(tmp_path):
    model, inputs = models.prefix_vision_gpt()
    routed = modpass.transform(model, 0.5, within="h", example_inputs=inputs)
    unchanged = modpass.transform(model, 0.5, within="h", example_inputs=inputs)
    models.randomise_routers(routed)
    modpass.save(routed, tmp_path)
    with torch.no_grad():
        served = torch.compile(model, backend="modpass", dynamic=True, options={"plan": str(tmp_path)})(**inputs)
        torch._dynamo.reset()
        with pytest.warns(UserWarning, match="identity-gated"):
            fresh = torch.compile(model, backend="modpass", dynamic=True, options={"ratios": 0.5, "within": "h"})(**inputs)
        torch.testing.assert_close(served, routed(**inputs), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fresh, unchanged(**inputs), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(fresh, model(**inputs), atol=1e-3), "routing changed the output"


class GraphBreakingPrefixVisionGPT(models.PrefixVisionGPT):
    """Breaks Dynamo's graph after its vision blocks and again before its language blocks, as Llava's image-token
    checks do: three parts, one without blocks and one with blocks of the other stack."""

    def forward(self, idx: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        image = self.patch_embed(patches)
        for block in self.vision:
            image = block(image)
        torch._dynamo.graph_break()
        x = torch.cat([image, self.embed(idx)], dim=1)
        torch._dynamo.graph_break()
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def test_options_compile_the_parts_without_blocks_to_route_unrouted(tmp_path):
    torch.manual_seed(0)
    model = GraphBreakingPrefixVisionGPT().eval()
    _, inputs = models.prefix_vision_gpt()
    routed = modpass.transform(model, 0.5, within="h", example_inputs=inputs)
    unchanged = modpass.transform(model, 0.5, within="h", example_inputs=inputs)
    models.randomise_routers(routed)
    modpass.save(routed, tmp_path)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        served = torch.compile(model, backend="modpass", dynamic=True, options={"plan": str(tmp_path)})(**inputs)
        torch._dynamo.reset()
        fresh = torch.compile(model, backend="modpass", dynamic=True, options={"ratios": 0.5, "within": "h"})(**inputs)
        torch.testing.assert_close(served, routed(**inputs), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fresh, unchanged(**inputs), rtol=1e-5, atol=1e-5)
    messages = {str(w.message).split("(")[0] + str(w.message).split(")")[1][:40] for w in caught if "unrouted" in str(w.message)}
    assert any("holds no transformer blocks" in m for m in messages), messages
    assert any("holds none of the blocks to route" in m for m in messages), messages


class BreakBetweenBlocksGPT(models.NanoGPT):
    """Six blocks, with a graph break between the third and the fourth."""

    def forward(self, idx):
        x = self.embed(idx)
        x = self.h[2](self.h[1](self.h[0](x)))
        torch._dynamo.graph_break()
        x = self.h[5](self.h[4](self.h[3](x)))
        return self.lm_head(self.ln_f(x))


def test_options_refuse_to_count_blocks_in_a_graph_that_starts_mid_stack():
    """The graph after the break holds h.3 to h.5, which options['ratios'] counted from 0: layers=[1] routed h.1 and
    h.4, silently."""
    model = BreakBetweenBlocksGPT(layers=6).eval()
    compiled = torch.compile(model, backend="modpass", dynamic=True, options={"ratios": 0.5, "layers": [1]})
    with torch.no_grad(), backend_refuses(modpass.ConfigError, r"holds blocks \['3', '4', '5'\] of h and not the others: graph breaks"):
        compiled(torch.randint(0, 61, (2, 12)))


class PositionsAddedInsideBlock(models.NanoBlock):
    def forward(self, x, positions):
        return self.mix(positions + x, is_causal=True)


class PositionsAddedInsideGPT(models.NanoGPT):
    """Hands every block the same positional tensor, which each reads before its hidden state."""

    block_class = PositionsAddedInsideBlock

    def forward(self, idx):
        x = self.wte(idx)
        positions = self.wpe(torch.arange(idx.shape[1], device=idx.device)).expand_as(x).contiguous()
        for block in self.h:
            x = block(x, positions)
        return self.lm_head(self.ln_f(x))


def test_options_take_the_stream_not_a_tensor_every_block_reads_as_the_hidden_state():
    """The backend took the first input shaped like the output, the positions here, as the hidden state, and
    skipped tokens came out as their positions (0.76 off transform at ratio 0.5; equal at 1.0)."""
    model = PositionsAddedInsideGPT(layers=2).eval()
    ids = torch.randint(0, 61, (2, 12))
    routed = modpass.transform(model, 0.5, layers=[1])
    compiled = torch.compile(model, backend="modpass", dynamic=True, options={"ratios": 0.5, "layers": [1]})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(compiled(ids), routed(ids), rtol=1e-5, atol=1e-5)


def test_plan_option_refuses_a_plan_of_another_width(tmp_path):
    """It failed inside the routed graph with a RuntimeError about tensor sizes (32 and 48)."""
    modpass.save(modpass.transform(models.NanoGPT(width=48).eval(), 0.5), tmp_path)
    compiled = torch.compile(models.NanoGPT().eval(), backend="modpass", dynamic=True, options={"plan": str(tmp_path)})
    with torch.no_grad(), backend_refuses(modpass.PlanError, r"routes h\.1 at width 48, but this model's block there is 32 wide"):
        compiled(torch.randint(0, 61, (2, 12)))


def test_options_routing_of_a_first_call_with_as_many_sequences_as_tokens_names_duck_sizing():
    """Dynamo gave B and T one symbol, and the refusal said the hidden state was not batch-first."""
    compiled = torch.compile(models.NanoGPT(layers=2).eval(), backend="modpass", dynamic=True, options={"ratios": 0.5})
    with torch.no_grad(), backend_refuses(modpass.ConfigError, r"traced the batch and the sequence length as one size .*duck sizing"), \
            pytest.warns(UserWarning, match="fresh identity-gated routers"):
        compiled(torch.randint(0, 61, (8, 8)))


def test_plan_option_routes_a_first_call_of_one_token(tmp_path):
    """A single token's graph (Dynamo keeps its length static) was refused, blaming the model's code; routed, its token
    runs the block gated by its router, as in transform's model. (Longer calls recompile, dynamic.)"""
    model = models.NanoGPT(layers=2).eval()
    routed = models.randomise_routers(modpass.transform(model, 0.5), seed=0)
    modpass.save(routed, tmp_path)
    compiled = torch.compile(model, backend="modpass", dynamic=True, options={"plan": str(tmp_path)})
    with torch.no_grad():
        ids = torch.randint(0, 61, (2, 1))
        if modpass._compat.INDUCTOR_FAILS_ON_ONE_TOKEN_ROUTING:
            with backend_refuses(modpass.ConfigError, "one token per sequence, whose routed graph this torch's Inductor cannot compile"):
                compiled(ids)
            return
        torch.testing.assert_close(compiled(ids), routed(ids), rtol=1e-4, atol=1e-4)


def test_mixed_task_training_is_one_graph_for_every_mix_of_tasks():
    """Task ids as a LongTensor split in the graph: one graph for every mix, absent tasks included.

    Block 0 routes t2i and is dense for mmu (a layer switch); block 1 routes both. (Llama's blocks,
    whose inputs do not all follow the batch, are split by task in the route-masked test below.)
    """
    torch.manual_seed(0)
    tasks = ("t2i", "mmu")
    ratios = {"t2i": [0.25, 0.5], "mmu": [1.0, 0.75]}
    routed = modpass.transform(models.NanoGPT(layers=2).train(), ratios, layers="all", aux_loss_weight=0.1)
    models.randomise_routers(routed)
    idx = torch.randint(0, 61, (4, 16))
    params = list(routed.parameters())

    def step(model, task):
        loss = model(idx, task=task).square().mean() + modpass.aux_loss(routed)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [loss] + [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]

    compiled = torch.compile(routed, backend="modpass", fullgraph=True)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        for mix in ([0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]):
            got = step(compiled, torch.tensor(mix))
            want = step(routed, [tasks[i] for i in mix])
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
        with pytest.raises(RuntimeError, match=OUT_OF_RANGE):
            compiled(idx, task=torch.tensor([0, 2, 1, 0]))
    assert compiled_graphs() == 1


@needs_hf_dynamo
@pytest.mark.parametrize("workaround", [False, True], ids=["this-torch", "torch-2.12-workaround"])
def test_mixed_task_training_of_a_padded_batch_compiles_to_one_graph(monkeypatch, workaround):
    """Compiled, Llama's layers read a 4-D mask, which a task's group gathers for its data-dependent rows.

    CPU attention before torch 2.13 could not trace that mask (``passes/unbacked_attention_masks.py``); the
    workaround, forced on here, calls the kernel that attention chooses.
    """
    if workaround:
        monkeypatch.setattr(modpass._compat, "CPU_ATTENTION_GUARDS_ON_MASK_BATCH", True)
    torch.manual_seed(0)
    routed = modpass.transform(models.llama(layers=2).train(), {"t2i": 0.5, "mmu": 0.25}, layers=[1])
    models.randomise_routers(routed)
    ids = torch.randint(0, 97, (4, 16))
    padding = torch.ones_like(ids)
    padding[0, :5] = 0
    padding[3, :2] = 0
    replaced = [n for gm, _ in routed.model.layers[1]._analyses.values() for n in gm.graph.nodes
                if n.target is modpass._compat.masked_attention_while_compiling]
    assert bool(replaced) == modpass._compat.CPU_ATTENTION_GUARDS_ON_MASK_BATCH

    def step(model, task):
        logits = model(input_ids=ids, attention_mask=padding, task=task).logits
        loss = logits[padding.bool()].square().mean()
        params = list(routed.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)  # a task absent from the batch trains no router
        return [loss] + [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]

    compiled = torch.compile(routed, backend="modpass", fullgraph=True)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        for mix in ([0, 1, 1, 0], [1, 1, 1, 1]):
            got = step(compiled, torch.tensor(mix))
            want = step(routed, [("t2i", "mmu")[i] for i in mix])
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert compiled_graphs() == 1


# Compiled, an out-of-range task id leaves its row in no group, and the group sizes no longer add up
# to the batch (a runtime assert); torch 2.6 and 2.7 drop that assert and read the ids through a bounds-checked index.
OUT_OF_RANGE = r"Eq\(u\d+ \+ u\d+, 4\)|index out of bounds"


def test_split_views_of_a_task_group_compile_right_with_the_torch_2_6_workaround(monkeypatch):
    """Torch 2.6's Inductor misread nanoGPT's q/k/v views in a task's group (passes/unbacked_views.py):
    the test above failed there. Here the workaround runs on this torch: its copies trace, compile and change nothing."""
    monkeypatch.setattr(modpass._compat, "INDUCTOR_MISREADS_UNBACKED_VIEWS", True)
    torch.manual_seed(0)
    routed = modpass.transform(models.NanoGPT(layers=2).eval(), {"t2i": 0.5, "mmu": 1.0}, layers=[1])
    models.randomise_routers(routed)
    copies = [[n for n in gm.graph.nodes if n.target is modpass._compat.contiguous_while_compiling]
              for gm, _ in routed.h[1]._analyses.values()]
    assert copies and all(len(c) == 3 for c in copies), "q, k and v of every prepared call"
    idx = torch.randint(0, 61, (4, 16))
    compiled = torch.compile(routed, backend="modpass", fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = compiled(idx, task=torch.tensor([0, 1, 1, 0]))
        want = routed(idx, task=["t2i", "mmu", "mmu", "t2i"])
        # Without autograd a check inside a C++ kernel aborted the process (torch 2.13): this one raises.
        with pytest.raises(RuntimeError, match=OUT_OF_RANGE):
            compiled(idx, task=torch.tensor([0, 2, 1, 0]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


THREE_TASKS = ("t2i", "mmu", "lm")


@functools.cache
def three_task_nanogpt():
    """Routed per layer: layer 0 dense for mmu, layer 2 dense for lm and t2i (layer switches); others routed."""
    ratios = {"t2i": [0.25, 0.5, 1.0, 0.25], "mmu": [1.0, 0.75, 0.5, 0.5], "lm": [0.5, 0.125, 1.0, 1.0]}
    routed = modpass.transform(models.NanoGPT().eval(), ratios, layers="all")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in modpass.routed_blocks(routed).values():
            for router in block.mod_routers.values():
                router.weight.copy_(torch.randn(router.weight.shape, generator=generator))
    return routed


@settings(max_examples=30)
@given(mix=st.lists(st.integers(0, len(THREE_TASKS) - 1), min_size=5, max_size=5))
def test_the_split_in_the_graph_routes_every_mix_as_the_split_in_python(mix):
    routed = three_task_nanogpt()
    compiled = torch.compile(routed, backend="eager", fullgraph=True)
    idx = torch.arange(5 * 12).reshape(5, 12) % 61
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = compiled(idx, task=torch.tensor(mix))
        want = routed(idx, task=[THREE_TASKS[i] for i in mix])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert compiled_graphs() == 1, "one graph serves every mix"


# Route masks under compile: the largest row capacity is an unbacked size (capture_scalar_outputs),
# and a task-id split stays in the graph (capture_dynamic_output_shape_ops).
ROUTE_MASK_SETTINGS = {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": True}


@pytest.mark.skipif(modpass._compat.DYNAMO_CANNOT_SHARE_ONE_CALL,
                    reason="this torch cannot compile one call for rows of different capacities: it splits them, with graph breaks")
@settings(max_examples=25)
@given(
    mix=st.lists(st.integers(0, len(THREE_TASKS) - 1), min_size=5, max_size=5),
    routable=st.lists(st.lists(st.booleans(), min_size=12, max_size=12), min_size=5, max_size=5),
)
def test_route_masks_under_compile_are_one_graph_for_every_mask_and_mix(mix, routable):
    """Rows of one task whose capacities differ share one call (extra slots), eager splits them by capacity."""
    routed = three_task_nanogpt()
    with torch.no_grad():
        # The routes eager calls use for groups of one and of two rows, built before compiling (see three_task_nanogpt).
        for task in THREE_TASKS:
            for rows in (1, 2):
                routed(torch.zeros(rows, 12, dtype=torch.long), task=task, route_mask=torch.ones(rows, 12, dtype=torch.bool))
    compiled = torch.compile(routed, backend="eager", fullgraph=True)
    idx = torch.arange(5 * 12).reshape(5, 12) % 61
    mask = torch.tensor(routable)
    with torch.no_grad(), torch._dynamo.config.patch(**ROUTE_MASK_SETTINGS):
        got = compiled(idx, task=torch.tensor(mix), route_mask=mask)
        want = routed(idx, task=[THREE_TASKS[i] for i in mix], route_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert compiled_graphs() == 1, "one graph serves every route mask and mix"


@pytest.mark.parametrize("first, then", [("a", "a+mask"), ("a+mask", "a"), ("a", "b")],
                         ids=["mask added", "mask dropped", "task changed"])
def test_a_compiled_model_follows_routing_arguments_its_first_call_lacked(first, then):
    """Each call's task and route mask reach the blocks: a key absent when Dynamo traced must not be dropped later."""
    torch.manual_seed(0)
    routed = modpass.transform(models.NanoGPT(layers=2).eval(), {"a": 0.25, "b": 0.75}, layers="all")
    idx = torch.randint(0, 61, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 3:9] = True

    def call(model, spec: str):
        task, _, masked = spec.partition("+")
        return model(idx, task=task, **({"route_mask": mask} if masked else {}))

    # Where torch splits a route mask's rows by capacity, with graph breaks, the guards matter as much.
    compiled = torch.compile(routed, backend="eager", fullgraph=not modpass._compat.DYNAMO_CANNOT_SHARE_ONE_CALL)
    with torch.no_grad(), torch._dynamo.config.patch(**ROUTE_MASK_SETTINGS):
        call(compiled, first)
        torch.testing.assert_close(call(compiled, then), call(routed, then), rtol=1e-6, atol=1e-6)


def test_a_compiled_model_follows_the_default_task():
    torch.manual_seed(0)
    routed = modpass.transform(models.NanoGPT(layers=2).eval(), {"a": 0.25, "b": 0.75}, layers="all")
    compiled = torch.compile(routed, backend="eager", fullgraph=True)
    idx = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        for task in ("a", "b"):
            with modpass.default_task(compiled, task):
                torch.testing.assert_close(compiled(idx), routed(idx, task=task), rtol=0, atol=0)


def test_route_masks_under_compile_split_by_capacity_where_torch_cannot_share_one_call(monkeypatch):
    """Torch 2.6 cannot compile rows of different capacities as one call (``_compat.DYNAMO_CANNOT_SHARE_ONE_CALL``):
    there each capacity gets a call of its own, through graph breaks. Forced on here: compiled training matches eager."""
    monkeypatch.setattr(modpass._compat, "DYNAMO_CANNOT_SHARE_ONE_CALL", True)
    torch.manual_seed(0)
    routed = modpass.transform(models.NanoGPT(layers=2).train(), {"t2i": 0.5, "mmu": 0.25}, layers=[1])
    models.randomise_routers(routed)
    idx = torch.randint(0, 61, (4, 16))
    mask = torch.ones(4, 16, dtype=torch.bool)
    mask[:, :4] = False
    mask[1, 4:10] = False  # rows of one task with 12 and 6 routable tokens

    def step(model, task):
        loss = model(idx, task=task, route_mask=mask).square().mean()
        return [loss, *torch.autograd.grad(loss, list(routed.parameters()))]

    compiled = torch.compile(routed, backend=TRACING_BACKEND)
    with torch._dynamo.config.patch(**ROUTE_MASK_SETTINGS):
        got = step(compiled, torch.tensor([0, 0, 1, 1]))
        records = routed.h[1].last_routing
        assert [r.extra for r in records] == [None] * 3, "one call per capacity, no extra slots"
        want = step(routed, ["t2i", "t2i", "mmu", "mmu"])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert compiled_graphs() > 1, "the split by capacity breaks the graph"


def routing_roles(records) -> dict[tuple[int, int], str]:
    """``(row, position) -> "task selected"`` or ``"task extra slot"`` for the tokens a block's calls took."""
    roles = {}
    for record in records:
        rows = range(record.index.shape[0]) if record.rows is None else record.rows.tolist()
        for slot_row, row in enumerate(rows):
            for slot, position in enumerate(record.index[slot_row].tolist()):
                extra = record.extra is not None and bool(record.extra[slot_row, slot])
                roles[(row, position)] = f"{record.task} {'extra slot' if extra else 'selected'}"
    return roles


@needs_hf_dynamo
@pytest.mark.parametrize(
    ("device", "attention"),
    [pytest.param("cpu", None, id="cpu"),
     # On an H200 (torch 2.11, 2026-12-04) the default CUDA attention's compiled gradients differed from eager's
     # (up to 7e-4 in 2% of the embedding gradient; the loss matched); the math backend tells whether the
     # memory-efficient kernel's path through Inductor is where they part.
     *(pytest.param("cuda", backend, id=f"cuda-{backend or 'default'}-attention",
                    marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))
       for backend in (None, "MATH"))],
)
def test_route_masked_mixed_task_training_compiles_to_one_graph_and_matches_eager(device, attention):
    """Llama's traced blocks read a 4-D mask, in which the extra slots are hidden; gradients and the aux loss match."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = contextlib.nullcontext() if attention is None else sdpa_kernel(getattr(SDPBackend, attention))
    torch.manual_seed(0)
    tasks = ("t2i", "mmu")
    routed = modpass.transform(models.llama(layers=2).to(device).train(), {"t2i": 0.5, "mmu": 0.25}, layers=[1],
                               aux_loss_weight=0.1)
    models.randomise_routers(routed)
    ids = torch.randint(0, 97, (4, 16), device=device)
    # On CUDA, a float64 copy on the CPU as well: where compiled and eager differ, it says which is wrong.
    exact = copy.deepcopy(routed).to("cpu", torch.float64) if device == "cuda" else None

    roles = {}

    def step(model, task, mask, owner=routed, run="eager"):
        """The loss and the gradient of every parameter of ``owner`` (the routed model ``model`` runs)."""
        params = list(owner.parameters())
        inputs = ids.to(params[0].device)
        loss = model(input_ids=inputs, task=task, route_mask=mask).logits.square().mean() + modpass.aux_loss(owner)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        roles[run] = routing_roles(owner.model.layers[1].last_routing)
        return [loss] + [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]

    def assert_close(actual, expected, what, runs):
        def message(text):
            if actual.shape != (97, routed.config.hidden_size):
                return f"{what}: {text}"
            # An embedding gradient: which tokens differ, and what routing did with each in either run.
            close = torch.isclose(actual.cpu().double(), expected.cpu().double(), rtol=1e-4, atol=1e-5).all(dim=1)
            tokens = torch.isin(ids.cpu(), (~close).nonzero().flatten()).nonzero().tolist()
            routing = "; ".join(f"row {row} position {pos}: " + ", ".join(
                f"{run} {roles[run].get((row, pos), 'skipped')}" for run in runs) for row, pos in tokens)
            return f"{what}: {text}\nTokens whose embedding gradient differs: {routing}"

        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=message)

    names = ["loss", *(name for name, _ in routed.named_parameters())]
    compiled = torch.compile(routed, backend="modpass", fullgraph=True)
    masks = torch.zeros(2, 4, 16, dtype=torch.bool, device=device)
    masks[0, :, 4:] = True
    masks[0, 1, 4:10] = False  # rows of one task with 12 and 6 routable tokens
    masks[1, :, 2:] = True
    masks[1, 3, :] = True
    with torch._dynamo.config.patch(**ROUTE_MASK_SETTINGS), backends:
        for mix, mask in zip(([0, 0, 1, 1], [0, 1, 1, 0]), masks):
            got = step(compiled, torch.tensor(mix, device=device), mask, run="compiled")
            (record,) = (r for r in routed.model.layers[1].last_routing if r.task == "t2i")
            assert record.extra is not None and record.extra.any(), "the rows' capacities differ"
            # 13 and 7 slots, the groups' largest capacities, would fail CUDA's attention backward.
            slots = [r.index.shape[1] for r in routed.model.layers[1].last_routing]
            assert all(k % SLOT_MULTIPLE == 0 for k in slots), slots
            want = step(routed, [tasks[i] for i in mix], mask)
            if exact is not None:
                reference = step(exact, [tasks[i] for i in mix], mask.cpu(), owner=exact, run="float64")
                for name, g, w, r in zip(names, got, want, reference):
                    assert_close(w.cpu().double(), r, f"eager {name} against float64 on the CPU", ("eager", "float64"))
                    assert_close(g.cpu().double(), r, f"compiled {name} against float64 on the CPU", ("compiled", "float64"))
            for name, g, w in zip(names, got, want):
                assert_close(g, w, f"compiled {name} against eager", ("compiled", "eager"))
    assert compiled_graphs() == 1


@needs_hf_dynamo
@pytest.mark.skipif(modpass._compat.DYNAMO_CANNOT_SHARE_ONE_CALL,
                    reason="this torch cannot compile one call for rows of different capacities: it splits them, with graph breaks")
def test_route_masks_on_sparse_moe_blocks_compile_to_one_graph():
    """transformers' batched_mm experts multiply each token's copies by its experts' weights, a product within each
    token: rows of different capacities share one call with extra slots, as in a dense Llama block."""
    torch.manual_seed(0)
    routed = modpass.transform(models.mixtral(layers=2), 0.5, layers=[1])
    models.randomise_routers(routed)
    ids = torch.randint(0, 97, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[1, :6] = False
    mask[2, 10:] = False
    compiled = torch.compile(routed, backend="eager", fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(**ROUTE_MASK_SETTINGS):
        got = compiled(input_ids=ids, route_mask=mask).logits
        (record,) = routed.model.layers[1].last_routing
        assert record.extra is not None and record.extra.any(), "the rows' capacities differ"
        assert routed.model.layers[1].shared_call_refusal is None
        want = routed(input_ids=ids, route_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert compiled_graphs() == 1


@pytest.mark.parametrize("mixed", [False, True], ids=["one-task", "mixed-tasks"])
def test_route_masks_under_compile_split_by_capacity_where_attention_could_see_extra_slots(mixed):
    """An encoder attends both ways without a mask: no extra slots, so its rows are split by capacity (graph breaks),
    also within a task's group of a mixed batch, whose rows the graph chose."""
    torch.manual_seed(0)
    routed = modpass.transform(models.NanoGPT(layers=2, causal=False).eval(), {"a": 0.5, "b": 0.25} if mixed else 0.5,
                               layers=[1])
    models.randomise_routers(routed)
    idx = torch.randint(0, 61, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, :6] = False
    tasks = {"task": torch.tensor([0, 0, 1])} if mixed else {}
    compiled = torch.compile(routed, backend="eager")
    with torch.no_grad(), torch._dynamo.config.patch(**ROUTE_MASK_SETTINGS):
        if GRAPH_BREAKS_REPORT_MODPASS_REASON:
            with pytest.raises(torch._dynamo.exc.Unsupported, match="one call per\\s+capacity"):
                torch.compile(routed, backend="eager", fullgraph=True)(idx, route_mask=mask, **tasks)
            torch._dynamo.reset()
        got = compiled(idx, route_mask=mask, **tasks)
        assert len(routed.h[1].last_routing) == 2 + mixed, "one call per capacity"
        assert "attends without a mask and not causally" in routed.h[1].shared_call_refusal
        want = routed(idx, route_mask=mask, **({"task": ["a", "a", "b"]} if mixed else {}))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.xfail(torch.__version__ < (2, 13), strict=False,
                   reason="torch 2.6's Dynamo breaks the graph before the first layer and resumes in frames rooted "
                   "inside the layers, whose module paths do not name the block: unrouted with the warning only")
def test_the_plan_option_refuses_a_block_that_graph_breaks_split(tmp_path):
    """nn.TransformerEncoderLayer's forward breaks Dynamo's graph (its fast-path checks), so no graph holds a whole
    block: served with options['plan'], the model compiled unrouted and ran dense, with a warning only."""
    from tests.test_token_tables import EncoderWithSharedMask

    idx = torch.randint(0, 50, (2, 12))
    model = EncoderWithSharedMask("causal-float").eval()
    modpass.save(modpass.transform(model, 0.5, layers="all", example_inputs=(idx,)), tmp_path)
    compiled = torch.compile(model, backend="modpass", dynamic=True, options={"plan": str(tmp_path)})
    with torch.no_grad(), backend_refuses(modpass.ConfigError, r"options\['plan'\] routes layers.0, and this graph .* holds it, or part of it"):
        compiled(idx)
