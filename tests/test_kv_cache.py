"""Cached generation through routed blocks (``modpass/kv_cache.py``).

The reference for every cached call is the uncached routed model on the whole
sequence so far, under a route mask that leaves the generated tokens outside
(they run every routed layer): the two compute the same thing.
"""

from __future__ import annotations

import copy
import gc
import inspect

import pytest
import torch
import transformers

import modpass
from modpass import kv_cache
from modpass.kv_cache import cache_keyword, cache_of
from tests import models
from tests.test_backend import compiled_graphs, dynamo_compiles_transformers, needs_hf_dynamo  # noqa: F401 (the marker reads it)

pytest.importorskip("transformers")


def cache_name() -> str:
    from transformers import LlamaModel

    return cache_keyword(LlamaModel)


def routed_llama(ratios=0.5, **kwargs):
    """A four-layer Llama with random routers."""
    attn = kwargs.pop("attn_implementation", "sdpa")
    return models.randomise_routers(modpass.transform(models.llama(attn_implementation=attn), ratios, **kwargs), std=0.5)


def last_states(output) -> torch.Tensor:
    """A causal LM's logits, or a base model's last hidden states."""
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def uncached_logits(routed, sequence, prompt_route_mask, attention_mask=None, **call):
    """The routed model on the whole sequence, its prompt routable as given and the rest outside the route mask."""
    generated = sequence.shape[1] - prompt_route_mask.shape[1]
    route_mask = torch.cat([prompt_route_mask, prompt_route_mask.new_zeros(sequence.shape[0], generated)], dim=1)
    return last_states(routed(input_ids=sequence, attention_mask=attention_mask, route_mask=route_mask, **call))


def decode_and_compare(routed, prompt, attention_mask=None, route_mask=None, steps=3, chunk=1, cache=None, **call):
    """Prefill with a cache (``cache``, or the model's DynamicCache), then feed ``steps`` chunks of ``chunk`` tokens;
    each call's logits against the uncached model."""
    prompt_route_mask = torch.ones_like(prompt, dtype=torch.bool) if route_mask is None else route_mask
    given = {} if route_mask is None else {"route_mask": route_mask}
    if cache is not None:
        call[cache_name()] = cache
    output = routed(input_ids=prompt, attention_mask=attention_mask, use_cache=True, **given, **call)
    cache = call.pop(cache_name(), None) or cache_of(output)
    want = uncached_logits(routed, prompt, prompt_route_mask, attention_mask, **call)
    # Not at padding: a padding query sees no key, and what attention makes of that depends on the cache's length.
    real = slice(None) if attention_mask is None else attention_mask.bool()
    torch.testing.assert_close(last_states(output)[real], want[real], rtol=0, atol=1e-5)
    sequence = prompt
    for _ in range(steps):
        new = torch.randint(1, 97, (prompt.shape[0], chunk), device=prompt.device)
        sequence = torch.cat([sequence, new], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(new)], dim=1)
        output = routed(input_ids=new, attention_mask=attention_mask, use_cache=True, **{cache_name(): cache}, **given, **call)
        want = uncached_logits(routed, sequence, prompt_route_mask, attention_mask, **call)[:, -chunk:]
        torch.testing.assert_close(last_states(output), want, rtol=0, atol=1e-5)
    return cache


