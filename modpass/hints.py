"""Pointers that refusals add where a known setting of the model would make it routable."""

from __future__ import annotations

from torch import nn


def batch_wide_experts_hint(module: nn.Module) -> str:
    """A pointer to per-token dispatch for a refused model or block with transformers' mixture-of-experts layers.

    transformers dispatches experts by a setting of the model (the forward of
    its experts classes is a wrapper in ``transformers/integrations/moe.py``
    that reads ``config._experts_implementation``): ``grouped_mm`` sorts the
    whole batch's tokens by expert and ``eager`` loops over the experts
    present, both refused, while ``batched_mm`` handles each token on its own
    and routes.
    """
    settings = {getattr(getattr(m, "config", None), "_experts_implementation", None) for m in module.modules() if dispatches_experts(m)}
    settings -= {None, "batched_mm"}
    if not settings:
        return ""
    return (
        f" The experts here use transformers' {', '.join(map(repr, sorted(settings)))} dispatch, which handles the batch's "
        "tokens together; model.set_experts_implementation('batched_mm') (or experts_implementation='batched_mm' in "
        "the config) dispatches each token on its own, which modpass can route."
    )


def dispatches_experts(module: nn.Module) -> bool:
    """Whether ``module``'s forward is transformers' experts dispatch (the same file from 5.17 to 5.25 at least)."""
    code = getattr(type(module).forward, "__code__", None)
    return code is not None and code.co_filename.replace("\\", "/").endswith("transformers/integrations/moe.py")


#: Why each TorchScript entry point cannot take a routed block.
_TORCHSCRIPT_FAILS = {
    "trace": "torch.jit.trace would fix at the example's length",
    "script": "torch.jit.script cannot compile",
}


def torchscript_refusal(where: str, entry: str) -> str:
    """The refusal of TorchScript's ``entry`` (``"trace"``: ``torch.jit.trace``, and the ONNX exporter without
    ``dynamo=True``, which traces as it does; ``"script"``: ``torch.jit.script``) for the routed model or block at
    ``where``."""
    return (f"{where}: TorchScript cannot hold a routed block: its capacity (k = ceil(ratio * T)) and the choice of its "
            f"captured graphs are Python, which {_TORCHSCRIPT_FAILS[entry]}. Serve with torch.export, AOTInductor or "
            "ONNX (torch.onnx.export(..., dynamo=True); see docs/serving.md in the modpass repository), or run with "
            "torch.compile.")
