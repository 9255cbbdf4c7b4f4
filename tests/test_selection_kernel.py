"""modpass's Triton selection kernel: where routing uses it, and its answers on CPU under Triton's interpreter.

``TRITON_INTERPRET`` must be set before Triton is imported, and Dynamo imports
Triton whenever it is installed, so the interpreter checks run in a fresh
process: this file, run as a script. On a GPU the same kernel is checked
compiled, in ``test_cuda.py``; here it is also compiled ahead of time for sm_90
and sm_80, which needs no GPU.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import hypothesis
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from modpass import routing
from modpass.kernels import selection

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not hasattr(torch.library, "triton_op"),
    reason="needs Triton (the test extra installs it) and torch >= 2.6",
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_kernel_takes_cuda_rows_up_to_max_tokens_only(monkeypatch):
    monkeypatch.setattr(selection, "AVAILABLE", True)
    with FakeTensorMode():  # CUDA tensors without a GPU
        assert selection.supported(torch.empty(2, selection.MAX_TOKENS, device="cuda"))
        assert not selection.supported(torch.empty(2, selection.MAX_TOKENS + 1, device="cuda"))
    assert not selection.supported(torch.empty(2, 16))
    monkeypatch.setattr(selection, "AVAILABLE", False)
    with FakeTensorMode():
        assert not selection.supported(torch.empty(2, 16, device="cuda"))


def test_select_tokens_dispatches_to_the_kernel_where_supported_and_the_switch_is_on(monkeypatch):
    calls = []

    def kernel(scores, k):
        calls.append(k)
        return torch.zeros(scores.shape[0], k, dtype=torch.long)

    monkeypatch.setattr(selection, "supported", lambda scores: True)
    monkeypatch.setattr(selection, "select_tokens", kernel)
    scores = torch.tensor([[0.0, 2.0, 1.0]])
    assert routing.select_tokens(scores, 2).tolist() == [[0, 0]] and calls == [2]
    monkeypatch.setattr(routing, "SELECTION_KERNEL", False)
    assert routing.select_tokens(scores, 2).tolist() == [[1, 2]] and calls == [2]


@needs_triton
@pytest.mark.parametrize("capability", [90, 80])
def test_selection_kernel_compiles_for_the_gpu_without_one(capability, tmp_path, monkeypatch):
    # The interpreter runs code that Triton's compiler refuses (a loop-carried variable that changes
    # type, for one): the kernel must also go through the whole compile, to a cubin, for its GPUs.
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    compiled = selection.compile_for(capability)
    assert compiled.metadata.num_warps == selection.NUM_WARPS
    assert len(compiled.asm["cubin"]) > 0
    # Within the shared memory every CUDA GPU gives a block without opting in.
    assert compiled.metadata.shared <= 48 * 1024


@needs_triton
def test_triton_selection_kernel_follows_the_selection_rule_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selection kernel checks passed" in result.stdout


def _check_under_the_interpreter() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the pytest test, which sets TRITON_INTERPRET=1"
    from tests import conftest  # noqa: F401  (registers the suite's hypothesis profile, no deadline)

    # More examples than the suite's default: this is the kernel's main correctness test.
    hypothesis.settings.register_profile("triton-interpreter", hypothesis.settings.get_profile("modpass"), max_examples=20)
    hypothesis.settings.load_profile("triton-interpreter")

    from modpass import routing
    from modpass.kernels import selection
    from tests import test_reliability

    kernel = selection.launch
    # The reference's own property test (hypothesis: ties, +-0, +-inf, float32 extremes, several rows),
    # pointed at the kernel.
    routing.select_tokens = kernel
    test_reliability.test_select_tokens_keeps_the_k_best_with_ties_to_the_earlier_position()

    # Rows of one chunk, one token past it and several chunks; many ties; the edges of k.
    generator = torch.Generator().manual_seed(0)
    for length in (selection.CHUNK, selection.CHUNK + 1, 4 * selection.CHUNK + 77):
        scores = torch.randint(-50, 50, (2, length), generator=generator).float()
        scores[0, :3] = float("inf")
        scores[1, -3:] = float("-inf")
        scores[1, ::7] = -0.0
        for k in (0, 1, (length + 7) // 8, length):
            assert kernel(scores, k).tolist() == test_reliability.best_k_by_position(scores, k), (length, k)
    # Ties at the k-th place for a value with each single key bit set (both signs): every bit of the
    # threshold decides which tied tokens are kept. The integer-valued rows above missed a dropped pass.
    tie = torch.tensor([1 << bit for bit in range(31)], dtype=torch.int32).view(torch.float32)
    scores = torch.zeros(62, 10)
    scores[:, [0, 2, 4, 5, 8]] = torch.cat([tie, -tie]).unsqueeze(-1)
    scores[:, [3, 6]] = float("inf")
    scores[31:, [1, 7, 9]] = float("-inf")
    assert kernel(scores, 4).tolist() == test_reliability.best_k_by_position(scores, 4)
    # A strided (non-contiguous) row view is read correctly.
    wide = torch.randn(3, 200, generator=generator)
    assert kernel(wide[:, ::2], 17).tolist() == test_reliability.best_k_by_position(wide[:, ::2], 17)

    # The registered op, which routing calls on CUDA, launches the same kernel through wrap_triton.
    op = selection.register()
    try:
        assert op(wide, 50).tolist() == test_reliability.best_k_by_position(wide, 50)
    except RuntimeError as error:
        if "wrap_triton only works" not in str(error):
            raise
        print(f"the registered op cannot run interpreted kernels with torch {torch.__version__} (2.6's wrap_triton refuses them)")
    print("selection kernel checks passed")


if __name__ == "__main__":
    _check_under_the_interpreter()
