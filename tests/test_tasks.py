"""Task-aware routing (UniMoD): per-task routers and capacities, masks, gates, training, save/load."""

from __future__ import annotations

import copy
import json
import math
import pickle
import threading
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import modpass
from modpass import routing, schedules
from modpass.config import check_task_name, exact_ratio
from tests import models

TASKS = {"t2i": 0.25, "mmu": 0.75}


@pytest.fixture(scope="module")
def two_task():
    torch.manual_seed(0)
    routed = modpass.transform(models.NanoGPT().eval(), TASKS, layers="every_other")
    models.randomise_routers(routed, seed=0, biases=True)
    return routed


def test_one_router_per_block_and_task(two_task):
    names = {k for k in two_task.state_dict() if "mod_routers" in k}
    assert names == {f"h.{i}.mod_routers.{t}.{p}" for i in (1, 3) for t in TASKS for p in ("weight", "bias")}


def test_mixed_batch_equals_per_sample_runs(two_task):
    idx = torch.randint(0, 61, (4, 16))
    tasks = ["t2i", "mmu", "mmu", "t2i"]
    with torch.no_grad():
        mixed = two_task(idx=idx, task=tasks)
        alone = torch.cat([two_task(idx=idx[i : i + 1], task=t) for i, t in enumerate(tasks)])
        by_index = two_task(idx=idx, task=torch.tensor([0, 1, 1, 0]))
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_index, mixed, rtol=0, atol=0)
    records = two_task.h[1].last_routing
    assert {r.task: r.index.shape[1] for r in records} == {"t2i": 4, "mmu": 12}


@pytest.mark.parametrize("build", [models.BiasGPT, models.ConditionedGPT], ids=["bias passed on", "vector computed per row"])
def test_what_blocks_hand_on_keeps_every_row_in_a_mixed_batch(build):
    """BiasGPT's blocks return the batch's bias as it came; ConditionedGPT's compute each row's next conditioning.
    Either way, a task's group must not hand on only its own rows."""
    torch.manual_seed(0)
    routed = modpass.transform(build().eval(), TASKS, layers="all")
    models.randomise_routers(routed, seed=0, biases=True)
    idx = torch.randint(1, 61, (4, 16))
    tasks = ["t2i", "mmu", "mmu", "t2i"]
    with torch.no_grad():
        alone = torch.cat([routed(idx[i : i + 1], task=t) for i, t in enumerate(tasks)])
        torch.testing.assert_close(routed(idx, task=tasks), alone, rtol=1e-5, atol=1e-5)
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            compiled = torch.compile(routed, backend="eager", fullgraph=True)(idx, task=torch.tensor([0, 1, 1, 0]))
        torch.testing.assert_close(compiled, alone, rtol=1e-5, atol=1e-5)


def test_a_mask_whose_batch_only_guards_tie_to_the_hidden_states_follows_the_rows():
    """diffusers repeats a (B, 1, T) mask per head and views it back by the batch; that mask must be gathered per row."""
    torch.manual_seed(0)
    model = models.KeyPaddingGPT().eval()
    idx, keep = torch.randint(1, 61, (4, 16)), torch.ones(4, 16, dtype=torch.long)
    keep[1, 10:], keep[2, 5:] = 0, 0
    routed = modpass.transform(model, {"t2i": 1.0, "mmu": 0.5}, layers="all", example_inputs=(idx, keep))
    with torch.no_grad():
        torch.testing.assert_close(routed(idx, keep, task="t2i"), model(idx, keep))
        models.randomise_routers(routed, seed=0, biases=True)
        tasks = ["t2i", "mmu", "mmu", "t2i"]
        for tokens in (16, 1):  # one token (a decoding step) takes a branch of its own in token_axes
            alone = torch.cat([routed(idx[i : i + 1, :tokens], keep[i : i + 1, :tokens], task=t) for i, t in enumerate(tasks)])
            torch.testing.assert_close(routed(idx[:, :tokens], keep[:, :tokens], task=tasks), alone, rtol=1e-5, atol=1e-5)


