"""The ``modpass demo`` command: data encoding and a quick end-to-end run."""

from __future__ import annotations

import json
from itertools import islice

import pytest
import torch

import modpass.demo
from modpass.demo import data, main


@pytest.fixture(scope="module")
def digits():
    return data.load(seed=0)


def test_split_is_deterministic_and_disjoint(digits):
    again = data.load(seed=0)
    torch.testing.assert_close(again.test_images, digits.test_images, rtol=0, atol=0)
    assert len(digits.train_labels) + len(digits.test_labels) == 1797
    train = {tuple(row) for row in digits.train_images.tolist()}
    overlap = sum(tuple(row) in train for row in digits.test_images.tolist())
    assert overlap == 0


def test_batches_hold_valid_tokens_targets_and_masks(digits):
    for batch in islice(data.mixed_batches(digits, batch_size=8, seed=0), 3):
        assert batch.tokens.shape == batch.targets.shape == batch.route_mask.shape == (8, data.SEQ_LEN)
        assert batch.tokens.dtype == torch.long and batch.route_mask.dtype == torch.bool
        assert batch.tokens.min() >= 0 and batch.tokens.max() < data.VOCAB_SIZE
        assert sorted(batch.tasks) == ["mmu"] * 4 + ["t2i"] * 4
        assert (batch.route_mask.sum(1) == data.IMAGE_TOKENS).all()
        # Routable tokens are exactly the pixels.
        assert (batch.tokens[batch.route_mask] < data.PIXEL_LEVELS).all()
        for row, task in enumerate(batch.tasks):
            predicted = batch.targets[row][batch.targets[row] != data.IGNORE]
            if task == "t2i":
                assert batch.tokens[row, 0] == data.BOS_T2I
                assert data.LABEL_OFFSET <= batch.tokens[row, 1] < data.LABEL_OFFSET + data.NUM_CLASSES
                # Next-token targets: the logits at position i predict token i + 1.
                torch.testing.assert_close(predicted, batch.tokens[row, 2:], rtol=0, atol=0)
            else:
                assert batch.tokens[row, 0] == data.BOS_MMU and batch.tokens[row, -1] == data.QUERY
                assert predicted.shape == (1,)
                assert data.LABEL_OFFSET <= predicted.item() < data.LABEL_OFFSET + data.NUM_CLASSES


def test_batches_are_reproducible_from_the_seed(digits):
    first = next(data.mixed_batches(digits, 8, seed=3))
    second = next(data.mixed_batches(digits, 8, seed=3))
    assert torch.equal(first.tokens, second.tokens) and first.tasks == second.tasks


def test_quick_demo_writes_plot_and_results(tmp_path, capsys):
    # Four steps rather than --quick's twelve: every variant still trains and is evaluated (about 10 s less).
    assert main(["--quick", "--steps", "4", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "PASS" in printed
    assert (tmp_path / "loss_vs_flops.png").stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    variants = results["variants"]
    assert set(variants) == {"dense", "mod", "unimod"}
    dense = variants["dense"]["train_flops_per_step"]
    for name in ("mod", "unimod"):
        assert 0 < variants[name]["train_flops_per_step"] < dense
        assert all(0 < variants[name]["forward_flops"][t] < variants["dense"]["forward_flops"][t] for t in data.TASKS)
    # Matched training budgets: every variant ends within one step's FLOPs of the others.
    budgets = [v["train_flops"] for v in variants.values()]
    assert max(budgets) - min(budgets) <= dense
    for outcome in variants.values():
        final = outcome["history"][-1]
        assert 0 <= final["mmu_accuracy"] <= 1 and final["t2i_loss"] > 0


def test_missing_demo_dependencies_are_named_with_the_fix(monkeypatch, capsys):
    real = modpass.demo.importlib.util.find_spec
    monkeypatch.setattr(modpass.demo.importlib.util, "find_spec",
                        lambda name, *args: None if name == "sklearn" else real(name, *args))
    assert main(["--quick"]) == 2
    assert "pip install 'modpass[demo]'" in capsys.readouterr().err


def test_an_out_path_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    """It trained for minutes, then failed with a raw FileExistsError, writing nothing."""
    taken = tmp_path / "results"
    taken.write_text("")
    with pytest.raises(SystemExit) as refusal:
        main(["--quick", "--out", str(taken)])
    assert refusal.value.code == 2 and "is a file; give a directory" in capsys.readouterr().err
