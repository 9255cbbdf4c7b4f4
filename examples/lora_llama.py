"""Fine-tune a routed Llama with LoRA (PEFT), its routers trained beside the adapter, then save and load both.

Run: python examples/lora_llama.py [--steps 200] [--out DIR]
(random weights from a config stand in for a pretrained model, synthetic data, no downloads; about
a minute on a 2-core CPU)

The recipe: ``modpass.transform`` first, then PEFT. LoRA goes on every projection, and the
routers stay out of it: routed calls read a router's weight and bias and never call the router,
so a LoRA layer on one would be left out (modpass refuses it). PEFT trains a copy of each router
instead (``modules_to_save``), which routed calls read. The task is copying: a sequence is a prompt
and the prompt again, the loss on the copy.

Saved: the adapter and router copies by PEFT (``save_pretrained``), the routing plan and the
routers by modpass (``modpass.save``). Loaded: ``modpass.load`` routes a fresh base model, and
PEFT puts the adapter on it; the example checks the loaded model against the trained one. For
serving, ``merge_and_unload()`` folds the adapter in and leaves plain routers holding the trained
copies: an ordinary routed model, for ``torch.compile(model, backend="modpass")``.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import modpass

PROMPT = 12
VOCAB = 48
CONFIG = LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=2 * PROMPT)


def base_model() -> LlamaForCausalLM:
    """The model to fine-tune: ``from_pretrained`` in practice; here the same random weights every time."""
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG)


def batch(size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids (a prompt, then the prompt again) and labels (the copy only)."""
    prompt = torch.randint(1, VOCAB, (size, PROMPT), generator=generator)
    ids = torch.cat([prompt, prompt], dim=1)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return ids, labels


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default=None, help="where to save the adapter and the routing (default: a temporary directory)")
    args = parser.parse_args(argv)

    routed = modpass.transform(base_model(), 0.5, aux_loss_weight=0.01)
    routers = [f"mod_routers.{task}" for task in modpass.routing_plan_of(routed).tasks]
    model = get_peft_model(routed, LoraConfig(r=8, target_modules="all-linear", exclude_modules=routers, modules_to_save=routers),
                           adapter_name="copying")
    model.print_trainable_parameters()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    model.train()
    losses = []
    progress = tqdm(range(args.steps), desc="LoRA fine-tuning", unit="step")
    for _ in progress:
        ids, labels = batch(args.batch, generator)
        loss = model(input_ids=ids, labels=labels).loss
        (loss + modpass.aux_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()

    ids, _ = batch(64, torch.Generator().manual_seed(2))
    with contextlib.ExitStack() as stack, torch.no_grad():
        out = Path(args.out or stack.enter_context(tempfile.TemporaryDirectory()))
        model.save_pretrained(out / "adapter")  # the LoRA weights and the router copies
        modpass.save(model, out / "routing")  # the plan, and the routers that routed calls read
        served = PeftModel.from_pretrained(modpass.load(base_model(), out / "routing"), out / "adapter" / "copying",
                                           adapter_name="copying").eval()
        trained_logits = model(input_ids=ids).logits
        difference = (served(input_ids=ids).logits - trained_logits).abs().max().item()
        copied = (trained_logits[:, PROMPT - 1 : -1].argmax(-1) == ids[:, PROMPT:]).float().mean().item()
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; copy tokens predicted exactly: {copied:.1%}; "
          f"loaded model against the trained one: max difference {difference:.1e}")
    return {"first_loss": losses[0], "last_loss": losses[-1], "copied": copied, "loaded_difference": difference}


if __name__ == "__main__":
    main()
