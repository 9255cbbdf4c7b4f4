"""Example inputs for capturing a model when the caller gives none.

Hugging Face models name their main input (``main_input_name``) and carry a
config with the sizes needed: token ids and images are built from it, other
main inputs (audio features) need ``example_inputs=``. Other models are
assumed to take token ids first when their first embedding table is an
``nn.Embedding``. Anything else needs ``example_inputs=``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import ConfigError

BATCH = 2
TOKENS = 13  # odd and small; any length >= 2 works, as all sizes are symbolic


def device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "block_size"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def token_ids(vocab: int, limit: int | None, device) -> torch.Tensor:
    tokens = min(TOKENS, limit) if limit else TOKENS
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (BATCH, tokens), generator=generator).to(device)


def example_inputs_for(model: nn.Module) -> dict:
    """Inputs built from the model's config (or its first embedding); ``ConfigError`` where they cannot be guessed."""
    device = device_of(model)
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    inputs: dict = {}
    if config is not None and main == "input_ids":
        # The table the ids index: a composite model's config.vocab_size may be another part's (PaliGemma's).
        embeddings = model.get_input_embeddings()
        vocab = embeddings.num_embeddings if isinstance(embeddings, nn.Embedding) else config.vocab_size
        inputs["input_ids"] = token_ids(vocab, max_positions(config), device)
    elif config is not None and main == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, (tuple, list)) else (size, size)
        channels = getattr(config, "num_channels", 3)
        dtype = next(model.parameters()).dtype
        inputs["pixel_values"] = torch.randn(BATCH, channels, *size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    elif config is not None and main is not None:
        # An Embedding here may be a position table (Whisper's encoder): guessing token ids would feed
        # integers to a model that takes features, and capture would then fail far from the cause.
        raise ConfigError(
            f"cannot guess example inputs for {type(model).__name__}: its main input is {main!r}, and modpass "
            "builds only input_ids and pixel_values from a config; pass example_inputs= with a real batch "
            f"(a dict such as {{{main!r}: tensor}}, batch >= 2 and sequence length >= 2)."
        )
    else:
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        first = next(iter(inspect.signature(model.forward).parameters), None)
        if embedding is None or first is None:
            raise ConfigError(
                f"cannot guess example inputs for {type(model).__name__}; pass example_inputs= (a tuple of "
                "positional inputs or a dict of keyword inputs, batch >= 2 and sequence length >= 2)."
            )
        limit = max_positions(config) if config is not None else getattr(model, "block_size", None)
        inputs[first] = token_ids(embedding.num_embeddings, limit if isinstance(limit, int) else None, device)
    return inputs


def capture_inputs(model: nn.Module, example_inputs: Mapping | tuple | list | torch.Tensor | None) -> Mapping | tuple:
    """The inputs to capture ``model`` with, as keyword or positional ones: ``example_inputs`` (a lone tensor being
    the first positional input), or a guess, with ``use_cache=False`` added where the model takes it.

    A routed model runs without a KV cache (``transform`` turns it off), so
    its blocks are captured as they will be called; with one, export also
    fails on the cache object a Hugging Face model returns.
    """
    inputs = example_inputs_for(model) if example_inputs is None else example_inputs
    if not isinstance(inputs, Mapping):
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(inputs)):
        raise ConfigError(
            f"example_inputs holds no tensor (got {example_inputs!r:.80}); give the model's inputs as a dict of keyword "
            "inputs ({'input_ids': ids}), a tuple of positional ones, or one tensor, the first positional input."
        )
    signature = inspect.signature(model.forward)
    if not takes_use_cache(model, signature):
        return inputs
    if isinstance(inputs, tuple):
        inputs = by_name(model, signature, inputs)
    if isinstance(inputs, Mapping) and "use_cache" not in inputs:
        inputs = {**inputs, "use_cache": False}
    return inputs


def call_with(model: nn.Module, inputs: Mapping | tuple, **kwargs):
    """Call ``model`` on keyword or positional ``inputs``, as :func:`capture_inputs` gives them."""
    return model(**inputs, **kwargs) if isinstance(inputs, Mapping) else model(*inputs, **kwargs)


def by_name(model: nn.Module, signature: inspect.Signature, positional: tuple) -> Mapping | tuple:
    """``positional`` as keyword inputs of ``model``'s forward (whose signature is ``signature``), so that
    ``use_cache=False`` can join them; unchanged behind ``*args``."""
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values()):
        return positional
    try:
        return dict(signature.bind_partial(*positional).arguments)
    except TypeError as exc:
        raise ConfigError(
            f"example_inputs has {len(positional)} positional inputs, which {type(model).__name__}.forward does not "
            f"take ({exc}); pass a tuple in the order of its parameters {list(signature.parameters)} or a dict of "
            "keyword inputs."
        ) from None


def takes_use_cache(model: nn.Module, signature: inspect.Signature) -> bool:
    """Whether ``model``, whose forward's signature is ``signature``, takes ``use_cache=``: by name, or through
    ``**kwargs`` to a part whose config has one (Llava's language model)."""
    parameters = signature.parameters
    if "use_cache" in parameters:
        return True
    through_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return through_kwargs and any(hasattr(getattr(m, "config", None), "use_cache") for m in model.modules())
