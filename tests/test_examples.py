"""The examples run against the current API (a few eager steps; the compiled paths have tests of their own)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from modpass.io import read

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_llama_runs_a_few_steps_and_saves_the_routers(tmp_path):
    accuracy = load_example("train_llama").main(["--steps", "3", "--batch", "8", "--eager", "--out", str(tmp_path)])
    generated = accuracy.pop("generated")
    assert set(accuracy) == {"copy", "sort"} and all(0.0 <= value <= 1.0 for value in accuracy.values())
    # Trained with the answers outside the route mask, the model generates them the same with a KV cache as without,
    # a DynamicCache or a StaticCache.
    assert all(result["same_as_uncached"] == 1.0 and result["same_with_static_cache"] == 1.0 and result["cache_vs_dense"] < 1.0
               for result in generated.values())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["plan.json", "routers.safetensors"]
    plan, _ = read(tmp_path)
    assert [dict(block.ratios) for block in plan.blocks] == [{"copy": 0.25, "sort": 0.5}] * 2, "the capacity changed halfway"


def test_lora_llama_fine_tunes_with_peft_and_loads_back(tmp_path):
    result = load_example("lora_llama").main(["--steps", "3", "--batch", "4", "--out", str(tmp_path)])
    assert result["loaded_difference"] == 0.0, "modpass.load and PEFT's loading give back the trained model"
    assert (tmp_path / "adapter" / "copying" / "adapter_model.safetensors").is_file()
    assert sorted(path.name for path in (tmp_path / "routing").iterdir()) == ["plan.json", "routers.safetensors"]
