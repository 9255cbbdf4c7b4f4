"""torchao's ``quantize_`` on a routed model: quantized weights run in routed calls, eager and compiled, routers too."""

from __future__ import annotations

import pytest
import torch

import modpass
from tests import models
from tests.test_equivalence import close_to_dense

try:  # torchao 0.18 fails to import on torch 2.6, with errors other than ImportError
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
except Exception as exc:
    pytest.skip(f"torchao does not import here: {exc!r}", allow_module_level=True)


def routed_llama(ratio: float, *, random_routers: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A Llama, routed and dense; random routers make a router left unquantized or misread show."""
    torch.manual_seed(0)
    dense = models.llama(layers=2).eval()
    routed = modpass.transform(dense, ratio)
    for name, parameter in routed.named_parameters():
        if "mod_routers" in name and random_routers:
            parameter.data.normal_()
    return routed, dense


def test_weights_quantized_after_transform_run_in_routed_calls_routers_included(tmp_path):
    """``quantize_`` swaps each Linear's weight for a quantized tensor subclass, routers included: the blocks capture
    their graphs again, and the routers' scores come from their quantized weights, eager and compiled. Until the
    second session of 2026-12-06 the first routed call failed inside the graph captured with the float weights.
    ``modpass.save`` refuses quantized routers, which safetensors cannot write, and names the filter leaving them out."""
    ids = torch.randint(0, 97, (2, 12))
    quantized, dense = routed_llama(0.5, random_routers=True)
    quantize_(quantized, Int8WeightOnlyConfig())
    routers = dict(quantized.model.layers[1].mod_routers.named_parameters())
    assert type(routers["default.weight"]).__name__ == "Int8Tensor"

    # The reference quantizes the blocks before routing and holds the dequantized router weights as plain tensors.
    reference, _ = routed_llama(0.5, random_routers=True)
    quantize_(reference, Int8WeightOnlyConfig(), filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and "mod_routers" not in name)
    for path in modpass.routed_blocks(reference):
        for task_router, quantized_router in zip(reference.get_submodule(path).mod_routers.values(),
                                                 quantized.get_submodule(path).mod_routers.values()):
            task_router.weight.data = quantized_router.weight.dequantize()
    with torch.no_grad():
        want = reference(ids).logits
        close_to_dense(quantized(ids).logits, want)
        close_to_dense(torch.compile(quantized, fullgraph=True)(ids).logits, want)
        assert (want - dense(ids).logits).abs().max() > 1e-2, "routing at 0.5 changed the output"
    with pytest.raises(modpass.RouterError, match="mod_routers' not in name"):
        modpass.save(quantized, tmp_path)
    modpass.save(reference, tmp_path)  # quantized with that filter


def test_dynamic_activation_quantization_at_full_capacity_equals_the_quantized_dense_model():
    """Eager (compiled, it equals the compiled quantized dense model, 6e-8 by hand: activations rounded in another
    order land a step apart, so compiled is not compared with eager)."""
    ids = torch.randint(0, 97, (2, 12))
    routed, dense = routed_llama(1.0, random_routers=False)
    for model in (routed, dense):
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    with torch.no_grad():
        close_to_dense(routed(ids).logits, dense(ids).logits)
