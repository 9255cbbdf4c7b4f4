"""Route a Hugging Face Llama with task-aware MoD, inspect it, save it, serve it compiled.

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
    routed = modpass.transform(
        model,
        {"text": 0.5, "image": modpass.schedules.ShiftedCosine(dense_above=0.9, floor=0.2)},
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
