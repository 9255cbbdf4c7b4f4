"""Dtypes, modes, edge-case inputs and fuzzed plans: right answer or a clear refusal."""

from __future__ import annotations

import copy
import functools
import math
import pickle
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import modpass
from tests import models

# Full-capacity tolerance per dtype, relative to the output's scale: fp32 is exact up to
# rounding; bf16/fp16 differ from dense only by the order of the gate arithmetic.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_full_capacity_matches_dense_in_each_dtype(dtype):
    dense = models.llama().to(dtype)
    routed = modpass.transform(dense, 1.0, layers="all")
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        want, got = dense(input_ids=ids).logits.float(), routed(input_ids=ids).logits.float()
    assert routed.model.layers[0].mod_routers.default.weight.dtype == dtype
    assert ((got - want).abs().max() / want.abs().max()).item() <= TOLERANCE[dtype]


def test_to_dtype_after_transform_and_inference_modes():
    dense = models.llama()
    routed = modpass.transform(dense, 1.0, layers="all").to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 10))
    with torch.inference_mode():
        got = routed(input_ids=ids).logits.float()
        want = dense.to(torch.bfloat16)(input_ids=ids).logits.float()
    assert ((got - want).abs().max() / want.abs().max()).item() <= TOLERANCE[torch.bfloat16]


def test_autocast_and_train_eval_switches():
    routed = modpass.transform(models.NanoGPT(), 0.5)
    idx = torch.randint(0, 61, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert routed(idx).dtype == torch.bfloat16
    assert routed(idx).dtype == torch.float32, "graphs captured under autocast are not reused outside it"
    routed.train()
    routed(idx).sum().backward()
    routed.eval()
    with torch.no_grad():
        routed(idx)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_on_hugging_face_models_gives_the_same_gradients(reentrant):
    """Every parameter's gradient, the routers' through the auxiliary loss too. A reentrant checkpoint tracks only
    tensors among its own arguments and results: until 2026-12-06 a routed block handed it tuples, and every layer
    up to the last routed one got no gradient, silently."""
    routed, ids = llama_for_training()
    plain = gradients(copy.deepcopy(routed), ids)
    models.enable_checkpointing(routed, use_reentrant=reentrant)
    assert routed.model.layers[1].gradient_checkpointing
    assert_same_gradients(gradients(routed, ids), plain)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_recomputes_each_call_with_its_own_tasks_and_route_mask(reentrant):
    """A checkpointed block recomputes its call in the backward, after later calls (a metric on another batch, the
    second forward of gradient accumulation) have set other tasks and route masks on the model. Until 2026-12-06 the
    recomputation read those, selected other tokens, and the gradients were wrong, silently."""
    torch.manual_seed(0)
    routed = modpass.transform(models.llama(layers=2), {"a": 0.5, "b": 0.25}, layers="all").train()
    models.randomise_routers(routed, seed=0)
    ids, other = torch.randint(0, 97, (2, 2, 12))
    masks = torch.rand(2, 2, 12) > 0.3

    def gradients_of_the_first_call(model):
        loss = model(input_ids=ids, labels=ids, task=["a", "b"], route_mask=masks[0]).loss
        model(input_ids=other, labels=other, task=["b", "a"], route_mask=masks[1])
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients_of_the_first_call(copy.deepcopy(routed))
    models.enable_checkpointing(routed, use_reentrant=reentrant)
    assert_same_gradients(gradients_of_the_first_call(routed), plain)


def llama_for_training() -> tuple[torch.nn.Module, torch.Tensor]:
    """A routed Llama in training mode, its routers random and trained by an auxiliary loss too; and its input ids."""
    torch.manual_seed(0)
    routed = modpass.transform(models.llama(), 0.5, aux_loss_weight=0.1).train()
    with torch.no_grad():
        for block in modpass.routed_blocks(routed).values():
            block.mod_routers.default.weight.normal_()
    return routed, torch.randint(0, 97, (2, 12))


def gradients(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of the loss and the auxiliary loss, by its name in the routed model."""
    (model(input_ids=ids, labels=ids).loss + modpass.aux_loss(model)).backward()
    return {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6)


def test_torch_checkpoint_wrappers_around_routed_blocks_give_the_same_gradients_or_say_why_not():
    """torch's checkpoint_wrapper around routed blocks. Non-reentrant: the same gradients, also when the block first
    captures its graphs inside the checkpoint (a pickled model carries none), which until 2026-12-06 failed torch's
    count of saved tensors. Reentrant: its forward runs without autograd, so the auxiliary loss cannot train the
    routers: said."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    routed, ids = llama_for_training()

    def wrapped(impl):
        model = pickle.loads(pickle.dumps(routed))
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=impl),
                                       check_fn=lambda module: isinstance(module, modpass.RoutedBlock))
        assert not any(block.parts_changed() for block in modpass.routed_blocks(model).values()), "children set again as they were"
        return model

    assert_same_gradients(gradients(wrapped(CheckpointImpl.NO_REENTRANT), ids), gradients(copy.deepcopy(routed), ids))
    with pytest.warns(UserWarning, match="router scores of its last call carry no gradient.*REENTRANT"):
        gradients(wrapped(CheckpointImpl.REENTRANT), ids)


