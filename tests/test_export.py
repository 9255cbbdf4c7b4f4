"""Serving without Python model code (``examples/export_llama.py``): torch.export programs, and ONNX models that ONNX
Runtime runs as eager torch does."""

from __future__ import annotations

import copy
import importlib.util
import io
import warnings

import pytest
import torch

import modpass
from tests import models
from tests.test_examples import load_example

example = load_example("export_llama")
needs_onnx = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")) or torch.__version__ < "2.8",
    reason="needs onnx, onnxscript and onnxruntime, and torch >= 2.8, whose ONNX exporter says it is exporting (before, "
           "routing's stable sort reaches it)",
)


@needs_onnx
def test_a_route_masked_task_served_by_onnx_runtime_equals_eager_at_other_batches_and_lengths():
    """The example's ONNX program: one task, with a route mask whose rows keep different token counts."""
    assert example.main(["--skip-aoti"])["onnx"] <= 1e-5


@pytest.fixture(scope="module")
def two_task_llama() -> torch.nn.Module:
    """A routed Llama with two tasks, its routers zero as ``transform`` leaves them."""
    torch.manual_seed(0)
    return modpass.transform(models.llama(layers=2), {"t2i": 0.5, "mmu": 0.25}, layers="all")


def with_random_routers(routed: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``routed`` whose routers are random, as trained ones would be: zero ones tie every score."""
    return models.randomise_routers(copy.deepcopy(routed))


def assert_serves_every_batch_and_mix(served, routed: torch.nn.Module) -> None:
    """``served(ids, attention_mask, task_ids)`` equals eager ``routed`` at batches and lengths other than the
    export's, a task absent included, at the tokens the attention mask keeps."""
    for batch, tokens, task in ((3, 57, [1, 1, 1]), (5, 33, [0, 1, 0, 0, 1]), (2, 20, [1, 0])):
        ids, mask = example.padded_batch(batch, tokens, vocab=97)
        task = torch.tensor(task)
        with torch.no_grad():
            want = routed(input_ids=ids, attention_mask=mask, task=task).logits
        torch.testing.assert_close(torch.as_tensor(served(ids, mask, task))[mask.bool()], want[mask.bool()], rtol=0, atol=1e-5)


def test_a_mixed_task_program_serves_every_batch_and_mix(two_task_llama):
    """The example's AOTInductor program takes a task id per row. Until the third session of 2026-12-06 torch.export
    fixed its batch to the example's: the task split read ``len(task)``, which makes a symbolic size an int. Before
    torch 2.8 that export fails in torch, and is refused."""
    routed = with_random_routers(two_task_llama)
    if torch.__version__ < "2.8":
        with pytest.raises(Exception, match="needs torch >= 2.8"):
            example.export_task_ids(routed)
        return
    served = example.export_task_ids(routed).module()
    assert_serves_every_batch_and_mix(served, routed)


@needs_onnx
def test_zero_routers_keep_the_first_tokens_in_onnx_runtime_too(two_task_llama, tmp_path):
    """Equal scores are the case where sorts differ: routing exports as ONNX's TopK, which keeps them in index order,
    as the stable sort of eager routing does (no sort, and no modpass operator, reaches the ONNX model)."""
    routed = two_task_llama
    path = example.export_onnx(routed, "mmu", tmp_path / "mmu.onnx")
    import onnx

    operators = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "TopK" in operators and not {"Sort", "select_tokens"} & operators
    served = example.onnx_runtime(path)
    for batch, tokens in ((3, 20), (2, 4), (1, 1)):  # down to one token, which torch.export's range would not take
        ids, mask = example.padded_batch(batch, tokens, vocab=97)
        if tokens < 4:
            mask = torch.ones_like(mask)
        with torch.no_grad():
            want = routed(input_ids=ids, attention_mask=mask, task="mmu").logits
        torch.testing.assert_close(torch.as_tensor(served(ids, mask))[mask.bool()], want[mask.bool()], rtol=0, atol=1e-5)


@needs_onnx
def test_a_mixed_task_batch_served_by_onnx_runtime_equals_eager_at_other_batches_and_mixes(two_task_llama, tmp_path):
    """The rows of each task run at its capacity with its router, in one ONNX model for every batch and mix (a task
    absent included). On torch 2.8 and 2.9 the ONNX model ran at the example's batch only, and was refused, until
    the third session of 2026-12-06 (the ``len(task)`` of the test above)."""
    routed = with_random_routers(two_task_llama)
    path = tmp_path / "mixed.onnx"
    torch.onnx.export(example.ServeTaskIds(routed), example.padded_batch(4, 40, vocab=97, tasks=2), dynamo=True,
                      dynamic_shapes=(example.AUTO, example.AUTO, {0: torch.export.Dim.AUTO}),
                      input_names=["input_ids", "attention_mask", "task"], output_names=["logits"]).save(str(path))
    assert_serves_every_batch_and_mix(example.onnx_runtime(path), routed)


def test_torchscript_is_refused_with_the_ways_to_serve():
    """torch.jit.trace (and the ONNX exporter without dynamo=True, which traces so) would fix the capacity at the
    example's length, and torch.jit.script cannot compile a routed block: each is refused, naming torch.export and
    ONNX's dynamo=True; so is tracing a routed block alone."""
    routed = modpass.transform(models.NanoGPT(layers=2), 0.5, layers=[1]).eval()
    ids = torch.randint(0, 61, (2, 12))
    trace = r"TorchScript cannot hold a routed block: .* torch.jit.trace would fix .*dynamo=True"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation
        with pytest.raises(modpass.RoutingInputError, match="NanoGPT: " + trace):
            torch.jit.trace(routed, (ids,))
        with pytest.raises(modpass.RoutingInputError, match="NanoGPT: " + trace):
            torch.onnx.export(routed, (ids,), io.BytesIO(), dynamo=False)
        with pytest.raises(modpass.RoutingInputError, match="h.1: " + trace):
            torch.jit.trace(routed.h[1], (torch.randn(2, 12, 32),))
        with pytest.raises(modpass.RoutingInputError, match=r"h.1: TorchScript .* torch.jit.script cannot compile"):
            torch.jit.script(routed)