class BatchMixingBlock(models.ConditionedBlock):
    def __init__(self, width: int, heads: int, mixing: str):
        super().__init__(width, heads)
        self.mixing = mixing

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, c = super().forward(x, c)
        if self.mixing == "centred over the batch":
            return y, c - c.mean(dim=0)
        return y, c, x.new_ones(()) * x.shape[0]  # "scaled by the batch size": one value for the whole batch


@pytest.mark.parametrize("mixing, reason", [("centred over the batch", "aten.mean.dim"), ("scaled by the batch size", "output 2 is one value")])
def test_a_block_that_mixes_sequences_refuses_a_mixed_batch(mixing, reason):
    torch.manual_seed(0)
    model = models.ConditionedGPT(layers=2).eval()
    model.h = nn.ModuleList(BatchMixingBlock(32, 4, mixing) for _ in model.h)
    routed = modpass.transform(model, dict.fromkeys(TASKS, 1.0), layers="all")
    idx = torch.randint(1, 61, (4, 16))
    with torch.no_grad():
        torch.testing.assert_close(routed(idx, task="mmu"), model(idx))
        with pytest.raises(modpass.UnroutableBlockError, match=f"one call of the block per group.*{reason}"):
            routed(idx, task=["t2i", "mmu", "mmu", "t2i"])


def test_flops_per_task_follow_the_per_task_ratios(two_task):
    report = modpass.flops(two_task, {"idx": torch.randint(0, 61, (2, 64))})
    saved = {t: 1 - report.blocks["h.1"][t][1] / report.blocks["h.1"][t][0] for t in TASKS}
    assert saved["t2i"] > saved["mmu"] > 0
    assert report.ratio("t2i") < report.ratio("mmu") < 1


def test_layer_switch_leaves_a_task_dense_at_a_block():
    dense = models.NanoGPT().eval()
    routed = modpass.transform(dense, {"t2i": [1.0, 0.5, 1.0, 0.5], "mmu": [0.5, 0.5, 1.0, 1.0]}, layers="all")
    plan = modpass.routing_plan_of(routed)
    assert [(b.path, {t: r is not None for t, r in b.ratios.items()}) for b in plan.blocks] == [
        ("h.0", {"t2i": False, "mmu": True}),
        ("h.1", {"t2i": True, "mmu": True}),
        ("h.3", {"t2i": True, "mmu": False}),
    ]
    assert set(routed.h[0].mod_routers) == {"mmu"}
    assert not isinstance(routed.h[2], modpass.RoutedBlock)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        routed(idx=torch.randint(0, 61, (2, 10)), task="t2i")
        assert routed.h[0].last_routing == []
        with modpass.default_task(routed, "t2i"):
            torch.testing.assert_close(routed.h[0](x), dense.h[0](x), rtol=0, atol=0)


def test_schedules_cover_the_literature():
    assert [schedules.Interleaved(0.125)(i, 6) for i in range(6)] == [1.0, 0.125] * 3
    assert [schedules.LastN(0.2, 2)(i, 5) for i in range(5)] == [1.0, 1.0, 1.0, 0.2, 0.2]
    prd = [schedules.ShiftedCosine()(i, 32) for i in range(32)]
    assert all(r == 1.0 for r in prd[:8]) and all(r < 1.0 for r in prd[8:])
    assert prd[-1] == 0.15 and prd[-8:] == [0.15] * 8
    deeper = [schedules.ShiftedCosine()(i, 48) for i in range(48)]
    assert deeper[0] == 1.0 and deeper[-1] == 0.15
    routed = modpass.transform(models.NanoGPT(layers=4).eval(), {"a": schedules.LastN(0.5, 2)}, layers="all")
    assert [b.path for b in modpass.routing_plan_of(routed).blocks] == ["h.2", "h.3"]