def with_layers_writing_in_place(model):
    """A Llama whose layers add their updates into their hidden state in place (``x += ...``), with the same weights."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class InPlaceLayer(LlamaDecoderLayer):
        def forward(self, hidden_states, attention_mask=None, **kwargs):
            attention, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask, **kwargs)
            hidden_states += attention
            hidden_states += self.mlp(self.post_attention_layernorm(hidden_states))
            return hidden_states

    for layer in model.model.layers:
        layer.__class__ = InPlaceLayer
    return model


def test_a_layer_that_writes_its_hidden_state_in_place_decodes_as_the_same_layer_out_of_place():
    """With a cache, a routed layer runs its own forward on the prompt's selected tokens and on each generated token,
    then reads them again for the gated update: it gives the layer a copy to write."""
    torch.manual_seed(0)
    dense = models.llama()
    twin = with_layers_writing_in_place(copy.deepcopy(dense))
    plain, in_place = (models.randomise_routers(modpass.transform(m, 0.5), std=0.5, seed=0) for m in (dense, twin))
    prompt = torch.randint(1, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(in_place(input_ids=prompt).logits, plain(input_ids=prompt).logits, rtol=0, atol=1e-5)
        decode_and_compare(in_place, prompt, steps=2)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("gate", ["tanh", "string"])
def test_cached_decoding_equals_the_uncached_model_with_the_prompt_routed(attn_implementation, gate):
    routed = routed_llama(gate=gate, attn_implementation=attn_implementation)
    prompt = torch.randint(1, 97, (3, 11))
    padding = torch.ones_like(prompt)
    padding[1, :4] = 0
    padding[2, :9] = 0  # fewer real tokens than the capacity: padding is selected, and must stay unseen
    with torch.no_grad():
        cache = decode_and_compare(routed, prompt, padding)
        # Every routed layer cached its k prompt tokens and each generated one; dense layers cache every token.
        assert [layer.keys.shape[-2] for layer in cache.layers] == [14, 9, 14, 9]
        decode_and_compare(routed, prompt, padding, chunk=3)  # several new tokens at once: a causal mask over them
        decode_and_compare(routed, prompt, chunk=2)  # no mask at all (SDPA's causal shortcut)


def test_generate_with_a_cache_follows_the_uncached_greedy_loop():
    routed = routed_llama()
    prompt = torch.randint(1, 97, (2, 10))
    with torch.no_grad(), pytest.warns(UserWarning, match="not causal"):
        generated = routed.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    sequence = prompt
    with torch.no_grad():
        for _ in range(5):
            logits = uncached_logits(routed, sequence, torch.ones_like(prompt, dtype=torch.bool))
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    torch.testing.assert_close(generated, sequence, rtol=0, atol=0)


def test_a_route_mask_on_the_prompt_routes_it_as_the_uncached_model_does():
    """UniMoD and p-MoD route the prompt's image tokens only: rows then keep different numbers of tokens."""
    routed = routed_llama({"t2i": 0.25, "mmu": 0.5})
    prompt = torch.randint(1, 97, (2, 12))
    is_image = torch.zeros_like(prompt, dtype=torch.bool)
    is_image[0, 2:10] = True
    is_image[1, 5:7] = True
    with torch.no_grad():
        cache = decode_and_compare(routed, prompt, route_mask=is_image, task="mmu")
        hidden = cache.layers[1].token_positions < 0  # extra slots of the row with fewer routable tokens, at -1 - position
        assert hidden.any() and (-1 - cache.layers[1].token_positions[hidden] < 12).all()
        # generate() takes the mask through default_task, which extends it over the generated tokens.
        greedy = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        with modpass.default_task(routed, "mmu", route_mask=is_image):
            cached = routed.generate(prompt, use_cache=True, **greedy)
            uncached = routed.generate(prompt, use_cache=False, **greedy)
        want = uncached_logits(routed, cached[:, :-1], is_image, task="mmu")[:, -3:].argmax(-1)
    torch.testing.assert_close(cached[:, -3:], want, rtol=0, atol=0)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)


@pytest.mark.parametrize("gate", ["sigmoid", "string"])
def test_a_mixed_task_batch_decodes_each_row_by_its_task(gate):
    """UniMoD serves tasks side by side: each row's router and capacity, one cache of the largest capacity's length."""
    routed = routed_llama({"t2i": 0.25, "mmu": [1.0, 1.0, 1.0, 0.5]}, gate=gate)  # mmu is dense at block 1
    prompt = torch.randint(1, 97, (3, 11))
    padding = torch.ones_like(prompt)
    padding[2, :4] = 0
    with torch.no_grad():
        cache = decode_and_compare(routed, prompt, padding, task=["t2i", "mmu", "mmu"])
        decode_and_compare(routed, prompt, padding, task=torch.tensor([1, 0, 1]), chunk=2)
    # Block 1 keeps 3 of t2i's tokens and all 11 of mmu's: the t2i row's 8 extra slots are hidden.
    assert (cache.layers[1].token_positions[0, :11] < 0).sum() == 8 and (cache.layers[1].token_positions[1:, :11] >= 0).all()


