"""Stage 1, ``capture``: trace the whole model into an FX graph.

Expects: an ``nn.Module`` and example inputs (positional tuple or keyword dict).
Guarantees: a ``GraphModule`` (from non-strict ``torch.export``) whose nodes
carry ``nn_module_stack`` (module paths relative to the model, and classes; in the subgraphs that
run code under ``no_grad`` or ``autocast`` too)
and ``val`` fake tensors whose sizes are symbols wherever the model allows
them to vary. Every tensor dimension larger than 1 is exported as
``Dim.AUTO``, so the sequence length becomes a symbol when the model lets it
vary, and sizes that merely happen to be equal are never unified.

``gm.meta["modpass_traced_calls"]`` maps each submodule path to the
``(args, kwargs)`` of its first call while tracing (fake tensors). Models
often call their layers differently when traced than in eager mode (Hugging
Face materialises a 4-D causal mask instead of passing None), and Dynamo
sees the traced form, so routed blocks are prepared for both.

The model is not modified.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .._export import FlatCall, first_calls, first_user_frame
from .._subgraphs import graphs
from ..errors import CaptureError
from ..hints import batch_wide_experts_hint


def capture(model: torch.nn.Module, example_inputs) -> torch.fx.GraphModule:
    """Export ``model`` on ``example_inputs`` with symbolic sizes; see the module docstring."""
    args, kwargs = ((), dict(example_inputs)) if isinstance(example_inputs, Mapping) else (tuple(example_inputs), {})
    wrapper, tensors = FlatCall.wrap(model, args, kwargs)
    try:
        with first_calls((path, module) for path, module in model.named_modules() if path) as calls:
            gm = wrapper.export(tensors).module()
    except Exception as exc:  # torch raises many unrelated types here
        raise CaptureError(
            f"could not capture {type(model).__name__} with torch.export (non-strict): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (at {first_user_frame(exc)}). "
            "modpass needs a model whose forward traces with symbolic sizes: data-dependent Python "
            "control flow on tensor values must be replaced by tensor ops (torch.where, torch.cond), "
            "and example_inputs must match how the model is called. Where that code is outside the transformer "
            "blocks (an image tokenizer), example_inputs that skip it (token ids only) capture the same blocks, and the "
            "routed model still takes the model's other inputs." + batch_wide_experts_hint(model)
        ) from exc
    gm.meta["modpass_traced_calls"] = calls
    for node in (node for graph in graphs(gm) for node in graph.nodes):
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: (path.removeprefix(FlatCall.PREFIX) if path != FlatCall.PREFIX.rstrip(".") else "", cls)
                for key, (path, cls) in stack.items()
            }
    return gm