def nudged(x: float, ulps: int) -> float:
    """``x`` moved ``ulps`` representable floats up (or down, for a negative count): float noise."""
    for _ in range(abs(ulps)):
        x = math.nextafter(x, math.inf if ulps > 0 else 0.0)
    return x


@settings(max_examples=200)
@given(data=st.data())
def test_float_noise_in_a_ratio_does_not_change_k(data):
    """A float a few hundred ulps off a fraction of denominator <= 10^6 is that fraction; decimals of up to 7 digits
    and Fractions are kept as given."""
    denominator = data.draw(st.integers(1, 10**6))
    intended = Fraction(data.draw(st.integers(1, denominator)), denominator)
    noisy = nudged(float(intended), data.draw(st.integers(-256, 256)))
    assert exact_ratio(noisy, "test") == intended
    digits = data.draw(st.integers(1, 7))
    typed = Fraction(data.draw(st.integers(1, 10**digits)), 10**digits)
    assert exact_ratio(float(typed), "test") == typed
    exact = data.draw(st.fractions(min_value=Fraction(1, 10**12), max_value=1, max_denominator=10**15))
    assert exact_ratio(exact, "test") == exact


def test_shifted_cosine_and_user_arithmetic_keep_their_intended_capacity():
    assert schedules.ShiftedCosine()(2, 4) > 0.25  # the noise this guards against (0.25000000000000006 or so)
    assert exact_ratio(3 * 0.1 / 0.3, "test") == 1  # 1.0000000000000002: noise above 1 is not refused
    routed = modpass.transform(models.NanoGPT(layers=4).eval(), {"a": schedules.ShiftedCosine(), "b": 0.1 * 3},
                               layers="all")
    ratios = {b.index: b.ratios for b in modpass.routing_plan_of(routed).blocks}
    assert ratios[2] == {"a": Fraction(1, 4), "b": Fraction(3, 10)}
    with torch.no_grad():
        routed(torch.randint(0, 61, (1, 20)), task="a")
    assert routed.h[2].last_routing[0].index.shape == (1, 5)  # ceil(20 / 4), not 6


def test_numpy_scalars_are_ratios_like_floats():
    np = pytest.importorskip("numpy")
    model = models.NanoGPT(layers=4).eval()
    want = modpass.routing_plan_of(modpass.transform(model, {"a": [1.0, 0.5, 0.25, 0.1], "b": 0.3}, layers="all")).blocks
    for kind in (np.float64, np.float32, np.float16):
        ratios = {"a": [kind(1.0), kind(0.5), kind(0.25), kind(0.1)], "b": kind(0.3)}
        routed = modpass.transform(model, ratios, layers="all")
        assert modpass.routing_plan_of(routed).blocks == want, kind
    routed = modpass.transform(model, np.float32(0.5))
    modpass.set_ratios(routed, np.float32(0.1))
    assert modpass.routing_plan_of(routed).blocks[0].ratios == {"default": Fraction(1, 10)}


@pytest.mark.parametrize("name", ["training", "forward", "keys", "eval", "to", "cuda", "half", "__init__", "_modules"])
def test_task_names_that_shadow_the_router_containers_attributes_are_refused(name):
    with pytest.raises(modpass.ConfigError, match=rf"task name '{name}' is an attribute of nn.ModuleDict.*rename"):
        modpass.transform(models.NanoGPT(layers=2).eval(), {name: 0.5, "b": 0.5})


def test_the_reserved_task_names_are_exactly_the_router_containers_attributes():
    routers = nn.ModuleDict()
    for name in dir(routers):
        with pytest.raises(modpass.ConfigError, match="attribute of nn.ModuleDict"):
            check_task_name(name)
    for name in ("t2i", "mmu", "default", "train_task", "text", "image", "T"):
        routers[check_task_name(name)] = nn.Linear(1, 1)  # what the routed blocks do with them