def test_a_task_dense_at_every_block_generates_as_the_dense_model():
    routed = routed_llama({"t2i": 0.25, "mmu": 1.0})
    prompt = torch.randint(1, 97, (2, 9))
    greedy = dict(max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        with modpass.default_task(routed, "mmu"):
            routed_tokens = routed.generate(prompt, **greedy)
        with modpass.dense(routed):
            torch.testing.assert_close(routed_tokens, routed.generate(prompt, **greedy), rtol=0, atol=0)
        decode_and_compare(routed, prompt, task="t2i")


def test_generated_tokens_are_no_targets_of_the_auxiliary_loss():
    """They run every routed layer as tokens outside a route mask do, and are recorded so."""
    routed = routed_llama(aux_loss_weight=1.0)
    prompt = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        cache = cache_of(routed(input_ids=prompt, use_cache=True))
        assert modpass.aux_loss(routed) > 0
        routed(input_ids=prompt[:, :1], use_cache=True, **{cache_name(): cache})
        assert modpass.aux_loss(routed) == 0


def test_beam_search_reorders_a_routed_layers_key_positions():
    routed = routed_llama()
    prompt = torch.randint(1, 97, (3, 11))
    with torch.no_grad():
        cache = cache_of(routed(input_ids=prompt, use_cache=True))
        order = torch.tensor([2, 0, 0])
        cache.reorder_cache(order)
        new = torch.tensor([[5], [6], [7]])
        got = routed(input_ids=new, use_cache=True, **{cache_name(): cache}).logits
        want = uncached_logits(routed, torch.cat([prompt[order], new], dim=1), torch.ones_like(prompt, dtype=torch.bool))
        torch.testing.assert_close(got[:, -1], want[:, -1], rtol=0, atol=1e-5)
        beams = routed.generate(prompt, max_new_tokens=3, num_beams=2, do_sample=False, use_cache=True, pad_token_id=0)
    assert beams.shape == (3, 14)


def test_a_default_task_and_route_mask_per_prompt_cover_its_beams_and_returned_sequences():
    """generate() repeats each prompt for its beams and returned sequences: a default task list, task ids or route mask
    with a row per prompt covers its repeats, and each prompt generates as it would alone; only the defaults repeat."""
    routed = routed_llama({"t2i": 0.25, "mmu": [1.0, 1.0, 1.0, 0.5]})
    prompt = torch.randint(1, 97, (2, 9))
    route_mask = torch.ones_like(prompt, dtype=torch.bool)
    route_mask[0, :3] = False
    route_mask[1, 5:] = False
    beams = dict(max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        alone = []
        for row, task in enumerate(["t2i", "mmu"]):
            with modpass.default_task(routed, task, route_mask=route_mask[row:row + 1]):
                alone.append(routed.generate(prompt[row:row + 1], **beams))
        for tasks in (["t2i", "mmu"], torch.tensor([0, 1])):
            with modpass.default_task(routed, tasks, route_mask=route_mask):
                torch.testing.assert_close(routed.generate(prompt, **beams), torch.cat(alone), rtol=0, atol=0)
        with pytest.raises(modpass.RoutingInputError, match="task lists 2 entries but the batch has 4"):
            routed(input_ids=prompt.repeat(2, 1), task=["t2i", "mmu"])
        with pytest.raises(modpass.RoutingInputError, match="task lists 2 entries but the batch has 3"), \
                modpass.default_task(routed, ["t2i", "mmu"]):
            routed(input_ids=prompt[:1].repeat(3, 1))


def test_cropping_generated_tokens_keeps_the_positions_and_cropping_the_prompt_is_refused():
    routed = routed_llama()
    prompt = torch.randint(1, 97, (2, 11))
    with torch.no_grad():
        cache = decode_and_compare(routed, prompt, steps=3)
        cache.crop(-2)
        assert [layer.keys.shape[-2] for layer in cache.layers] == [12, 7, 12, 7]
        got = routed(input_ids=torch.tensor([[3], [4]]), use_cache=True, **{cache_name(): cache}).logits
        assert cache.layers[1].tokens_seen == 13
        with pytest.raises(modpass.RoutingInputError, match="cut into the prompt"):
            cache.crop(-5)
        if kv_cache.positive_crops_refused():  # as transformers' own layers do, before anything changes
            kept = cache.layers[1].keys.shape[-2]
            with pytest.raises(modpass.RoutingInputError, match=r"crop\(12\): .*as a negative integer"):
                cache.layers[1].crop(12)
            assert cache.layers[1].keys.shape[-2] == kept
    assert got.shape == (2, 1, 97)


def test_cached_generation_refuses_what_it_cannot_route():
    prompt = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        routed = routed_llama()
        with pytest.raises(modpass.RoutingInputError, match="Assisted decoding"):
            routed.generate(prompt[:1], max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0,
                            assistant_model=models.llama(layers=1))
        # Gemma 2's eager attention (soft-capped scores) cannot hide the spare slots of rows of different capacities.
        gemma = modpass.transform(models.gemma2(), {"t2i": 0.25, "mmu": 0.5})
        with pytest.raises(modpass.RoutingInputError, match="keep different numbers of tokens"):
            gemma(input_ids=prompt, use_cache=True, task=["t2i", "mmu"])
        with pytest.raises(modpass.RoutingInputError, match="no room for a generated one"):
            routed(input_ids=prompt, use_cache=True, **{cache_name(): static_cache(routed, 9)})
        # An encoder-decoder's decoder caches its self- and cross-attention apart: said so, not "use transformers 5".
        t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=97, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, decoder_start_token_id=0)).eval()
        routed_decoder = modpass.transform(t5, 0.5, within="decoder", layers=[1],  # block 0 makes the position bias
                                           example_inputs={"input_ids": prompt, "decoder_input_ids": prompt[:, :4], "use_cache": False})
        with pytest.raises(modpass.RoutingInputError, match=r"got a EncoderDecoderCache\. An encoder-decoder model's decoder "
                           r"keeps two caches .* generate with use_cache=False"):
            routed_decoder.generate(prompt, decoder_input_ids=prompt[:, :3], max_new_tokens=2, do_sample=False, use_cache=True)
        every_layer = routed_llama(layers="all")  # a dense static layer fails first, with an IndexError of its own
        with pytest.raises(modpass.RoutingInputError, match="the static cache is full"):
            every_layer.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False,
                                 **{cache_name(): static_cache(every_layer, 16)})  # reruns the whole sequence into it


