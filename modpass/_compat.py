"""Every private torch import modpass relies on, in one place (they change between releases)."""

from __future__ import annotations


def compile_fx(gm, example_inputs, config_patches: dict):
    from torch._inductor.compile_fx import compile_fx as inductor_compile_fx

    return inductor_compile_fx(gm, example_inputs, config_patches=config_patches)


def inductor_mode_options(mode: str | None) -> dict:
    if mode in (None, "default"):
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


def outside_dynamo_tracing():
    """A context in which torch.export can run from inside a Dynamo backend.

    Dynamo's tracing context is still active while a backend runs; an export
    started there would add its own guards to the frame being compiled.
    """
    from torch._guards import tracing

    return tracing(None)
