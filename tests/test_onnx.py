"""ONNX export of a routed model (``examples/export_llama.py``): ONNX Runtime runs it as eager torch does."""

from __future__ import annotations

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


def test_each_task_served_by_onnx_runtime_equals_eager_at_other_batches_and_lengths():
    """The example exports one task plain and one with a route mask whose rows keep different token counts."""
    differences = example.main(["--skip-aoti"])
    assert set(differences) == {"onnx_t2i", "onnx_mmu"}
    assert max(differences.values()) <= 1e-5


def test_zero_routers_keep_the_first_tokens_in_onnx_runtime_too(tmp_path):
    """Equal scores are the case where sorts differ: routing exports as ONNX's TopK, which keeps them in index order,
    as the stable sort of eager routing does (no sort, and no modpass operator, reaches the ONNX model)."""
    torch.manual_seed(0)
    routed = modpass.transform(models.llama(layers=1), {"t2i": 0.5, "mmu": 0.25}, layers="all")
    path = example.export_onnx(routed, "mmu", tmp_path / "mmu.onnx")
    operators = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "TopK" in operators and not {"Sort", "select_tokens"} & operators
    served = example.onnx_runtime(path)
    ids, mask = example.padded_batch(3, 20, vocab=97)
    with torch.no_grad():
        want = routed(input_ids=ids, attention_mask=mask, task="mmu").logits
        torch.testing.assert_close(torch.as_tensor(served(ids, mask))[mask.bool()], want[mask.bool()], rtol=0, atol=1e-5)