def llama_sharing_its_rotary_tables():
    """A Llama whose layers take rotary tables ``(T, d)`` shared by the batch, as litgpt's blocks do."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = models.llama()

    class SharedTablesLayer(LlamaDecoderLayer):
        def forward(self, hidden_states, position_embeddings=None, **kwargs):
            return super().forward(hidden_states, position_embeddings=tuple(t[None] for t in position_embeddings), **kwargs)

    class SharedTablesRotary(type(model.model.rotary_emb)):
        def forward(self, x, position_ids):
            return tuple(t[0] for t in super().forward(x, position_ids))

    for layer in model.model.layers:
        layer.__class__ = SharedTablesLayer
    model.model.rotary_emb.__class__ = SharedTablesRotary
    return model


def test_cached_prefill_refuses_a_block_that_reads_a_shared_table_by_position():
    """The routed graph reads such tables at the selected tokens' positions (token_tables); the cached prefill runs
    the block's own code on the selected tokens, which cannot."""
    prompt = torch.randint(1, 97, (2, 9))
    model = llama_sharing_its_rotary_tables()
    routed = modpass.transform(model, 0.5, example_inputs={"input_ids": prompt, "use_cache": False})
    with torch.no_grad():
        routed(input_ids=prompt, use_cache=False)
        with pytest.raises(modpass.RoutingInputError, match=r"reads a table the batch shares by token position .* use_cache=False"):
            routed(input_ids=prompt, use_cache=True)


