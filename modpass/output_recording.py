"""Hidden states of routed layers for Hugging Face's output recorder (``output_hidden_states=True``).

transformers 5 collects hidden states with forward hooks on the modules its
models name by class (``_can_record_outputs = {"hidden_states": LlamaDecoderLayer}``).
A routed block is a ``RoutedBlock``, so no hook would find it: the routed
layers' states would go missing from ``output_hidden_states``, silently, and
a model that picks a layer's states by index (Llava's ``vision_feature_layer``)
would read another layer. :func:`record_hidden_states` gives each routed block
the hook its original block would have had, built by transformers itself
(where transformers had hooked the model before it was routed, the routed block
took over its block's hook instead: ``RoutedBlock.adopt_hooks``).

Outputs that transformers records from a block's parts (``attentions`` from its
attention module, a sparse-MoE router's ``router_logits``) have no such fix: a
routed call runs the block's captured graph, which runs no hook on a part.
:func:`part_recorded_outputs` names them, so that a call asking for one is refused
(``tasks.take_routing_arguments``) rather than answered without the routed layers.
"""

from __future__ import annotations

from torch import nn


def _capturing_hook(index: int, capture_initial: bool):
    """transformers' own hook for a layer's hidden state at output ``index``."""
    from transformers.utils.output_capturing import install_output_capuring_hook

    holder = nn.Module()
    install_output_capuring_hook(holder, "hidden_states", index, capture_initial)
    (hook,) = holder._forward_hooks.values()
    return hook


class HiddenStateRecorder:
    """A routed block's output-capturing hook; picklable (transformers' hook is a closure, rebuilt on unpickling)."""

    def __init__(self, index: int, capture_initial: bool) -> None:
        self.index, self.capture_initial = index, capture_initial
        self.hook = _capturing_hook(index, capture_initial)

    def __call__(self, module, args, output):
        return self.hook(module, args, output)

    def __getstate__(self) -> dict:
        return {"index": self.index, "capture_initial": self.capture_initial}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def recorded_specs(owner: nn.Module, key: str) -> list[tuple[type | None, str | None, str | None, int, bool]]:
    """``(class, class-name suffix, layer name, output index, capture the first input)`` for each spec by which
    transformers records output ``key`` of ``owner``'s modules."""
    specs = (getattr(type(owner), "_can_record_outputs", None) or {}).get(key)
    result = []
    for spec in specs if isinstance(specs, list) else [specs] if specs is not None else []:
        if isinstance(spec, (type, str)):
            result.append((spec if isinstance(spec, type) else None, spec if isinstance(spec, str) else None, None, 0, True))
        else:  # an OutputRecorder
            result.append((spec.target_class, spec.class_name, spec.layer_name, spec.index,
                           getattr(spec, "capture_initial_hidden_state", True)))
    return result


def owners(model: nn.Module, routed: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The innermost Hugging Face model holding each routed block, whose ``_can_record_outputs`` apply to it (none
    without transformers, or with one that collects outputs in the model's own loop)."""
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import install_output_capuring_hook  # noqa: F401
    except ImportError:
        return {}
    found = {}
    for path in routed:
        parts = path.split(".")
        enclosing = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts))]  # the model, ..., the parent
        owner = next((m for m in reversed(enclosing) if isinstance(m, PreTrainedModel)), None)
        if owner is not None:
            found[path] = owner
    return found


def matches(spec: tuple, module: nn.Module, path: str) -> bool:
    """Whether transformers' recording ``spec`` (see :func:`recorded_specs`) hooks ``module`` at ``path``."""
    target_class, class_name, layer_name = spec[:3]
    name = "." + path  # how transformers names a module when it matches specs: a dot, then the path
    found = (target_class is not None and isinstance(module, target_class)) or (class_name is not None and name.endswith(class_name))
    return found and (layer_name is None or f".{layer_name.strip('.')}." in name + ".")


def record_hidden_states(owned: dict[str, nn.Module], routed: dict[str, nn.Module]) -> None:
    """Hook each routed block as transformers would hook its original block; ``owned`` is :func:`owners` of them
    (nothing for other models)."""
    for path, owner in owned.items():
        if getattr(owner, "_output_capturing_hooks_installed", False):
            continue  # where transformers hooked the model before routing, the block's own hook moved to the routed block
        block = routed[path]
        for spec in recorded_specs(owner, "hidden_states"):
            if matches(spec, block._block, path):
                block.register_forward_hook(HiddenStateRecorder(*spec[3:]))


def part_recorded_outputs(owned: dict[str, nn.Module], routed: dict[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """Each output that transformers records from a part of a routed block: ``{key: (block path, part class)}``, the
    first such part (``attentions``: its attention module; ``router_logits``: its sparse-MoE router); ``owned`` is
    :func:`owners` of the blocks."""
    found = {}
    for path, owner in owned.items():
        for key in getattr(type(owner), "_can_record_outputs", None) or {}:
            if key == "hidden_states" or key in found:
                continue  # the blocks' own states: see record_hidden_states
            specs = recorded_specs(owner, key)
            for name, part in routed[path]._block.named_modules():
                if name and any(matches(spec, part, f"{path}.{name}") for spec in specs):
                    found[key] = (path, type(part).__name__)
                    break
    return found