@pytest.fixture(scope="module")
def padded_llama():
    return modpass.transform(models.llama(), 0.5, layers="all")


def test_all_padding_rows_do_not_disturb_the_batch_and_stay_finite(padded_llama):
    ids = torch.randint(0, 97, (3, 8))
    mask = torch.ones_like(ids)
    mask[1] = 0
    with torch.no_grad():
        out = padded_llama(input_ids=ids, attention_mask=mask).logits
        alone = padded_llama(input_ids=ids[[0, 2]], attention_mask=mask[[0, 2]]).logits
        # No token of the all-padding row counts as selected: every (routed) block passes it through.
        skipped = padded_llama.lm_head(padded_llama.model.norm(padded_llama.model.embed_tokens(ids[[1]])))
    torch.testing.assert_close(out[[0, 2]], alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[[1]], skipped, rtol=0, atol=0)


@pytest.mark.parametrize("gate", ["tanh", "string"])
def test_padding_in_the_k_slots_passes_the_block_unchanged(padded_llama, gate):
    """Padding in the k slots keeps what a skipped token keeps: ``x``, or ``w * x`` under STRing
    (a router bias of 1 makes ``w`` differ from 1 while every real token still ties)."""
    routed = padded_llama if gate == "tanh" else modpass.transform(models.llama(), 0.5, layers=[2], gate=gate)
    ids = torch.randint(0, 97, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # 2 real tokens, k = 4: two of the slots must hold padding
    seen = {}
    block = routed.model.layers[2]
    skipped_weight = 1.0
    if gate == "string":
        with torch.no_grad():
            block.mod_routers.default.bias.fill_(1.0)
        skipped_weight = 1.0 + 0.2 * torch.tanh(torch.tensor(1.0))
    handle = block.register_forward_hook(
        lambda module, args, kwargs, output: seen.update(x=args[0] if args else kwargs["hidden_states"], y=output),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            routed(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    (record,) = block.last_routing
    # Padding ties at -inf, so the stable tie-break fills the spare slots with the first padding positions.
    assert record.index[0].tolist() == [0, 1, 6, 7] and record.index.shape == (2, 4)
    y = seen["y"][0] if isinstance(seen["y"], tuple) else seen["y"]
    torch.testing.assert_close(y[0, :6], seen["x"][0, :6] * skipped_weight, rtol=0, atol=0)
    assert not torch.equal(y[0, 6:], seen["x"][0, 6:])


@pytest.mark.parametrize("tokens", [1, 2, 3])
def test_sequences_shorter_than_one_token_of_capacity(tokens):
    routed = modpass.transform(models.NanoGPT(), 0.1, layers="all")
    with torch.no_grad():
        out = routed(torch.randint(0, 61, (1, tokens)))
    assert out.shape == (1, tokens, 61)
    assert all(b.last_routing[0].index.shape == (1, 1) for b in modpass.routed_blocks(routed).values())


def test_long_sequences():
    routed = modpass.transform(models.NanoGPT(block_size=2048), 0.125)
    with torch.no_grad():
        routed(torch.randint(0, 61, (1, 2048)))
    assert routed.h[1].last_routing[0].index.shape == (1, 256)


def test_non_finite_router_logits_still_select_exactly_k_real_tokens():
    routed = modpass.transform(models.NanoGPT(), 0.5, layers=[1])
    with torch.no_grad():
        routed.h[1].mod_routers.default.bias.fill_(float("nan"))
        routed(torch.randint(0, 61, (2, 10)))
    assert routed.h[1].last_routing[0].index.tolist() == [[0, 1, 2, 3, 4]] * 2
    with torch.no_grad():
        routed.h[1].mod_routers.default.bias.fill_(float("inf"))
        routed(torch.randint(0, 61, (2, 10)))
    assert routed.h[1].last_routing[0].index.shape == (2, 5)


# Values that tie, compare equal with different bits (+-0), or sit at the ends of float32.
_SCORE_POOL = [0.0, -0.0, 1.0, -1.0, 0.5, math.inf, -math.inf, 3.4e38, -3.4e38, 1e-45, -1e-45]


def best_k_by_position(scores: torch.Tensor, k: int) -> list[list[int]]:
    """The selection rule in plain Python: the k highest scores, ties to the earlier position, in position order."""
    return [sorted(sorted(range(len(row)), key=lambda i, row=row: (-row[i], i))[:k]) for row in scores.tolist()]


@given(
    rows=st.integers(1, 4),
    scores=st.lists(st.sampled_from(_SCORE_POOL) | st.floats(width=32, allow_nan=False), min_size=1, max_size=64),
    data=st.data(),
)
def test_select_tokens_keeps_the_k_best_with_ties_to_the_earlier_position(rows, scores, data):
    scores = torch.tensor(scores, dtype=torch.float32).roll(data.draw(st.integers(0, 63))).repeat(rows, 1)
    scores[1:] = scores[1:].flip(-1)
    k = data.draw(st.integers(1, scores.shape[1]))
    assert modpass.routing.select_tokens(scores, k).tolist() == best_k_by_position(scores, k)


@pytest.mark.parametrize(
    ("scores", "k", "chosen"),
    [([-0.0, 0.0], 1, [0]), ([0.0, -0.0], 1, [0]), ([-1.0, -0.0, 0.0, -2.0], 2, [1, 2]), ([0.0] * 5, 3, [0, 1, 2])],
)
def test_select_tokens_breaks_ties_by_position_even_between_signed_zeros(scores, k, chosen):
    assert modpass.routing.select_tokens(torch.tensor([scores]), k).tolist() == [chosen]


@given(
    batch=st.integers(1, 3),
    tokens=st.integers(1, 12),
    data=st.data(),
)
def test_take_tokens_gradient_equals_the_sum_autograd_gives_its_two_uses(batch, tokens, data):
    """``take_tokens``'s one-buffer backward against autograd's (gather gradient + base gradient),
    with the base read twice (a write-back and a reweighting) so its gradient is non-zero at the
    gathered rows: they must be accumulated into it, not written over it."""
    k = data.draw(st.integers(1, tokens))
    seed = data.draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(tokens, generator=generator)[:k].sort().values for _ in range(batch)])
    hidden = torch.randn(batch, tokens, 5, generator=generator, requires_grad=True)
    probe = torch.randn(batch, tokens, 5, generator=generator)
    rows = torch.arange(batch).unsqueeze(-1)

    def loss(base, selected):
        return ((base * 3).index_put((rows, index), selected.sin()) * probe).sum() + (base * probe).sum()

    (got,) = torch.autograd.grad(loss(*modpass.routing.take_tokens(hidden, index)), hidden)
    (want,) = torch.autograd.grad(loss(hidden, modpass.routing.gather_tokens(hidden, index, (1,))), hidden)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_take_tokens_carries_forward_mode_tangents():
    """Forward-mode AD outside ``torch.func`` (dual tensors) takes autograd's default as well."""
    hidden, tangent, index = torch.randn(2, 6, 4), torch.randn(2, 6, 4), torch.tensor([[0, 3], [2, 5]])
    with torch.autograd.forward_ad.dual_level():
        base, selected = modpass.routing.take_tokens(torch.autograd.forward_ad.make_dual(hidden, tangent), index)
        assert torch.equal(torch.autograd.forward_ad.unpack_dual(base).tangent, tangent)
        assert torch.equal(torch.autograd.forward_ad.unpack_dual(selected).tangent, modpass.routing.gather_tokens(tangent, index, (1,)))


def test_double_backward_through_a_routed_model_equals_the_dense_models():
    """A Hessian-vector product (gradient penalties, MAML) differentiates the backward: ``take_tokens``'s backward is
    made of differentiable ops. At full capacity, with the routers held fixed, it is the dense model's."""
    torch.manual_seed(0)
    dense = models.NanoGPT(layers=2)
    routed = modpass.transform(dense, 1.0, layers="all")
    idx = torch.randint(0, 61, (2, 12))

    def hessian_times_ones(model):
        params = [p for name, p in model.named_parameters() if "mod_routers" not in name]
        grads = torch.autograd.grad(model(idx).square().mean(), params, create_graph=True)
        return torch.autograd.grad(sum(g.sum() for g in grads), params)

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # CPU's flash kernel has no double backward
        for want, got in zip(hessian_times_ones(dense), hessian_times_ones(routed)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def per_sample_loss(routed):
    """``loss(params, ids)`` of ``routed`` run with ``params`` (``torch.func.functional_call``), its aux loss included."""

    def loss(params, ids):
        return torch.func.functional_call(routed, params, (ids,)).square().mean() + modpass.aux_loss(routed)

    return loss


@pytest.fixture(scope="module")
def nano_with_aux_loss():
    torch.manual_seed(0)
    routed = modpass.transform(models.NanoGPT(layers=2), 0.5, layers=[1], aux_loss_weight=0.1)
    return models.randomise_routers(routed), torch.randint(0, 61, (3, 12))


def test_torch_func_transforms_run_through_a_routed_model(nano_with_aux_loss):
    """``functional_call``, per-sample gradients (``vmap`` over ``grad``) and forward-mode AD (``jvp``): ``take_tokens``'s
    one-gradient-buffer function has no rules for ``vmap`` or ``jvp``, and gives way to autograd's default there."""
    routed, ids = nano_with_aux_loss
    params = {name: p.detach() for name, p in routed.named_parameters()}
    twin = copy.deepcopy(routed)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
        scaled = {name: 1.5 * p for name, p in params.items()}
        assert torch.equal(torch.func.functional_call(routed, scaled, (ids,)), twin(ids))
        # Parameters of another dtype make a call structure not prepared, which cannot be captured from plain tensors:
        # said so, where export's own SpecViolationError was reported as a block that cannot take symbolic sizes.
        with pytest.raises(modpass.CaptureError, match="parameters are plain tensors in this call .* functional_call"):
            torch.func.functional_call(routed, {name: p.double() for name, p in params.items()}, (ids,))

    loss = per_sample_loss(routed)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, ids.unsqueeze(1))
    for row in range(len(ids)):
        routed.zero_grad()
        loss(dict(routed.named_parameters()), ids[row : row + 1]).backward()  # outside torch.func: one gradient buffer
        for name, p in routed.named_parameters():
            torch.testing.assert_close(per_sample[name][row], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert per_sample["h.1.mod_routers.default.weight"].abs().amin(-1).gt(0).all(), "every sample trains the router"

    def logits(params):
        return torch.func.functional_call(routed, params, (ids,))

    tangents = {name: torch.randn_like(p) for name, p in params.items()}
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # CPU's flash kernel has no forward AD
        out, out_tangent = torch.func.jvp(logits, (params,), (tangents,))
    cotangent = torch.randn_like(out)
    (param_cotangents,) = torch.func.vjp(logits, params)[1](cotangent)
    forward_mode, reverse_mode = (out_tangent * cotangent).sum(), sum((param_cotangents[n] * t).sum() for n, t in tangents.items())
    torch.testing.assert_close(forward_mode, reverse_mode, rtol=1e-4, atol=0)


def test_a_compiled_torch_func_transform_of_a_routed_model_runs_eagerly(nano_with_aux_loss):
    """The routing records a transform leaves on its blocks would be functorch tensors escaping the compiled graph:
    routing breaks the graph there, so that Dynamo runs the transform eagerly, and ``fullgraph=True`` refuses it."""
    routed, ids = nano_with_aux_loss
    params = {name: p.detach() for name, p in routed.named_parameters()}
    per_sample = torch.func.vmap(torch.func.grad(per_sample_loss(routed)), in_dims=(None, 0))
    want = per_sample(params, ids.unsqueeze(1))
    torch._dynamo.reset()
    got = torch.compile(per_sample, backend="modpass")(params, ids.unsqueeze(1))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(per_sample, backend="modpass", fullgraph=True)(params, ids.unsqueeze(1))


def reference_block(block, x, index, logits, gate):
    """Dense-on-subset reference: the original block on the gathered tokens, written back."""
    gathered = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    y = block._block(gathered)
    w_all = torch.sigmoid(logits) if gate == "sigmoid" else 1 + 0.2 * torch.tanh(logits)
    w = torch.gather(w_all, 1, index).unsqueeze(-1)
    base = w_all.unsqueeze(-1) * x if gate == "string" else x.clone()
    return base.scatter(1, index.unsqueeze(-1).expand_as(gathered), gathered + w * (y - gathered))


_FUZZ_MODELS: dict = {}


def test_a_call_from_another_thread_inside_a_forward_is_refused_and_the_first_call_finishes():
    """A routed model's task and route mask are its own state: two threads' calls routed with each other's tasks
    (643 of 800 outputs wrong in a two-task stress run); now the second call is refused while the first runs."""
    import threading

    routed = modpass.transform(models.NanoGPT(), {"a": 0.25, "b": 0.75}, layers="all")
    ids = torch.randint(0, 61, (2, 12))
    inside, release = threading.Event(), threading.Event()

    def wait_inside(module, args, output):
        inside.set()
        release.wait(timeout=60)

    handle = routed.h[1].register_forward_hook(wait_inside)
    results = {}
    with torch.no_grad():
        first = threading.Thread(target=lambda: results.setdefault("a", routed(ids, task="a")))
        first.start()
        assert inside.wait(timeout=60)
        with pytest.raises(modpass.RoutingInputError, match="called from one thread while another was inside its forward"):
            routed(ids, task="b")
        release.set()
        first.join()
        handle.remove()
        torch.testing.assert_close(results["a"], routed(ids, task="a"), rtol=0, atol=0)
        assert not torch.allclose(routed(ids, task="b"), results["a"])


@given(
    ratios=st.lists(st.fractions(min_value=0.05, max_value=1).map(lambda f: f.limit_denominator(16)), min_size=1, max_size=3),
    gate=st.sampled_from(["tanh", "sigmoid", "string"]),
    batch=st.integers(1, 4),
    tokens=st.integers(1, 33),
    seed=st.integers(0, 2**16),
)
def test_fuzzed_plans_match_the_dense_on_subset_reference(ratios, gate, batch, tokens, seed):
    key = (tuple(ratios), gate)
    if key not in _FUZZ_MODELS:
        tasks = {f"task{i}": r for i, r in enumerate(ratios)}
        _FUZZ_MODELS[key] = modpass.transform(models.NanoGPT(width=16, heads=2).eval(), tasks, layers="all", gate=gate)
    routed = _FUZZ_MODELS[key]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in modpass.routed_blocks(routed).values():
            for router in block.mod_routers.values():
                router.weight.copy_(torch.randn(router.weight.shape, generator=generator))
    task = f"task{seed % len(ratios)}"
    block = routed.h[seed % 4]
    x = torch.randn(batch, tokens, 16, generator=generator)
    with torch.no_grad(), modpass.default_task(routed, task):
        out = block(x)
        (record,) = block.last_routing
        assert record.index.shape == (batch, max(1, math.ceil(ratios[seed % len(ratios)] * tokens)))
        torch.testing.assert_close(out, reference_block(block, x, record.index, record.logits, gate), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aux_loss_weight", [0.0, 0.5])
@pytest.mark.parametrize("gate", ["tanh", "sigmoid", "string"])
def test_gradients_match_the_dense_on_subset_reference(gate, aux_loss_weight):
    """The hidden state, block and router gradients equal the reference's, where the gate reads
    the full logits (modpass recomputes the selected tokens' logits and detaches the rest)."""
    torch.manual_seed(0)
    routed = modpass.transform(models.NanoGPT(width=16, heads=2).train(), 0.5, layers=[1], gate=gate, aux_loss_weight=aux_loss_weight)
    block = routed.h[1]
    with torch.no_grad():
        block.mod_routers.default.weight.normal_()
        block.mod_routers.default.bias.normal_()
    x = torch.randn(2, 12, 16, requires_grad=True)
    probe = torch.randn(2, 12, 16)
    params = [x, *block.parameters()]

    out = block(x)
    (record,) = block.last_routing
    got = torch.autograd.grad((out * probe).sum() + modpass.aux_loss(routed), params)

    logits = block.mod_routers.default(x).squeeze(-1)
    want_out = reference_block(block, x, record.index, logits, gate)
    aux = 0.0
    if aux_loss_weight:
        target = torch.zeros_like(logits).scatter(1, record.index, 1.0)
        aux = aux_loss_weight * torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    want = torch.autograd.grad((want_out * probe).sum() + aux, params)
    names = ["x", *(name for name, _ in block.named_parameters())]
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("aux_loss_weight", [0.0, 0.1])
def test_training_keeps_a_routed_blocks_full_input_only_for_the_aux_loss(aux_loss_weight):
    """Autograd saves the k selected tokens for a routed block's backward, not its (B, T, D) input,
    unless an aux loss trains the router on every token (its weight gradient needs them all)."""
    routed = modpass.transform(models.NanoGPT(layers=4).train(), 0.25, aux_loss_weight=aux_loss_weight)
    inputs = {}
    for path, block in modpass.routed_blocks(routed).items():
        block.register_forward_pre_hook(lambda module, args, path=path: inputs.__setitem__(path, args[0]))
    saved = set()

    def pack(tensor):
        saved.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        routed(torch.randint(0, 61, (2, 16)))
    kept = sorted(path for path, hidden in inputs.items() if hidden.untyped_storage().data_ptr() in saved)
    assert kept == (sorted(inputs) if aux_loss_weight else []), kept


class CachingBlock(models.NanoBlock):
    """Keeps its attention input in a dict, for a later look."""

    def __init__(self, *args):
        super().__init__(*args)
        self.cache = {}

    def forward(self, x):
        self.cache["normed"] = self.ln_1(x).detach()
        return super().forward(x)


class NormLoggingBlock(models.NanoBlock):
    """Logs its hidden state's norm at each call."""

    def __init__(self, *args):
        super().__init__(*args)
        self.norms = []

    def forward(self, x):
        self.norms.append(x.detach().norm())
        return super().forward(x)


class CallCountingBlock(models.NanoBlock):
    """Counts its calls in a Python int."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


PYTHON_STATE_WRITES = {
    "dict-written": (CachingBlock, "cache", {}, r"cache\['normed'\] assigned"),
    "list-appended-to": (NormLoggingBlock, "norms", [], r"norms \(a list\) changed"),
    "int-counted": (CallCountingBlock, "calls", 0, r"calls assigned"),
}


@pytest.mark.parametrize("write", PYTHON_STATE_WRITES)
def test_a_block_that_writes_python_state_is_refused_and_the_model_left_as_it_was(write):
    """Routed calls run the block's captured graph, not its forward: the state kept what the dense run on the example
    inputs left there (a 13-token tensor, a count of 1) and no routed call changed it."""
    block_class, attribute, initial, written = PYTHON_STATE_WRITES[write]
    model = type("StatefulGPT", (models.NanoGPT,), {"block_class": block_class})(width=16, heads=2, layers=2)
    with pytest.raises(modpass.UnroutableBlockError, match=rf"block 0 \(h\.0\): the block's forward writes Python state \({written}\)\. "
                       r"A routed call runs the block's captured graph.*Return the values from the block instead, or leave "
                       r"this block dense with layers="):
        modpass.transform(model, 0.5, layers="all")
    assert [getattr(block, attribute) for block in model.h] == [initial, initial]


class LayerDropBlock(models.NanoBlock):
    """Skipped at random in training (LayerDrop), drawing from Python's or numpy's global generator."""

    draw = staticmethod(random.random)

    def forward(self, x):
        if self.training and self.draw() < 0.5:
            return x
        return super().forward(x)


@pytest.mark.parametrize("generator", ["random", "numpy.random"])
def test_a_block_that_draws_from_a_generator_outside_torch_is_refused_in_training(generator):
    """The draw is a constant of the captured graph: every routed call in training dropped the block, or kept it, as
    the capture's draw did. In eval no draw is made, and the block routes. A capture puts the generator back."""
    import numpy

    draw = random.random if generator == "random" else numpy.random.random_sample
    block_class = type("DrawingBlock", (LayerDropBlock,), {"draw": staticmethod(draw)})
    model = type("LayerDropGPT", (models.NanoGPT,), {"block_class": block_class})(width=16, heads=2, layers=2)
    modpass.transform(model.eval(), 0.5, layers="all")
    random.seed(0)
    numpy.random.seed(0)
    with pytest.raises(modpass.UnroutableBlockError, match=rf"block 0 \(h\.0\): the block's forward draws from the global "
                       rf"random generator of {generator} .*Draw with torch \(torch.rand\)"):
        modpass.transform(model.train(), 0.5, layers="all")
    assert draw() == (random.Random(0).random() if generator == "random" else numpy.random.RandomState(0).random_sample())


class ShapeNotingBlock(models.NanoBlock):
    """Notes its token count and widths seen, in a new attribute and a set."""

    def __init__(self, *args):
        super().__init__(*args)
        self.widths = set()

    def forward(self, x):
        self.tokens = x.shape[1]
        self.widths.add(x.shape[-1])
        return super().forward(x)


def test_a_capture_leaves_the_python_state_a_traced_call_wrote_as_it_was():
    """torch.export puts back the attributes a traced call rebound, but not a new one (which kept a symbolic size) nor
    a set's contents."""
    model = type("ShapeNotingGPT", (models.NanoGPT,), {"block_class": ShapeNotingBlock})(width=16, heads=2, layers=2)
    modpass.list_blocks(model)
    assert [(vars(block).get("tokens"), block.widths) for block in model.h] == [(None, set())] * 2
