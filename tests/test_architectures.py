"""More Hugging Face architectures, with no code of their own in modpass: blocks found, routed, equal to dense.

Causal LMs get a second check at capacity 0.5: zero routers pick each block's first k tokens, which
under causal attention see only selected tokens, so those k positions must come out exactly as in
the dense model (sliding windows, soft-capping, parallel attention and MLP, sparse MoE included).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch._dynamo

import modpass
from tests import models
from tests.test_backend import dynamo_compiles_transformers
from tests.test_equivalence import close_to_dense
from tests.test_kv_cache import cache_of, decode_and_compare

SIZES = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)


def configured(config: str, model: str, **arguments):
    def build():
        import transformers

        return getattr(transformers, model)(getattr(transformers, config)(**arguments)).eval()

    return build


def causal_lm(config: str, model: str, **overrides):
    return configured(config, model, **{**SIZES, **overrides})


def mrope_text_model(prefix: str):
    """A Qwen-VL language model (no vision tower): rotary positions in three sections (time, height, width)."""
    return configured(f"{prefix}TextConfig", f"{prefix}TextModel", **SIZES, num_key_value_heads=2,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 2, 2]})


ARCHITECTURES = {
    "qwen2": causal_lm("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2),
    "qwen3": causal_lm("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=12),
    "mistral-sliding-window": causal_lm("MistralConfig", "MistralForCausalLM", num_key_value_heads=2, sliding_window=8),
    "gemma2-soft-capping": lambda: models.gemma2(layers=2),
    "gemma3": causal_lm("Gemma3TextConfig", "Gemma3ForCausalLM", num_key_value_heads=2, head_dim=12, sliding_window=8),
    "phi3": causal_lm("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2, pad_token_id=0, eos_token_id=0, bos_token_id=0),
    "gpt-neox-parallel": causal_lm("GPTNeoXConfig", "GPTNeoXForCausalLM", use_parallel_residual=True),
    "falcon": causal_lm("FalconConfig", "FalconForCausalLM", new_decoder_architecture=True, num_kv_heads=2),
    "opt": causal_lm("OPTConfig", "OPTForCausalLM", ffn_dim=96, word_embed_proj_dim=48),
    "mixtral-moe": lambda: models.mixtral(layers=2),
    "qwen3-moe": causal_lm("Qwen3MoeConfig", "Qwen3MoeForCausalLM", num_key_value_heads=2, head_dim=12, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=32, experts_implementation="batched_mm"),
    "deepseek-v3-mla-moe": causal_lm("DeepseekV3Config", "DeepseekV3ForCausalLM", num_key_value_heads=4, moe_intermediate_size=32,
                                     n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                     first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4,
                                     qk_nope_head_dim=8, v_head_dim=12, head_dim=4, bos_token_id=0, eos_token_id=0,
                                     experts_implementation="batched_mm"),
    "gpt-oss-sinks": causal_lm("GptOssConfig", "GptOssForCausalLM", num_key_value_heads=2, head_dim=12, num_local_experts=4,
                               num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                               experts_implementation="batched_mm"),
    "gpt-j-parallel": configured("GPTJConfig", "GPTJForCausalLM", vocab_size=97, n_embd=48, n_layer=2, n_head=4, rotary_dim=4,
                                 n_positions=128, bos_token_id=0, eos_token_id=0),
    "gpt-bigcode-multi-query": configured("GPTBigCodeConfig", "GPTBigCodeForCausalLM", vocab_size=97, n_embd=48, n_layer=2,
                                          n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0),
    "stablelm-partial-rotary": causal_lm("StableLmConfig", "StableLmForCausalLM", num_key_value_heads=2, bos_token_id=0,
                                         eos_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                          "partial_rotary_factor": 0.5}),
    "granite-multipliers": causal_lm("GraniteConfig", "GraniteForCausalLM", num_key_value_heads=2, residual_multiplier=0.5,
                                     embedding_multiplier=2.0, attention_multiplier=0.1, logits_scaling=2.0, bos_token_id=0,
                                     eos_token_id=0),
    "qwen2-vl-text-mrope": mrope_text_model("Qwen2VL"),
    # Early-fusion unified models (UniMoD's setting): image tokens share the language model's sequence.
    "emu3-text": causal_lm("Emu3TextConfig", "Emu3ForCausalLM", num_key_value_heads=2, pad_token_id=0, bos_token_id=0,
                           eos_token_id=0),
    "chameleon-qk-norm": causal_lm("ChameleonConfig", "ChameleonForConditionalGeneration", num_key_value_heads=2,
                                   pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                   vocabulary_map={"<image>": 79, **{f"IMGIMG{chr(65 + i)}Z": 80 + i for i in range(8)}},
                                   vq_config=dict(embed_dim=4, num_embeddings=8, latent_channels=4, resolution=8,
                                                  base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                                                  attn_resolutions=[])),
}

# Run by hand (MODPASS_MORE_ARCHITECTURES=1, about a minute on 2 cores): the same checks on architectures whose
# blocks are made of parts the list above covers. Passed on 2026-12-05 (torch 2.13, transformers 5.25).
MORE_ARCHITECTURES = {
    "phi": causal_lm("PhiConfig", "PhiForCausalLM", bos_token_id=0, eos_token_id=0),
    "cohere": causal_lm("CohereConfig", "CohereForCausalLM", num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    "starcoder2": causal_lm("Starcoder2Config", "Starcoder2ForCausalLM", num_key_value_heads=2, bos_token_id=0, eos_token_id=0),
    "olmo": causal_lm("OlmoConfig", "OlmoForCausalLM", num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    "olmo2": causal_lm("Olmo2Config", "Olmo2ForCausalLM", num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    "glm": causal_lm("GlmConfig", "GlmForCausalLM", num_key_value_heads=2, head_dim=12, pad_token_id=0, bos_token_id=0,
                     eos_token_id=0),
    "xglm": configured("XGLMConfig", "XGLMForCausalLM", vocab_size=97, d_model=48, ffn_dim=96, num_layers=2, attention_heads=4,
                       max_position_embeddings=128),
    "codegen": configured("CodeGenConfig", "CodeGenForCausalLM", vocab_size=97, n_embd=48, n_layer=2, n_head=4, rotary_dim=4,
                          n_positions=128, n_ctx=128, bos_token_id=0, eos_token_id=0),
    "qwen2.5-vl-text-mrope": mrope_text_model("Qwen2_5_VL"),
}
more_architectures = pytest.mark.skipif(not os.environ.get("MODPASS_MORE_ARCHITECTURES"),
                                        reason="about a minute on 2 cores: set MODPASS_MORE_ARCHITECTURES=1")
ALL_ARCHITECTURES = {**ARCHITECTURES, **MORE_ARCHITECTURES}


def transformers_before(release: str) -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) < Version(release)


# Architectures whose blocks an older transformers wrote otherwise: (the first release checked to route, why not before).
ROUTES_FROM = {
    "gpt-j-parallel": ("5.25", "GPT-J's blocks return their attention weights in transformers 5.17 (checked 2026-12-05), "
                               "which modpass refuses, as it refuses MPT's"),
    "codegen": ("5.25", "CodeGen's blocks return their attention weights in transformers 5.17 (checked 2026-12-05), "
                        "as GPT-J's do"),
}


def case(name: str):
    marks = [] if name in ARCHITECTURES else [more_architectures]
    if name in ROUTES_FROM:
        release, why = ROUTES_FROM[name]
        marks.append(pytest.mark.skipif(transformers_before(release), reason=why))
    return pytest.param(name, marks=marks)


CASES = [case(name) for name in sorted(ALL_ARCHITECTURES)]


def final_states(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """A causal LM's logits, or the last hidden state of a bare language model."""
    out = model(input_ids=ids, **kwargs)
    return out.logits if "logits" in out else out.last_hidden_state


