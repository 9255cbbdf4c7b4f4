"""ONNX export of a routed model (``examples/export_llama.py``): ONNX Runtime runs it as eager torch does."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import modpass
from tests import models
from tests.test_examples import load_example

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
if torch.__version__ < "2.8":
    pytest.skip("torch < 2.8's ONNX exporter does not say it is exporting, so routing's stable sort reaches it",
                allow_module_level=True)

example = load_example("export_llama")


def test_a_route_masked_task_served_by_onnx_runtime_equals_eager_at_other_batches_and_lengths():
    """The example's ONNX program: one task, with a route mask whose rows keep different token counts."""
    assert example.main(["--skip-aoti"])["onnx"] <= 1e-5


@pytest.fixture(scope="module")
def two_task_llama() -> torch.nn.Module:
    """A routed Llama with two tasks, its routers zero as ``transform`` leaves them."""
    torch.manual_seed(0)
    return modpass.transform(models.llama(layers=2), {"t2i": 0.5, "mmu": 0.25}, layers="all")


def test_zero_routers_keep_the_first_tokens_in_onnx_runtime_too(two_task_llama, tmp_path):
    """Equal scores are the case where sorts differ: routing exports as ONNX's TopK, which keeps them in index order,
    as the stable sort of eager routing does (no sort, and no modpass operator, reaches the ONNX model)."""
    routed = two_task_llama
    path = example.export_onnx(routed, "mmu", tmp_path / "mmu.onnx")
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


class ServeTaskIds(torch.nn.Module):
    """A routed model taking a mixed-task batch: a task id per row, in the order of the ratios."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, task=task, use_cache=False).logits


def test_a_mixed_task_batch_served_by_onnx_runtime_equals_eager_at_other_batches_and_mixes(two_task_llama, tmp_path):
    """The rows of each task run at its capacity with its router, in one ONNX model for every batch and mix (a task
    absent included). torch.export alone specialises the batch here: ONNX's export defers that guard, which the
    comparison shows spurious. Before torch 2.10 the ONNX model ran at the example's batch only, and is refused."""
    routed = copy.deepcopy(two_task_llama)
    for name, parameter in routed.named_parameters():
        if "mod_routers" in name:
            parameter.data.normal_()
    path = tmp_path / "mixed.onnx"
    with contextlib.ExitStack() as refusal:
        if torch.__version__ < "2.10":
            refusal.enter_context(pytest.raises(Exception, match="needs torch >= 2.10"))
        torch.onnx.export(ServeTaskIds(routed), (*example.padded_batch(4, 40, vocab=97), torch.tensor([0, 1, 1, 0])),
                          dynamo=True, dynamic_shapes=(example.AUTO, example.AUTO, {0: torch.export.Dim.AUTO}),
                          input_names=["input_ids", "attention_mask", "task"], output_names=["logits"]).save(str(path))
    if torch.__version__ < "2.10":
        return
    served = example.onnx_runtime(path)
    for batch, tokens, task in ((3, 57, [1, 1, 1]), (5, 33, [0, 1, 0, 0, 1])):
        ids, mask = example.padded_batch(batch, tokens, vocab=97)
        task = torch.tensor(task)
        with torch.no_grad():
            want = routed(input_ids=ids, attention_mask=mask, task=task).logits
        torch.testing.assert_close(torch.as_tensor(served(ids, mask, task))[mask.bool()], want[mask.bool()], rtol=0, atol=1e-5)