def test_every_layer_routed_the_model_still_reads_the_sequence_length_from_its_cache():
    """Hugging Face models count new tokens' positions by layer 0's cache and size masks by the first full-attention
    layer's: a routed layer reports the sequence's length, not the number of keys it keeps."""
    prompt = torch.randint(1, 97, (2, 9))
    padding = torch.ones_like(prompt)
    padding[0, :2] = 0
    with torch.no_grad():
        cache = decode_and_compare(routed_llama(layers="all"), prompt, padding)
        assert cache.get_seq_length() == 12 and cache.layers[0].keys.shape[-2] == 5 + 3


def test_sliding_window_layers_keep_the_keys_of_their_window():
    """Gemma 2 alternates sliding-window (even, window 8) and full-attention (odd) layers; with every layer routed,
    layer 0 also sizes the model's sliding-window masks. A prompt longer than the window moves it past the prompt."""
    routed = models.randomise_routers(modpass.transform(models.gemma2(), 0.5, layers="all"), std=0.5)
    prompt = torch.randint(1, 97, (2, 13))
    padding = torch.ones_like(prompt)
    padding[1, :3] = 0
    with torch.no_grad():
        cache = decode_and_compare(routed, prompt, padding, steps=6)
        decode_and_compare(routed, prompt, chunk=3)
    sliding, full = cache.layers[0], cache.layers[1]
    assert sliding.is_sliding and not full.is_sliding and full.keys.shape[-2] == 7 + 6
    # Keys no query can reach any more are dropped, in every row at once; a row may keep one the window has left.
    assert sliding.keys.shape[-2] <= 8 and (sliding.token_positions[:, 1:] >= 19 - 8 + 1).all()


