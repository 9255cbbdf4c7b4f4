"""``torch.compile(model, backend="modpass")``.

Registered through the ``torch_dynamo_backends`` entry point, so no import is
needed. Options (``torch.compile(..., options={...})``):

* ``"inductor"``: a dict of Inductor config patches, passed on unchanged;
* ``"ratios"`` / ``"layers"`` / ``"within"`` / ``"gate"``: route an *unrouted* model's blocks
  in the Dynamo graph with fresh identity-gated routers (for measuring speed
  and equivalence before training);
* ``"plan"``: route an unrouted model with a plan and router weights saved
  by ``modpass.save`` (``"task"`` picks the task of a multi-task plan).

A model already routed by ``modpass.transform`` needs no options: its routed
regions are in the graph Dynamo traced. Without routing options an unrouted
model compiles exactly as with ``backend="inductor"``.
"""

from __future__ import annotations

import torch

from ._compat import inductor_mode_options
from .errors import ConfigError
from .passes.lower import lower

ROUTING_OPTIONS = ("ratios", "layers", "within", "gate", "plan", "task")
OPTIONS = ("inductor", *ROUTING_OPTIONS)


def modpass_backend(gm: torch.fx.GraphModule, example_inputs, *, options: dict | None = None, mode: str | None = None):
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown modpass backend option(s) {unknown}; known: {list(OPTIONS)}. Inductor settings go under options={{'inductor': {{...}}}}.")
    if any(key in options for key in ROUTING_OPTIONS):
        from .graph_routing import route_dynamo_graph

        gm = route_dynamo_graph(gm, example_inputs, options)
    return lower(gm, example_inputs, {**inductor_mode_options(mode), **options.get("inductor", {})})


def ensure_registered() -> None:
    """Register the backend when the entry point is missing (a source checkout that was not pip-installed).

    Registering unconditionally would clash with the lazily loaded entry point
    (``AssertionError: duplicate name``), so only an absent name is added.
    """
    from torch._dynamo import list_backends, register_backend

    if "modpass" not in list_backends(exclude_tags=()):
        register_backend(compiler_fn=modpass_backend, name="modpass")