@pytest.mark.parametrize("name", CASES)
def test_routed_causal_lm_equals_dense_at_full_capacity_and_on_the_selected_prefix(name):
    torch.manual_seed(0)
    dense = ALL_ARCHITECTURES[name]()
    ids = torch.randint(1, 97, (2, 14))
    with torch.no_grad():
        want = final_states(dense, ids, use_cache=False)
        close_to_dense(final_states(modpass.transform(dense, 1.0, layers="all"), ids), want)
        got = final_states(modpass.transform(dense, 0.5, layers="all"), ids)
    close_to_dense(got[:, :7], want[:, :7])
    assert not torch.allclose(got[:, 7:], want[:, 7:], atol=1e-3), "the other tokens skipped the blocks"


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", CASES)
def test_routed_causal_lm_decodes_with_a_kv_cache_as_the_uncached_model(name, cache):
    torch.manual_seed(0)
    routed = models.randomise_routers(modpass.transform(ALL_ARCHITECTURES[name](), 0.5), std=0.5)
    prompt = torch.randint(3, 60, (2, 11))  # longer than the sliding windows (8) of Mistral, Gemma 2 and 3, GPT-OSS
    padding = torch.ones_like(prompt)
    padding[1, :3] = 0
    if cache == "static":
        from transformers import StaticCache

        cache = StaticCache(config=routed.config, max_cache_len=16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the cached generation's "not causal" note
        decode_and_compare(routed, prompt, padding, steps=2, cache=None if cache == "dynamic" else cache)


@pytest.mark.skipif(not os.environ.get("MODPASS_ARCHITECTURE_COMPILE"), reason="about 3 minutes on 2 cores: set MODPASS_ARCHITECTURE_COMPILE=1")
@pytest.mark.parametrize("name", [case(name) for name in sorted(ARCHITECTURES)])
def test_routed_causal_lm_compiles_fullgraph_and_the_options_path_equals_transform(name):
    dense = ARCHITECTURES[name]()
    ids = torch.randint(1, 97, (2, 14))
    torch._dynamo.reset()
    with torch.no_grad():
        routed = modpass.transform(dense, 0.5, layers="all")
        compiled = final_states(torch.compile(routed, backend="modpass", fullgraph=True), ids)
        torch.testing.assert_close(compiled, final_states(routed, ids), rtol=1e-4, atol=1e-4)
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the identity-gated routers' warning
            served = torch.compile(dense, backend="modpass", dynamic=True, options={"ratios": 0.5, "layers": "all"})
            torch.testing.assert_close(final_states(served, ids, use_cache=False), compiled, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_routed_bert_encoder_equals_dense_at_full_capacity():
    from transformers import BertConfig, BertModel

    dense = BertModel(BertConfig(**SIZES)).eval()
    ids = torch.randint(1, 97, (2, 14))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    with torch.no_grad():
        want = dense(input_ids=ids, attention_mask=mask).last_hidden_state
        got = modpass.transform(dense, 1.0, layers="all")(input_ids=ids, attention_mask=mask).last_hidden_state
    close_to_dense(got[mask.bool()], want[mask.bool()])


def tiny_llava(text_layers: int = 2):
    """A Llava with a 3-layer CLIP tower and a Llama, and inputs of one 16-patch image between text tokens (image token 5)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                        num_attention_heads=4, image_size=16, patch_size=4, projection_dim=32),
                         text_config=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
                                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
                         image_token_index=5, vision_feature_layer=2)
    ids = torch.cat([torch.randint(10, 60, (2, 3)), torch.full((2, 16), 5), torch.randint(10, 60, (2, 4))], 1)
    return LlavaForConditionalGeneration(config).eval(), {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16)}


def test_llava_reads_a_routed_vision_layers_hidden_state_by_index():
    """Llava takes the vision tower's hidden states at vision_feature_layer, which transformers records with hooks on
    the layer class: a routed layer must be recorded too, or the index reads another layer (silently, before the fix)."""
    dense, inputs = tiny_llava()
    with torch.no_grad():
        want = dense(**inputs, output_hidden_states=True)  # transformers hooks the dense model's layers here
        routed = modpass.transform(dense, 1.0, example_inputs=inputs)
        assert any(".vision_tower." in path for path in modpass.routed_blocks(routed)), "the default layers route the vision tower"
        got = routed(**inputs, output_hidden_states=True)
        close_to_dense(got.logits, want.logits)
        assert len(got.hidden_states) == len(want.hidden_states)
        for g, w in zip(got.hidden_states, want.hidden_states):
            close_to_dense(g, w)


def test_llava_generates_with_a_cache_that_keeps_only_the_image_tokens_its_routed_layers_select():
    """p-MoD's and UniMoD's setting: the language model's layers route the prompt's image tokens only."""
    dense, inputs = tiny_llava(text_layers=4)
    is_image = inputs["input_ids"] == 5
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        routed = models.randomise_routers(modpass.transform(dense, 0.25, within="model.language_model", example_inputs=inputs), std=0.5)
        with modpass.default_task(routed, route_mask=is_image):
            cached = routed.generate(**inputs, use_cache=True, return_dict_in_generate=True, **greedy)
            torch.testing.assert_close(cached.sequences, routed.generate(**inputs, use_cache=False, **greedy), rtol=0, atol=0)
    cache = cache_of(cached)
    # 23 prompt tokens: a routed layer keeps 4 of the 16 image tokens and the 7 text tokens, then the 3 fed back.
    assert [layer.keys.shape[-2] for layer in cache.layers] == [26, 14, 26, 14]


def test_modernbert_picks_each_routed_layers_mask_by_the_layers_attention_type():
    """ModernBERT's encoder reads layer.attention_type (sliding or full) to choose each layer's mask."""
    from transformers import ModernBertConfig, ModernBertModel

    dense = ModernBertModel(ModernBertConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                             num_attention_heads=4, global_attn_every_n_layers=2, local_attention=8,
                                             pad_token_id=0, cls_token_id=1, sep_token_id=2, bos_token_id=1,
                                             eos_token_id=2)).eval()
    ids = torch.randint(3, 97, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    with torch.no_grad():
        want = dense(input_ids=ids, attention_mask=mask).last_hidden_state
        routed = modpass.transform(dense, 1.0, layers="all", example_inputs={"input_ids": ids, "attention_mask": mask})
        got = routed(input_ids=ids, attention_mask=mask).last_hidden_state
    assert {b.attention_type for b in modpass.routed_blocks(routed).values()} == {"full_attention", "sliding_attention"}
    close_to_dense(got[mask.bool()], want[mask.bool()])


@pytest.mark.parametrize("shared_bias", [False, True], ids=["absolute positions", "shared relative bias"])
def test_beit_routes_though_its_layers_take_the_image_size(shared_bias):
    """BEiT hands every layer ``resolution=pixel_values.shape[2:]``: symbolic sizes when captured, a constant per
    image size for the routed blocks. With a shared relative bias, each layer takes the bias as its mask."""
    from transformers import BeitConfig, BeitModel

    torch.manual_seed(0)
    dense = BeitModel(BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=32, patch_size=8, use_shared_relative_position_bias=shared_bias)).eval()
    with torch.no_grad():
        for table in (p for p in dense.parameters() if not p.any()):  # zero-initialised bias tables would hide a wrong gather
            table.normal_()
        routed = modpass.transform(dense, 1.0, layers="all")
        for size in (32, 48):  # 48: another image size, so other constants for the blocks
            pixels = torch.randn(2, 3, size, size)
            want = dense(pixels, interpolate_pos_encoding=True).last_hidden_state
            close_to_dense(routed(pixels, interpolate_pos_encoding=True).last_hidden_state, want)
        if dynamo_compiles_transformers():  # not on torch 2.6
            compiled = torch.compile(modpass.transform(dense, 0.5, layers="all"), backend="eager", fullgraph=True)
            pixels = torch.randn(2, 3, 32, 32)
            torch.testing.assert_close(compiled(pixels).last_hidden_state, compiled._orig_mod(pixels).last_hidden_state)


def test_t5_encoder_routes_the_layers_that_hand_on_its_position_bias():
    """T5's first layer computes the relative position bias and returns it; every later layer takes it in and returns
    it unchanged (an output modpass passes through whole), so all layers but the first route."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    dense = T5EncoderModel(T5Config(vocab_size=97, d_model=48, d_kv=12, d_ff=96, num_layers=3, num_heads=4,
                                    relative_attention_num_buckets=8, relative_attention_max_distance=16)).eval()
    ids = torch.randint(1, 97, (2, 14))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    real = mask.bool()
    with pytest.raises(modpass.UnroutableBlockError, match=r"encoder.block.0.*output 1 .* computed by the block"):
        modpass.transform(dense, 0.5, layers=[0])
    with torch.no_grad():
        want = dense(input_ids=ids, attention_mask=mask).last_hidden_state
        full = modpass.transform(dense, {"a": 1.0, "b": 1.0}, layers=[1, 2])
        for task in ("a", ["a", "b"]):  # the whole batch, and one group per task
            close_to_dense(full(input_ids=ids, attention_mask=mask, task=task).last_hidden_state[real], want[real])
        # At 0.5 zero routers pick each row's first 7 tokens, which see only each other in blocks 1 and 2.
        got = modpass.transform(dense, 0.5, layers=[1, 2])(input_ids=ids).last_hidden_state
        for block in dense.encoder.block[1:]:
            block.forward = on_the_first_tokens(7, block.forward)
        close_to_dense(got, dense(input_ids=ids).last_hidden_state)