def static_cache(model, length: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_a_static_cache_decodes_as_the_dynamic_one_in_fewer_slots(attn_implementation):
    """A StaticCache's routed layer holds the prompt's kept tokens, then room for as many tokens as the dense layer's."""
    routed = routed_llama({"t2i": 0.25, "mmu": [1.0, 1.0, 1.0, 0.5]}, attn_implementation=attn_implementation)
    prompt = torch.randint(1, 97, (3, 11))
    padding = torch.ones_like(prompt)
    padding[2, :4] = 0
    with torch.no_grad():
        t2i = decode_and_compare(routed, prompt, padding, chunk=2, cache=static_cache(routed, 24), task="t2i")
    # Dense layers keep 24 keys, routed ones 3 of the prompt's 11 and room for the 13 tokens that may follow.
    assert [layer.keys.shape[-2] for layer in t2i.layers] == [24, 3 + 13, 24, 3 + 13]
    positions = t2i.layers[3].token_positions
    assert (positions[:, 3:9] == torch.arange(11, 17)).all() and (positions[:, 9:] < 0).all(), "then 6 generated, then free"
    assert int(t2i.get_seq_length()) == 17
    if attn_implementation == "eager":
        return  # attention written out by hand cannot hide the spare slots of rows that keep fewer tokens
    is_image = torch.zeros_like(prompt, dtype=torch.bool)
    is_image[:, 3:9] = True
    is_image[1, 3:6] = False
    with torch.no_grad():
        mixed = decode_and_compare(routed, prompt, padding, cache=static_cache(routed, 24), task=["t2i", "mmu", "mmu"])
        decode_and_compare(routed, prompt, route_mask=is_image, cache=static_cache(routed, 24), task="mmu")
    # Block 1 keeps all 11 of mmu's tokens (dense there), block 3 up to 6 per row.
    assert [layer.keys.shape[-2] for layer in mixed.layers] == [24, 11 + 13, 24, 6 + 13]
    beams = dict(max_new_tokens=4, do_sample=False, num_beams=3, use_cache=True, pad_token_id=0)
    with torch.no_grad(), modpass.default_task(routed, "t2i"):  # beam search reorders the static layers' positions
        torch.testing.assert_close(routed.generate(prompt, **{cache_name(): static_cache(routed, 16)}, **beams),
                                   routed.generate(prompt, **beams), rtol=0, atol=0)


@pytest.mark.skipif(not hasattr(__import__("transformers.cache_utils").cache_utils.StaticLayer, "crop"),
                    reason="transformers before 5.18 cannot crop a StaticCache")
def test_a_static_layer_crops_generated_tokens_and_a_reset_makes_it_dense_again():
    from transformers.cache_utils import StaticLayer

    routed = routed_llama()
    prompt, generated = torch.randint(1, 97, (2, 9)), torch.randint(1, 97, (2, 4))
    cache = static_cache(routed, 16)
    with torch.no_grad():
        routed(input_ids=prompt, use_cache=True, **{cache_name(): cache})
        for step in range(3):
            routed(input_ids=generated[:, step:step + 1], use_cache=True, **{cache_name(): cache})
        cache.crop(-2)
        assert int(cache.get_seq_length()) == 10 and int(cache.layers[1].cumulative_length) == 5 + 1
        output = routed(input_ids=generated[:, 3:], use_cache=True, **{cache_name(): cache})
        sequence = torch.cat([prompt, generated[:, :1], generated[:, 3:]], dim=1)
        want = uncached_logits(routed, sequence, torch.ones_like(prompt, dtype=torch.bool))[:, -1:]
        torch.testing.assert_close(output.logits, want, rtol=0, atol=1e-5)
        with pytest.raises(modpass.RoutingInputError, match="into the prompt"):
            cache.crop(-3)
        cache.reset()
        assert type(cache.layers[1]) is StaticLayer and not cache.layers[1].is_initialized
        decode_and_compare(routed, prompt[:, :7], cache=cache)  # a new, shorter prompt in the same cache


def test_static_sliding_window_layers_keep_a_ring_of_their_window():
    """Gemma 2 with every layer routed: a static sliding-window layer keeps the prompt's kept tokens and a window's
    worth of slots after them, overwritten oldest first; layer 0 also sizes the model's sliding-window masks."""
    routed = models.randomise_routers(modpass.transform(models.gemma2(), 0.5, layers="all"), std=0.5)
    prompt = torch.randint(1, 97, (2, 13))
    padding = torch.ones_like(prompt)
    padding[1, :3] = 0
    with torch.no_grad():
        cache = decode_and_compare(routed, prompt, padding, steps=12, cache=static_cache(routed, 40))
        decode_and_compare(routed, prompt, chunk=3, steps=4, cache=static_cache(routed, 40))
    sliding, full = cache.layers[0], cache.layers[1]
    assert sliding.is_sliding and not full.is_sliding
    assert sliding.keys.shape[-2] == 7 + 8 and full.keys.shape[-2] == 7 + 40 - 13
    # 19 keys written into 15 slots: the 4 oldest of the prompt's were overwritten by positions 21 to 24.
    assert sorted(sliding.token_positions[0, :4].tolist()) == [21, 22, 23, 24]
    with pytest.raises(modpass.RoutingInputError, match="overwritten"):
        cache.crop(-2)
    cache.reset()  # dense layers again, for a new prompt
    assert [type(layer).__name__ for layer in cache.layers[:2]] == ["StaticSlidingWindowLayer", "StaticLayer"]
    with torch.no_grad():
        decode_and_compare(routed, prompt[:, :10], steps=10, cache=cache)


@needs_hf_dynamo
@pytest.mark.filterwarnings("ignore:modpass. cached generation")
def test_static_sliding_window_decoding_compiles_no_more_graphs_than_the_dense_model():
    """Transformers' static sliding-window layer counts tokens in Python, for its mask sizes and the branches of its
    update: compiled decoding recompiles as the window fills, for the dense model (3 graphs on transformers 5.25) and
    the routed one (whose layer 0 sizes those masks; its own update has no branches: 2)."""
    from transformers import CompileConfig

    dense = models.gemma2(layers=2)  # a sliding-window layer, then a full-attention one
    routed = models.randomise_routers(modpass.transform(dense, 0.5, layers="all"), std=0.5)
    prompt = torch.randint(1, 97, (2, 6))  # the window (8) is passed while decoding
    greedy = dict(max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True
    graphs = {}
    with torch.no_grad():
        for name, model in (("dense", dense), ("routed", routed)):
            eager = model.generate(prompt, **greedy)
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            compiled = model.generate(prompt, **{cache_name(): static_cache(model, 16)}, compile_config=compile_config, **greedy)
            torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
            graphs[name] = compiled_graphs()
    assert graphs["routed"] <= graphs["dense"] and not torch._dynamo.utils.counters["graph_break"]


@needs_hf_dynamo
@pytest.mark.filterwarnings("ignore:modpass. cached generation")
@pytest.mark.parametrize("decoding", ["all", "router"])
def test_static_cache_decoding_compiles_to_one_graph_and_matches_eager(decoding):
    """Hugging Face's compiled decoding (a StaticCache, fullgraph=True): the routed layers trace into the model's graph.

    Decoding by router, eager mode skips a call that every row skips; compiled, it runs the block with their keys hidden.
    """
    from transformers import CompileConfig

    routed = modpass.set_decoding(routed_llama(), decoding)
    prompt = torch.randint(1, 97, (2, 10))
    padding = torch.ones_like(prompt)
    padding[1, :3] = 0
    greedy = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0, attention_mask=padding)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles decoding by default on accelerators only
    cache = static_cache(routed, 16)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # transform's traced runs count too
    with torch.no_grad():
        eager = routed.generate(prompt, **greedy)
        compiled = routed.generate(prompt, **{cache_name(): cache}, compile_config=compile_config, **greedy)
        another = routed_llama()  # another model's blocks come and go: nothing the compiled step reads changes
        another(input_ids=prompt, use_cache=True)
        del another
        gc.collect()
        again = routed.generate(prompt, **{cache_name(): static_cache(routed, 16)}, compile_config=compile_config, **greedy)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)
    assert compiled_graphs() == 1 and not torch._dynamo.utils.counters["graph_break"]
    if decoding == "router":  # every step cached a key, hidden where the token skipped: both happened
        generated = torch.cat([layer.token_positions[:, 5:10] for layer in cache.layers[1::2]])
        assert (generated >= 0).any() and (generated < 0).any()


