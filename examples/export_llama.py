"""Serve a routed Llama without Python model code: torch.export, then AOTInductor.

Run: python examples/export_llama.py   (random weights from a config; no downloads;
the AOTInductor compile takes about a minute on a 2-core CPU)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import modpass


class ServeTask(torch.nn.Module):
    """The routed model with its task fixed: ``torch.export`` takes tensors, so one program per task."""

    def __init__(self, model: torch.nn.Module, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, task=self.task, use_cache=False).logits


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    routed = modpass.transform(LlamaForCausalLM(config).eval(), {"t2i": 0.5, "mmu": 0.25}, layers="every_other")

    # Dim.AUTO for batch and length: the capacity ceil(ratio * T) brings guards (k <= T, ...) that hold
    # for the lengths the export records but that a named Dim("T") would have to prove for every length.
    auto = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
    exported = torch.export.export(ServeTask(routed, "mmu"), (torch.randint(0, 512, (2, 64)),), dynamic_shapes=(auto,),
                                   strict=False)
    print("exported the mmu program; lengths and batches it takes:", exported.range_constraints)

    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        package = torch._inductor.aoti_compile_and_package(exported, package_path=str(Path(directory) / "mmu.pt2"))
        print(f"AOTInductor package in {time.perf_counter() - start:.0f} s")
        served = torch._inductor.aoti_load_package(package)
        for batch, tokens in ((1, 37), (4, 200)):
            ids = torch.randint(0, 512, (batch, tokens))
            with torch.no_grad():
                difference = (served(ids) - routed(input_ids=ids, task="mmu").logits).abs().max().item()
            print(f"B={batch} T={tokens}: packaged vs eager routed logits, max diff {difference:.2e}")


if __name__ == "__main__":
    main()