@pytest.mark.parametrize("ratios, where", [({"a": [0.25, 0.5, 0.25, 0.5]}, r"ratios\['a'\] gives 0.25 at block 0 \(and below 1.0 at blocks \[2\]\)"),
                                           ({"a": schedules.LastN(0.25, n=4)}, r"the schedule for task 'a' gives 0.25 at block 0")])
def test_a_per_block_ratio_at_a_block_layers_does_not_route_is_refused(ratios, where):
    model = models.NanoGPT(layers=4).eval()
    with pytest.raises(modpass.ConfigError, match=where + r".*, but layers='every_other' does not route block 0.*layers='all'.*1.0 at block 0"):
        modpass.transform(model, ratios)
    # 1.0 where layers routes nothing is no conflict: MoD's Interleaved schedule matches every_other.
    routed = modpass.transform(model, {"a": schedules.Interleaved(0.25), "b": [1.0, 0.5, 1.0, 1.0]})
    assert [b.index for b in modpass.routing_plan_of(routed).blocks] == [1, 3]
    with pytest.raises(modpass.ConfigError, match=r"gives 0.5 at block 2, but this model routes only blocks \[1, 3\].*Transform the original model again"):
        modpass.set_ratios(routed, {"a": 0.5, "b": [1.0, 0.5, 0.5, 1.0]})


@pytest.mark.parametrize("call, match", [
    (lambda model: modpass.transform(model, 0.5, gate=["tanh"]), r"gate \['tanh'\] is unknown"),
    (lambda model: modpass.set_decoding(modpass.transform(model, 0.5), ["all"]), r"decoding must be one of \['all', 'router'\], got \['all'\]"),
    (lambda model: modpass.transform(model, {"a": schedules.Interleaved(0.5, period=0)}), "Interleaved: period must be an integer >= 1, got 0"),
    (lambda model: modpass.transform(model, {"a": schedules.LastN(1.5, n=2)}), r"LastN: ratio 1.5 is outside \(0, 1\]"),
    (lambda model: modpass.transform(model, {"a": lambda i: 0.5}, layers="all"), r"schedule for task 'a' .* cannot be called as schedule\(block_index, num_blocks\)"),
    (lambda model: modpass.transform(model, {"a": {"x": 0.5}}), r"ratios\['a'\] is \{'x': 0.5\} \(dict\); give a number"),
])
def test_malformed_arguments_are_config_errors(call, match):
    with pytest.raises(modpass.ConfigError, match=match):
        call(models.NanoGPT(layers=4).eval())


def test_set_ratios_suggests_the_per_block_list_that_keeps_a_dense_block_dense():
    routed = modpass.transform(models.NanoGPT(layers=4).eval(), {"a": [1.0, 0.5, 1.0, 0.5], "b": 0.5}, layers="all")
    with pytest.raises(modpass.PlanError, match=r"Transform the original model again.*1.0 at block\(s\) \[0, 2\], such as "
                                                r"\{'a': \[1.0, 0.25, 1.0, 0.25\]\}"):
        modpass.set_ratios(routed, {"a": 0.25, "b": 0.5})
    modpass.set_ratios(routed, {"a": [1.0, 0.25, 1.0, 0.25], "b": 0.5})  # the suggestion works


def test_route_mask_tokens_outside_the_mask_are_always_processed():
    routed = modpass.transform(models.NanoGPT().eval(), 0.25, layers=[1])
    models.randomise_routers(routed, seed=3, biases=True)
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[:, 4:] = True  # 16 routable image tokens, 4 text tokens always kept
    mask[2, 4:12] = False  # another row with 8 routable tokens
    with torch.no_grad():
        routed(idx=torch.randint(0, 61, (3, 20)), route_mask=mask)
    records = routed.h[1].last_routing
    kept = {}
    for record in records:
        for row, index in zip(record.rows.tolist(), record.index):
            kept[row] = set(index.tolist())
    for row in range(3):
        fixed = set((~mask[row]).nonzero().flatten().tolist())
        assert fixed <= kept[row]
        assert len(kept[row]) == len(fixed) + math.ceil(0.25 * int(mask[row].sum()))