@needs_hf_dynamo
@pytest.mark.filterwarnings("ignore:modpass. cached generation")
def test_compiled_decoding_is_one_graph_for_every_prompt_length_and_mix_of_task_ids():
    """A routed static layer's slots depend on the prompt (its kept tokens, then the room left), so that axis is
    dynamic: prompts of any length, task ids as a LongTensor, and the prompt's route mask (which decoding steps do not
    read) decode through one graph, even where Dynamo would otherwise specialise every size (``dynamic=False``), as
    the dense model's fixed-size cache does."""
    from transformers import CompileConfig

    routed = routed_llama({"t2i": 0.25, "mmu": [1.0, 1.0, 1.0, 0.5]})
    greedy = dict(max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=0)
    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        for length, tasks, masked in ((11, [1, 0, 1], False), (9, [0, 0, 0], True), (14, [1, 1, 0], True)):
            prompt = torch.randint(1, 97, (3, length))
            route_mask = (torch.arange(length) >= 2).repeat(3, 1) if masked else None
            with modpass.default_task(routed, torch.tensor(tasks), route_mask=route_mask):
                eager = routed.generate(prompt, **greedy)
                compiled = routed.generate(prompt, **{cache_name(): static_cache(routed, 20)}, compile_config=compile_config, **greedy)
            torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert compiled_graphs() == 1 and not torch._dynamo.utils.counters["graph_break"]


@needs_hf_dynamo
@pytest.mark.skipif(torch.__version__.startswith("2.11"), reason="torch 2.11's Inductor cannot compile the dense model's cached "
                    "generate() on CPU either (a C++ kernel reads an undeclared bounds-check variable; 2026-12-05)")
