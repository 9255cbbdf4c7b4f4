"""Choose blocks by attention rank, route a Hugging Face Llama with task-aware MoD, inspect it, save it, serve it compiled.

Run: python examples/route_llama.py   (random weights from a config; no downloads)
"""

from __future__ import annotations

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import modpass


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    # Where to route "text": UniMoD's rule, the half of the blocks with the lowest attention rank on its samples
    # (random weights give every block nearly full rank, (T - 1) / T, so here the tie goes to the first blocks).
    samples = [{"input_ids": torch.randint(0, 512, (4, 64))} for _ in range(2)]
    ranks = modpass.attention_rank(model, {"text": samples})
    print(ranks)
    routed = modpass.transform(
        model,
        {"text": ranks.ratios(fraction=0.5, ratio=0.5)["text"],
         "image": modpass.schedules.ShiftedCosine(dense_above=0.9, floor=0.2)},
        layers="all",
    )
    print(modpass.routing_plan_of(routed).to_json()[:400], "...")

    ids = torch.randint(0, 512, (2, 64))
    print(modpass.flops(routed, {"input_ids": ids}))
    with torch.no_grad():
        mixed = routed(input_ids=ids, task=["text", "image"]).logits
    print("mixed-task batch logits:", tuple(mixed.shape))

    with tempfile.TemporaryDirectory() as directory:
        modpass.save(routed, directory)
        served = torch.compile(model, backend="modpass", dynamic=True, options={"plan": directory, "task": "text"})
        with torch.no_grad():
            compiled = served(input_ids=ids, use_cache=False).logits
            eager = routed(input_ids=ids, task="text").logits
    print("stock model + saved routers, compiled, vs routed eager: max diff", (compiled - eager).abs().max().item())


if __name__ == "__main__":
    main()