def test_an_encoder_decoder_routes_either_stack_with_within():
    """BART's decoder blocks attend causally to their own tokens and across to the encoder's, another sequence whose
    states are never gathered: zero routers pick the first k decoder tokens, which must equal the dense model's."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    dense = BartForConditionalGeneration(BartConfig(vocab_size=97, d_model=48, encoder_layers=2, decoder_layers=2,
                                                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                                                    decoder_ffn_dim=96, max_position_embeddings=64)).eval()
    inputs = dict(input_ids=torch.randint(3, 97, (2, 12)), decoder_input_ids=torch.randint(3, 97, (2, 9)), use_cache=False)
    with torch.no_grad():
        want = dense(**inputs).logits
        for within in ("model.encoder", "model.decoder"):
            full = modpass.transform(dense, 1.0, layers="all", within=within, example_inputs=inputs)
            assert [b.path for b in modpass.routing_plan_of(full).blocks] == [f"{within}.layers.{i}" for i in range(2)]
            close_to_dense(full(**inputs).logits, want)
        half = modpass.transform(dense, 0.5, layers="all", within="model.decoder", example_inputs=inputs)
        close_to_dense(half(**inputs).logits[:, :5], want[:, :5])


def on_the_first_tokens(k: int, forward):
    """A T5 block that runs on the first ``k`` tokens only (their slice of the position bias); the rest skip it."""

    def run(hidden, attention_mask, position_bias, *rest, **kwargs):
        out, _, cross_bias = forward(hidden[:, :k], attention_mask, position_bias[..., :k, :k], *rest, **kwargs)
        return torch.cat([out, hidden[:, k:]], 1), position_bias, cross_bias

    return run


@pytest.mark.parametrize(
    "experts, refusal, where",
    # grouped_mm: one sort of every token's expert ids, then rows by group (a block refused);
    # eager: a Python loop over the experts present (the model does not export).
    [("grouped_mm", modpass.UnroutableBlockError, "model.layers.0"), ("eager", modpass.CaptureError, "modeling_mixtral.py")],
)
def test_sparse_moe_blocks_that_dispatch_the_batch_together_are_refused_with_the_setting_that_routes(experts, refusal, where):
    with pytest.raises(refusal, match=where) as refused:
        modpass.transform(models.mixtral(layers=2, experts=experts), 0.5, layers="all")
    assert f"The experts here use transformers' '{experts}' dispatch" in str(refused.value)
    assert "model.set_experts_implementation('batched_mm')" in str(refused.value)
