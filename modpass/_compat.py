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