@settings(max_examples=60)
@given(data=st.data())
def test_row_capacities_keep_the_outside_tokens_and_route_a_ratio_of_the_others(data):
    tokens = data.draw(st.integers(1, 20))
    mask = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=tokens, max_size=tokens), min_size=1, max_size=4)))
    ratio = data.draw(st.fractions(min_value=Fraction(1, 100), max_value=1))
    inside = mask.sum(1).tolist()
    want = [tokens - n + (routing.capacity(n, ratio.numerator, ratio.denominator) if n else 0) for n in inside]
    assert routing.row_capacities(mask, ratio.numerator, ratio.denominator).tolist() == want


@settings(max_examples=60)
@given(data=st.data())
def test_select_tokens_per_row_puts_each_rows_own_selection_first(data):
    """Row b's first capacity[b] slots are select_tokens at capacity[b]; the rest are the next-ranked tokens."""
    batch, tokens = data.draw(st.integers(1, 4)), data.draw(st.integers(2, 24))
    # Small integers: plenty of ties, which break by position.
    scores = torch.tensor(data.draw(st.lists(st.integers(-3, 3), min_size=batch * tokens, max_size=batch * tokens)),
                          dtype=torch.float32).view(batch, tokens)
    capacities = data.draw(st.lists(st.integers(1, tokens), min_size=batch, max_size=batch))
    k = data.draw(st.integers(max(capacities), tokens))
    index, extra = routing.select_tokens_per_row(scores, k, torch.tensor(capacities))
    assert index.shape == extra.shape == (batch, k)
    for row, own in enumerate(capacities):
        chosen = routing.select_tokens(scores[row : row + 1], own)[0].tolist()
        assert index[row, :own].tolist() == chosen and not extra[row, :own].any()
        assert extra[row, own:].all()
        widest = routing.select_tokens(scores[row : row + 1], k)[0].tolist()
        assert index[row, own:].tolist() == sorted(set(widest) - set(chosen))


