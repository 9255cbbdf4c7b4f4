"""PEFT on a routed model: LoRA inside routed blocks, routers trained as ``modules_to_save``, and what is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import modpass
from tests import models
from tests.test_equivalence import close_to_dense

ROUTERS = ["mod_routers.default"]


@pytest.fixture(scope="module")
def routed():
    torch.manual_seed(0)
    return modpass.transform(models.llama(layers=2), 0.5, layers=[1])


def lora(**settings) -> LoraConfig:
    """LoRA on every Linear, with updates that are not zero from the start (so leaving one out shows)."""
    return LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, **settings)


def test_lora_and_routers_trained_with_peft_run_in_routed_calls(routed, tmp_path):
    """The LoRA layers inside a routed block and the router copies PEFT trains are what routed calls run: the wrapped
    model equals its merge, ``disable_adapter()`` gives the model before PEFT, and save, flops and set_ratios reach
    through PEFT's wrapper."""
    before = copy.deepcopy(routed)
    model = get_peft_model(copy.deepcopy(routed), lora(exclude_modules=ROUTERS, modules_to_save=ROUTERS), adapter_name="lora")
    ids = torch.randint(0, 97, (2, 12))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    model.eval()
    wrapper = model.base_model.model.model.layers[1].mod_routers.default
    trained, original = wrapper.modules_to_save.lora, wrapper.original_module
    assert trained.weight.abs().sum() > 0, "the router copy trained"
    assert original.weight.abs().sum() == 0

    with torch.no_grad():
        wrapped = model(input_ids=ids).logits
        with pytest.warns(UserWarning, match="adapters of routed blocks changed state"), model.disable_adapter():
            close_to_dense(model(input_ids=ids).logits, before(input_ids=ids).logits)
        saved = load_file(str(modpass.save(model, tmp_path) / "routers.safetensors"))
        assert torch.equal(saved["model.layers.1.mod_routers.default.weight"], trained.weight)
        merged = model.merge_and_unload()
        assert type(merged.model.layers[1].mod_routers.default) is torch.nn.Linear
        close_to_dense(merged(input_ids=ids).logits, wrapped)

    (dense_flops, routed_flops), = modpass.flops(model, {"input_ids": ids}).blocks["model.layers.1"].values()
    assert routed_flops < dense_flops
    modpass.set_ratios(model, 0.25)
    assert modpass.routing_plan_of(merged).block("model.layers.1").ratios == {"default": 0.25}


def test_an_adapter_named_as_a_task_is_warned_of_before_its_router_copies_are_saved_under_other_names(routed, tmp_path):
    model = get_peft_model(copy.deepcopy(routed), lora(exclude_modules=ROUTERS, modules_to_save=ROUTERS))  # "default"
    with pytest.warns(UserWarning, match="PEFT adapter 'default' has the name of a task"):
        model(input_ids=torch.randint(0, 97, (2, 12)))
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mod_routers.weight" in saved, "what the warning says PEFT does"


def test_lora_on_routers_is_refused_with_the_settings_that_train_them(routed):
    model = get_peft_model(copy.deepcopy(routed), lora())
    with pytest.raises(modpass.RouterError, match=r"LoRA.*exclude_modules=\['mod_routers.default'\], modules_to_save.*adapter_name="):
        model(input_ids=torch.randint(0, 97, (2, 12)))


def test_a_batch_mixing_peft_adapters_is_refused_and_runs_dense(routed):
    model = get_peft_model(copy.deepcopy(routed), lora(exclude_modules=ROUTERS), adapter_name="first").eval()
    model.add_adapter("second", lora(exclude_modules=ROUTERS))
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad(), pytest.raises(modpass.RoutingInputError, match="mixes adapters"):
        model(input_ids=ids, adapter_names=["first", "second"])
    with torch.no_grad(), modpass.dense(model):
        mixed = model(input_ids=ids, adapter_names=["first", "second"]).logits
        model.set_adapter("second")
        second = model(input_ids=ids).logits
    close_to_dense(mixed[1], second[1])


def test_prefix_tuning_is_refused_in_training_and_runs_every_token_otherwise(routed):
    """PEFT's prefix tuning hands every call a cache holding its virtual tokens: the call's tokens run the routed layers
    as generated tokens do (only a call into an empty cache layer is routed), so training is refused."""
    from peft import PrefixTuningConfig, TaskType

    model = get_peft_model(copy.deepcopy(routed), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    ids = torch.randint(0, 97, (2, 12))
    model.train()
    with pytest.raises(modpass.RoutingInputError, match="holds 4 keys that modpass did not route.*prefix tuning"):
        model(input_ids=ids, labels=ids)
    model.eval()
    with torch.no_grad():
        with pytest.warns(UserWarning, match="holds 4 keys that modpass did not route"):
            prefixed = model(input_ids=ids).logits
        with modpass.dense(model):
            close_to_dense(prefixed, model(input_ids=ids).logits)
