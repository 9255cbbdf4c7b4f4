"""Serve a routed Llama without Python model code: torch.export then AOTInductor, and ONNX for ONNX Runtime.

The AOTInductor package serves mixed-task batches (a task id per row, as UniMoD's batches mix text-to-image and
understanding prompts); the ONNX model serves one task under a route mask (the tokens that may skip routed layers).

Run: python examples/export_llama.py [--skip-aoti]   (random weights from a config; no downloads;
the AOTInductor compile takes about a minute on a 2-core CPU; the ONNX step needs onnxscript and
onnxruntime, and torch >= 2.8)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import modpass

VOCAB = 512
#: Batch and length symbolic. Dim.AUTO, not Dim("T"): the capacity ceil(ratio * T) brings guards (k <= T, ...)
#: that hold for the lengths the export records but that a named Dim would have to prove for every length.
AUTO = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
#: Batches and lengths the served programs are checked at, none of them the export's.
CHECKS = ((1, 37), (4, 200))


class ServeTask(torch.nn.Module):
    """The routed model with its task fixed: an exported program takes tensors, so one program per task. With
    ``route_mask``, the program takes one too (the tokens that may skip routed layers, UniMoD's image tokens)."""

    def __init__(self, model: torch.nn.Module, task: str):
        super().__init__()
        self.model, self.task = model, task
        self.training = model.training  # as the model: export warns of a module in training mode

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, route_mask: torch.Tensor | None = None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, route_mask=route_mask, task=self.task,
                          use_cache=False).logits


class ServeTaskIds(torch.nn.Module):
    """The routed model taking a mixed-task batch: a task id per row, in the order of ``transform``'s ratios."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.training = model.training

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, task=task, use_cache=False).logits


def padded_batch(batch: int, tokens: int, vocab: int = VOCAB, *, route_mask: bool = False,
                 tasks: int = 0) -> tuple[torch.Tensor, ...]:
    """Token ids and an attention mask whose first row is left-padded by three tokens; with ``route_mask`` a route
    mask marking about 60% of the tokens routable, a different number per row; with ``tasks`` a random task id per
    row, below ``tasks``."""
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[0, :3] = 0
    inputs = (torch.randint(0, vocab, (batch, tokens)), mask)
    if route_mask:
        inputs += (torch.rand(batch, tokens) < 0.6,)
    if tasks:
        inputs += (torch.randint(0, tasks, (batch,)),)
    return inputs


def largest_difference(served, reference: torch.nn.Module, **batch_options) -> float:
    """The largest difference, over :data:`CHECKS`, between ``served`` and the eager ``reference`` (a ``ServeTask``
    or ``ServeTaskIds``) on :func:`padded_batch` inputs, at the tokens the attention mask keeps (a padded query
    attends to nothing, and each runtime fills it its own way)."""
    differences = []
    for batch, tokens in CHECKS:
        inputs = padded_batch(batch, tokens, reference.model.config.vocab_size, **batch_options)
        with torch.no_grad():
            want = reference(*inputs)
        differences.append((torch.as_tensor(served(*inputs)) - want)[inputs[1].bool()].abs().max().item())
    return max(differences)


def export_task_ids(routed: torch.nn.Module) -> torch.export.ExportedProgram:
    """A program of ``routed`` that takes a task id per row (:class:`ServeTaskIds`), for every batch, length and mix
    of tasks (a task absent from a batch included)."""
    tasks = len(modpass.routing_plan_of(routed).tasks)
    example_inputs = padded_batch(4, 64, routed.config.vocab_size, tasks=tasks)
    return torch.export.export(ServeTaskIds(routed), example_inputs, dynamic_shapes=(AUTO, AUTO, {0: AUTO[0]}),
                               strict=False)


def export_onnx(routed: torch.nn.Module, task: str, path: Path, *, route_mask: bool = False) -> Path:
    """Write ``task``'s program as an ONNX model; modpass routes with ONNX's TopK while exporting (ONNX has no stable
    sort). Needs torch >= 2.8, whose exporter tells models it is exporting."""
    example_inputs = padded_batch(2, 64, routed.config.vocab_size, route_mask=route_mask)
    names = ["input_ids", "attention_mask", "route_mask"][: len(example_inputs)]
    program = torch.onnx.export(ServeTask(routed, task), example_inputs, dynamo=True,
                                dynamic_shapes=(AUTO,) * len(example_inputs), input_names=names, output_names=["logits"])
    program.save(str(path))
    return path


def onnx_runtime(path: Path):
    """``path``'s model in an ONNX Runtime session, called as the exported module is."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path))
    names = [given.name for given in session.get_inputs()]
    return lambda *inputs: session.run(None, {name: given.numpy() for name, given in zip(names, inputs)})[0]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-aoti", action="store_true", help="skip the AOTInductor package (about a minute)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    routed = modpass.transform(LlamaForCausalLM(config).eval(), {"t2i": 0.5, "mmu": 0.25}, layers="every_other")
    for name, parameter in routed.named_parameters():  # as if trained: zero routers would keep the first tokens
        if "mod_routers" in name:
            parameter.data.normal_()
    differences = {}
    with tempfile.TemporaryDirectory() as directory:
        if not args.skip_aoti:
            # One program for both tasks: each row runs the routed layers at its task's capacity, with its router.
            exported = export_task_ids(routed)
            print("exported the mixed-task program; lengths and batches it takes:", exported.range_constraints)
            start = time.perf_counter()
            package = torch._inductor.aoti_compile_and_package(exported, package_path=str(Path(directory) / "mixed.pt2"))
            print(f"AOTInductor package in {time.perf_counter() - start:.0f} s")
            differences["aoti"] = largest_difference(torch._inductor.aoti_load_package(package), ServeTaskIds(routed),
                                                     tasks=2)
        start = time.perf_counter()
        path = export_onnx(routed, "mmu", Path(directory) / "mmu.onnx", route_mask=True)
        print(f"ONNX model of mmu with a route mask in {time.perf_counter() - start:.0f} s")
        differences["onnx"] = largest_difference(onnx_runtime(path), ServeTask(routed, "mmu"), route_mask=True)
    for served, difference in differences.items():
        print(f"{served}: served vs eager routed logits at {CHECKS} (batch, length), max diff {difference:.2e}")
    return differences


if __name__ == "__main__":
    main()