def test_hide_extra_slots_forbids_their_keys_but_to_themselves():
    extra = torch.tensor([[False, True, False, True]])
    causal = torch.ones(4, 4, dtype=torch.bool).tril().expand(1, 1, 4, 4)
    hidden = routing.hide_extra_slots(causal, extra, (2, 3))
    want = causal.clone()
    want[..., [1, 3]] = False
    want[..., [1, 3], [1, 3]] = True
    assert torch.equal(hidden, want)
    additive = torch.where(causal, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(routing.hide_extra_slots(additive, extra, (2, 3)) == 0, want)
    keys = torch.ones(1, 4, dtype=torch.bool)
    assert routing.hide_extra_slots(keys, extra, (1,)).tolist() == [[True, False, True, False]]


@pytest.mark.parametrize("gate", ["tanh", "sigmoid", "string"])
def test_gates_follow_their_formulas(gate):
    routed = modpass.transform(models.NanoGPT().eval(), 0.5, layers=[1], gate=gate)
    models.randomise_routers(routed, seed=1, biases=True)
    block = routed.h[1]
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        out = block(x)
        (record,) = block.last_routing
        selected = torch.zeros(2, 12, dtype=torch.bool).scatter(1, record.index, True)
        y = block._block(torch.gather(x, 1, record.index.unsqueeze(-1).expand(-1, -1, 32)))
    logits = record.logits
    w_all = torch.sigmoid(logits) if gate == "sigmoid" else 1 + 0.2 * torch.tanh(logits)
    w = torch.gather(w_all, 1, record.index).unsqueeze(-1)
    x_sel = x[selected].view(2, 6, 32)
    torch.testing.assert_close(out[selected].view(2, 6, 32), x_sel + w * (y - x_sel))
    expected_skipped = (w_all.unsqueeze(-1) * x)[~selected] if gate == "string" else x[~selected]
    torch.testing.assert_close(out[~selected], expected_skipped)


def test_training_reduces_loss_and_reaches_the_routers():
    torch.manual_seed(0)
    routed = modpass.transform(models.NanoGPT().train(), TASKS, layers="every_other", aux_loss_weight=0.01)
    optimizer = torch.optim.AdamW(routed.parameters(), lr=3e-3)
    idx = torch.randint(0, 61, (4, 24))
    tasks = ["t2i", "mmu", "t2i", "mmu"]
    losses = []
    for step in range(8):
        logits = routed(idx=idx[:, :-1], task=tasks)
        loss = F.cross_entropy(logits.reshape(-1, 61), idx[:, 1:].reshape(-1)) + modpass.aux_loss(routed)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            grads = [p.grad for n, p in routed.named_parameters() if "mod_routers" in n and n.endswith("weight")]
            assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_aux_loss_is_bce_against_topk_membership():
    routed = modpass.transform(models.NanoGPT().eval(), 0.5, layers=[1], aux_loss_weight=0.5)
    models.randomise_routers(routed, seed=2, biases=True)
    routed(idx=torch.randint(0, 61, (2, 10)))
    (record,) = routed.h[1].last_routing
    assert record.padding is None, "an unmasked block has no padding flags"
    target = torch.zeros(2, 10).scatter(1, record.index, 1.0)
    want = 0.5 * F.binary_cross_entropy_with_logits(record.logits, target)
    torch.testing.assert_close(modpass.aux_loss(routed), want)
    plain = modpass.transform(models.NanoGPT().eval(), 0.5)
    plain(idx=torch.randint(0, 61, (2, 10)))
    assert modpass.aux_loss(plain).item() == 0.0


def test_a_block_called_twice_in_a_forward_trains_its_router_on_both_calls():
    routed = modpass.transform(models.LoopedGPT().eval(), 0.5, layers=[1], aux_loss_weight=1.0)
    models.randomise_routers(routed, seed=4, biases=True)
    idx = torch.randint(0, 61, (2, 10))

    def step(model):
        model(idx)
        records = routed.h[1].last_routing
        loss = modpass.aux_loss(routed)
        return records, loss, torch.autograd.grad(loss, routed.h[1].mod_routers.default.weight)

    records, loss, grad = step(routed)
    assert len(records) == 2 and not torch.equal(records[0].logits, records[1].logits), "one record per call"
    targets = [torch.zeros(2, 10).scatter(1, r.index, 1.0) for r in records]
    per_token = torch.cat([F.binary_cross_entropy_with_logits(r.logits, t, reduction="none") for r, t in zip(records, targets)])
    torch.testing.assert_close(loss, per_token.mean())
    assert len(step(routed)[0]) == 2, "the next forward starts afresh"
    compiled = step(torch.compile(routed, backend="modpass", fullgraph=True))
    torch.testing.assert_close(compiled[1], loss)
    torch.testing.assert_close(compiled[2], grad)
    with modpass.dense(routed):
        routed(idx)
    with pytest.warns(UserWarning, match=r"aux_loss\(\) is 0: the model's last forward ran inside modpass.dense"):
        assert routed.h[1].last_routing == [] and modpass.aux_loss(routed).item() == 0.0
    routed.h[1](torch.randn(2, 10, 32))
    routed.h[1](torch.randn(2, 10, 32))
    assert len(routed.h[1].last_routing) == 1, "a block called on its own keeps its last call"


def test_a_block_called_on_its_own_routes_with_the_default_task_not_the_last_model_calls():
    """A block called outside its model's forward (to inspect a layer) took the task and route mask of the model's
    last call, silently; now it takes the model's defaults (modpass.default_task), as a model call that gives none."""
    routed = models.randomise_routers(modpass.transform(models.NanoGPT(), {"a": 0.25, "b": 0.75}, layers="all"), seed=0)
    ids = torch.randint(0, 61, (2, 7))
    seen = {}
    handle = routed.h[0].register_forward_hook(lambda module, args, output: seen.setdefault("output", output))
    with torch.no_grad():
        routed(ids, task="b")
        handle.remove()
        routed(torch.randint(0, 61, (2, 12)), task="a", route_mask=torch.ones(2, 12, dtype=torch.bool))
        hidden = routed.embed(ids)  # 7 tokens: the last call's route mask over 12 does not fit them
        with pytest.raises(modpass.RoutingInputError, match=r"a routed block called on its own\), set one with modpass.default_task"):
            routed.h[0](hidden)
        with modpass.default_task(routed, "b"):
            torch.testing.assert_close(routed.h[0](hidden), seen["output"], rtol=0, atol=0)
        with modpass.default_task(routed, "a"):
            routed.h[0](hidden)
    assert routed.h[0].last_routing[0].index.shape == (2, 2), "k = ceil(0.25 * 7), task a's"


def test_default_task_and_dense_contexts_that_close_out_of_order_leave_nothing_behind():
    """Each context restored the value it found on entry: closed out of order (generators, coroutines), the last one
    to close restored a stale default task, or left the model dense, and later calls routed so, silently."""
    routed = modpass.transform(models.NanoGPT(), {"a": 0.25, "b": 0.75}, layers="all")
    ids = torch.randint(0, 61, (2, 7))
    first, second = modpass.default_task(routed, "a"), modpass.default_task(routed, "b")
    first.__enter__(), second.__enter__()
    first.__exit__(None, None, None)
    with torch.no_grad():
        routed(ids)
        assert routed.h[0].last_routing[0].index.shape == (2, 6), "k = ceil(0.75 * 7): b's, the context still open"
        second.__exit__(None, None, None)
        with pytest.raises(modpass.RoutingInputError, match="this model routes several tasks"):
            routed(ids)
        first, second = modpass.dense(routed), modpass.dense(routed)
        first.__enter__(), second.__enter__()
        first.__exit__(None, None, None)
        second.__exit__(None, None, None)
        routed(ids, task="a")
    assert routed.h[0].last_routing, "routed again, not dense"


def test_a_default_task_context_held_by_another_thread_is_refused():
    """The default is the model's, read by every thread's calls: a thread inside its own context routed with the other
    thread's task, silently, although their calls were serialised."""
    routed = modpass.transform(models.NanoGPT(), {"a": 0.25, "b": 0.75}, layers="all")
    entered, release = threading.Event(), threading.Event()

    def hold():
        with modpass.default_task(routed, "a"):
            entered.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait(10)
    try:
        with pytest.raises(modpass.RoutingInputError, match=r"another thread holds a default_task context on this model \(task 'a'\)"), \
                modpass.default_task(routed, "b"):
            pass
    finally:
        release.set()
        holder.join()
    with modpass.default_task(routed, "b"):
        pass


def test_a_copy_made_inside_a_context_routes_as_the_model_does_outside_it():
    """The contexts' settings were copied and pickled with the model: a deep copy (an EMA model) made inside
    modpass.dense stayed dense for good, one made inside default_task kept its default."""
    torch.manual_seed(0)
    routed = models.randomise_routers(modpass.transform(models.NanoGPT().eval(), {"a": 0.25, "b": 0.75}, layers="all"), seed=0)
    ids = torch.randint(0, 61, (2, 7))
    with modpass.dense(routed):
        dense_copy = copy.deepcopy(routed)
    with modpass.default_task(routed, "b"):
        task_copy = pickle.loads(pickle.dumps(routed))
    with torch.no_grad():
        torch.testing.assert_close(dense_copy(ids, task="a"), routed(ids, task="a"), rtol=0, atol=0)
        with pytest.raises(modpass.RoutingInputError, match="this model routes several tasks"):
            task_copy(ids)


def test_a_task_or_route_mask_given_with_a_call_must_fit_its_batch_even_when_it_is_the_default_object():
    """The default's per-prompt repeat was chosen by comparing the given object with the default by identity."""
    routed = modpass.transform(models.NanoGPT(), {"a": 0.25, "b": 0.75}, layers="all")
    tasks, ids = ["a", "b"], torch.randint(0, 61, (4, 7))
    with modpass.default_task(routed, tasks):
        routed(ids)  # the default covers each prompt's repeats
        with pytest.raises(modpass.RoutingInputError, match="task lists 2 entries but the batch has 4 sequences"):
            routed(ids, task=tasks)


def test_aux_loss_leaves_out_padding_even_when_it_fills_top_k_slots():
    routed = modpass.transform(models.llama(layers=2), 0.6, layers=[1], aux_loss_weight=1.0)
    models.randomise_routers(routed, seed=3, biases=True)
    ids = torch.randint(0, 97, (2, 5))
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        routed(input_ids=ids, attention_mask=mask)
    (record,) = routed.model.layers[1].last_routing
    assert torch.equal(record.padding, mask == 0)
    # k = 3 but row 0 has 2 real tokens: one padding token fills a slot and is no target at all.
    target = torch.zeros(2, 5).scatter(1, record.index, 1.0)
    assert target[0, 3:].tolist() == [1.0, 1.0] and target[0, :3].sum() == 1
    assert torch.equal(record.selected, target.bool() & (mask == 1)), "the padding in a slot was not selected work"
    per_token = F.binary_cross_entropy_with_logits(record.logits, target, reduction="none")
    torch.testing.assert_close(modpass.aux_loss(routed), per_token[mask == 1].mean())


def test_save_load_round_trip_is_bit_exact(two_task, tmp_path):
    modpass.save(two_task, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "routers.safetensors"]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["tasks"] == ["t2i", "mmu"] and plan["gate"] == "tanh" and "torch" in plan["versions"]
    base = models.NanoGPT().eval()
    base.load_state_dict({k: v for k, v in two_task.state_dict().items() if "mod_routers" not in k})
    loaded = modpass.load(base, tmp_path)
    assert not any(isinstance(m, modpass.RoutedBlock) for m in base.modules())
    for key, value in two_task.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    idx = torch.randint(0, 61, (3, 14))
    with torch.no_grad():
        assert torch.equal(loaded(idx=idx, task=["mmu", "t2i", "mmu"]), two_task(idx=idx, task=["mmu", "t2i", "mmu"]))


def test_load_refuses_plans_that_do_not_fit(two_task, tmp_path):
    modpass.save(two_task, tmp_path)
    shallow = models.NanoGPT(layers=2).eval()
    with pytest.raises(modpass.PlanError, match="4 blocks"):
        modpass.load(shallow, tmp_path, inplace=True)
    assert not any(isinstance(m, modpass.RoutedBlock) for m in shallow.modules())
    with pytest.raises(modpass.PlanError, match="width"):
        modpass.load(models.NanoGPT(width=48).eval(), tmp_path)
    (tmp_path / "routers.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(modpass.PlanError):
        modpass.load(models.NanoGPT().eval(), tmp_path)
    with pytest.raises(modpass.PlanError, match="no plan.json"):
        modpass.load(models.NanoGPT().eval(), tmp_path / "missing")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "pass task="),
        ({"task": "video"}, "unknown task 'video'"),
        ({"task": ["t2i"]}, "one task per sequence"),
        ({"task": torch.tensor([0, 5])}, "out of range"),
        ({"task": torch.tensor([0, 1], device="meta")}, "task ids on the meta device"),  # a raw copy error until the 11th session
        ({"task": torch.tensor([0.0, 1.0])}, "integer"),
        ({"task": "t2i", "route_mask": torch.ones(2, 5)}, "bool"),
        ({"task": "t2i", "route_mask": torch.ones(2, 4, dtype=torch.bool)}, "shape.*If this block runs over another sequence"),
    ],
)
def test_bad_routing_inputs_are_refused(two_task, kwargs, match):
    with pytest.raises(modpass.RoutingInputError, match=match):
        two_task(idx=torch.randint(0, 61, (2, 5)), **kwargs)