def test_compiled_model_generates_with_a_cache_as_eager():
    """Under torch.compile a routed block with a cache runs eagerly, through a graph break that says why."""
    routed = routed_llama()
    prompt = torch.randint(1, 97, (2, 9))
    greedy = dict(max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        eager = routed.generate(prompt, **greedy)
        routed.compile()  # in place: generate() calls the module itself
        torch._dynamo.reset()
        torch.testing.assert_close(routed.generate(prompt, **greedy), eager, rtol=0, atol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    if "reason" in inspect.signature(torch.compiler.disable).parameters:  # torch >= 2.7 reports it
        assert any("with a KV cache runs eagerly" in reason for reason in torch._dynamo.utils.counters["graph_break"])


def routed_block_calls(routed) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each routed block's (input, output) hidden states of every call, recorded by forward hooks."""
    calls = {path: [] for path in modpass.routed_blocks(routed)}
    for path, block in modpass.routed_blocks(routed).items():
        block.register_forward_hook(lambda module, args, output, path=path: calls[path].append((args[0], output)))
    return calls


def test_decoding_by_router_skips_a_layer_for_the_tokens_whose_router_says_so():
    """MoD's causal sampling: a generated token runs a routed layer when sigmoid(logit) > 0.5."""
    routed = modpass.set_decoding(routed_llama(), "router")
    prompt = torch.randint(1, 97, (2, 9))
    calls = routed_block_calls(routed)
    with torch.no_grad():
        cache = cache_of(routed(input_ids=prompt, use_cache=True))
        for _ in range(6):
            routed(input_ids=torch.randint(1, 97, (2, 1)), use_cache=True, **{cache_name(): cache})
    decisions = []
    for path, block in modpass.routed_blocks(routed).items():
        columns = []
        for step, (before, after) in enumerate(calls[path][1:]):
            runs = (block.mod_routers.default(before) > 0)[:, 0, 0]
            decisions.append(runs)
            assert torch.equal(after[~runs], before[~runs]), "a token that skips leaves the layer unchanged"
            assert not runs.any() or not torch.isclose(after[runs], before[runs]).all()
            if runs.any():  # the block ran: every row's key is cached, a skipping row's hidden from later queries
                columns.append(torch.where(runs, 9 + step, -1 - (9 + step)))
        generated = cache.layers[int(path.rsplit(".", 1)[1])].token_positions[:, 5:]  # after the prompt's 5 kept keys
        torch.testing.assert_close(generated, torch.stack(columns, 1) if columns else generated[:, :0], rtol=0, atol=0)
    decisions = torch.stack(decisions)
    assert decisions.any() and not decisions.all() and (~decisions).all(1).any(), "runs, skips, and a call all rows skip"


def test_decoding_by_router_at_its_extremes():
    prompt = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        # Every router says "run": the same as decoding every token.
        routed = modpass.set_decoding(routed_llama(), "router")
        for block in modpass.routed_blocks(routed).values():
            torch.nn.init.constant_(block.mod_routers.default.bias, 20.0)
        decode_and_compare(routed, prompt)
        # Every router says "skip": generated tokens pass the routed layers unchanged and are never cached there.
        for block in modpass.routed_blocks(routed).values():
            torch.nn.init.constant_(block.mod_routers.default.bias, -20.0)
        calls = routed_block_calls(routed)
        cache = decode_and_compare(modpass.set_decoding(routed, "all"), prompt, steps=1)  # the prompt as before
        modpass.set_decoding(routed, "router")
        for _ in range(3):
            routed(input_ids=torch.randint(1, 97, (2, 1)), use_cache=True, **{cache_name(): cache})
    assert [layer.keys.shape[-2] for layer in cache.layers] == [13, 6, 13, 6]
    for path_calls in calls.values():
        assert all(torch.equal(before, after) for before, after in path_calls[-3:])
    # Cropping generated tokens that cached nothing there leaves the routed layers' keys as they are.
    positions = [layer.token_positions.clone() for layer in cache.layers[1::2]]
    cache.crop(-2)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [11, 6, 11, 6] and cache.get_seq_length() == 11
    assert all(torch.equal(layer.token_positions, kept) for layer, kept in zip(cache.layers[1::2], positions))
    with pytest.raises(modpass.ConfigError, match="'all', 'router'"):
        modpass.set_decoding(routed, "threshold")
