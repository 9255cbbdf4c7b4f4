"""Small models for the tests, built from configs with random weights (no downloads)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import modpass


class NanoBlock(nn.Module):
    """A nanoGPT block: pre-norm causal attention and MLP, fused qkv projection; ``causal=False``: an encoder's block,
    attending both ways without a mask."""

    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.ln_1 = nn.LayerNorm(width)
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x, is_causal=self.causal)

    def mix(self, x: torch.Tensor, **attention) -> torch.Tensor:
        x = x + self.attend(x, **attention)
        return x + self.mlp(self.ln_2(x))

    def attend(self, x: torch.Tensor, **attention) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, **attention)
        return self.c_proj(y.transpose(1, 2).reshape(batch, tokens, width))


class NanoGPT(nn.Module):
    block_class = NanoBlock

    def __init__(self, vocab: int = 61, width: int = 32, layers: int = 4, heads: int = 4, block_size: int = 64,
                 causal: bool = True):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(block_size, width)
        self.h = nn.ModuleList(self.block_class(width, heads, causal) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))


class NormedEmbeddingGPT(NanoGPT):
    """Batch norm and dropout over the embeddings, outside the blocks: a forward in training mode updates the norm's
    running statistics and draws from the random stream."""

    def __init__(self):
        super().__init__(layers=2)
        self.norm = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.1)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(super().embed(idx).transpose(1, 2)).transpose(1, 2))


class InPlaceBlock(NanoBlock):
    """The nanoGPT block adding its updates into its hidden state in place (``x += ...``), as inference code may."""

    def mix(self, x: torch.Tensor, **attention) -> torch.Tensor:
        x += self.attend(x, **attention)
        x += self.mlp(self.ln_2(x))
        return x


class InPlaceGPT(NanoGPT):
    block_class = InPlaceBlock


class ModeRegionBlock(NanoBlock):
    """The nanoGPT block attending in float32 with autocast off, as models guard their softmax, and scaling its
    attention's output by a per-token factor taken without gradient: export keeps both regions as subgraphs."""

    def attend(self, x: torch.Tensor, **attention) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            y = super().attend(x.float(), **attention)
        with torch.no_grad():
            scale = y.pow(2).mean(-1, keepdim=True).add(1).rsqrt()
        return y * scale


class ModeRegionGPT(NanoGPT):
    block_class = ModeRegionBlock


class BiasBlock(NanoBlock):
    """Attends under an additive ``(B, 1, T, T)`` bias and returns it for the next block, as T5's layers hand on
    their position bias."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mix(x, attn_mask=bias), bias


class BiasGPT(NanoGPT):
    """nanoGPT whose blocks share one causal ALiBi-style bias, its slope set by each sequence's first token."""

    block_class = BiasBlock

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        positions = torch.arange(idx.shape[1], device=idx.device)
        distance = (positions.unsqueeze(1) - positions).to(x.dtype)
        slope = idx[:, :1, None, None].to(x.dtype) / self.wte.num_embeddings
        bias = torch.where(distance >= 0, -slope * distance, torch.finfo(x.dtype).min)
        for block in self.h:
            x, bias = block(x, bias)
        return self.lm_head(self.ln_f(x))


class ConditionedBlock(NanoBlock):
    """Reads a per-sequence conditioning vector ``(B, D)`` and hands a new one to the next block, as DiT-style
    blocks hand on their modulation."""

    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__(width, heads, causal)
        self.condition = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mix(x + c[:, None], is_causal=self.causal), torch.tanh(self.condition(c))


class ConditionedGPT(NanoGPT):
    """nanoGPT conditioned on each sequence's first token through a vector its blocks update."""

    block_class = ConditionedBlock

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        c = self.wte(idx[:, 0])
        for block in self.h:
            x, c, *_ = block(x, c)
        return self.lm_head(self.ln_f(x + c[:, None]))


class HeadRepeatedMaskBlock(NanoBlock):
    """Attends under a ``(B, 1, T)`` key bias that it repeats per head and views back by the hidden state's batch, as
    diffusers' attention prepares its mask: export then ties the bias's batch to the hidden state's only by guards."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        mask = bias.repeat_interleave(self.heads, dim=0).view(x.shape[0], self.heads, -1, bias.shape[-1])
        return self.mix(x, attn_mask=mask)


class KeyPaddingGPT(NanoGPT):
    """A bidirectional nanoGPT whose blocks ignore the keys that ``keep`` marks as padding."""

    block_class = HeadRepeatedMaskBlock

    def forward(self, idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        bias = (1.0 - keep[:, None, :].to(x.dtype)) * -10000.0
        for block in self.h:
            x = block(x, bias)
        return self.lm_head(self.ln_f(x))


class LoopedGPT(NanoGPT):
    """Runs its blocks twice over, as looped (recurrent-depth) transformers reuse their layers."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for _ in range(2):
            for block in self.h:
                x = block(x)
        return self.lm_head(self.ln_f(x))


class PrefixVisionGPT(NanoGPT):
    """A vision encoder over image patches whose states come before the text, as unified models (Janus, LLaVA) put an
    image before the prompt: two block stacks, ``vision`` (bidirectional, over patches) and ``h`` (causal, over
    patches plus text)."""

    def __init__(self, patch_features: int = 12, vision_layers: int = 3, width: int = 32, heads: int = 4, **kwargs):
        super().__init__(width=width, heads=heads, **kwargs)
        self.patch_embed = nn.Linear(patch_features, width)
        self.vision = nn.ModuleList(NanoBlock(width, heads, causal=False) for _ in range(vision_layers))

    def forward(self, idx: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        image = self.patch_embed(patches)
        for block in self.vision:
            image = block(image)
        x = torch.cat([image, self.embed(idx)], dim=1)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def prefix_vision_gpt() -> tuple[PrefixVisionGPT, dict[str, torch.Tensor]]:
    """Three vision blocks over 6 patches, then four language blocks over the patches and 10 tokens; and its inputs."""
    torch.manual_seed(0)
    return PrefixVisionGPT().eval(), {"idx": torch.randint(0, 61, (2, 10)), "patches": torch.randn(2, 6, 12)}


def llama(layers: int = 4, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def enable_checkpointing(model, **checkpoint_settings) -> None:
    """Hugging Face's activation checkpointing, by its transformers >= 5.25 name where it has it (the old one is
    deprecated); ``checkpoint_settings`` go to ``torch.utils.checkpoint.checkpoint`` (``use_reentrant=``)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(checkpoint_settings or None)


def gpt2(layers: int = 4):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=layers, n_embd=48, n_head=4, vocab_size=97, n_positions=128, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def vit(layers: int = 4):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=48, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=96, image_size=32, patch_size=8)
    return ViTModel(config).eval()


def gemma2(layers: int = 4):
    """Eager attention (soft-capped scores, which SDPA cannot do; transformers 5.17 picks SDPA unless told) and sliding
    windows on every other layer."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=12, max_position_embeddings=128, sliding_window=8,
                          attn_implementation="eager")
    return Gemma2ForCausalLM(config).eval()


def mixtral(layers: int = 4, experts: str = "batched_mm"):
    """A sparse-MoE Llama. ``batched_mm`` dispatches each token to its experts row by row (provably token-wise);
    transformers' default ``grouped_mm`` sorts all tokens by expert, which modpass refuses."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2,
                           experts_implementation=experts)
    return MixtralForCausalLM(config).eval()


def randomise_routers(model: nn.Module, *, std: float = 1.0, seed: int | None = None, biases: bool = False) -> nn.Module:
    """Draw ``model``'s router weights (and biases, with ``biases=True``) from a normal distribution, in place, and return
    it: zero-initialised routers, as ``transform`` makes them, score every token alike, so selection would not depend
    on the tokens. ``seed`` draws from a generator of its own instead of the global one."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in modpass.routed_blocks(model).values():
            for router in block.mod_routers.values():
                router.weight.normal_(0.0, std, generator=generator)
                if biases:
                    router.bias.normal_(generator=generator)
    return model
