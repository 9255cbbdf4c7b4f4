"""Cached generation through routed blocks (Hugging Face ``DynamicCache``).

A routed layer keeps keys and values only for the tokens it runs on, as
p-MoD and UniMoD decode:

- The first call that reaches a layer's empty cache (the prompt) is routed as
  the uncached forward routes it: the same router, top-k and gate (the math of
  ``passes/rewrite.py``, composed here around the block's own eager forward,
  which writes the selected tokens' keys and values into the cache).
- Every later call (the generated tokens) runs the block on all of its tokens,
  gated by the router, as tokens outside a route mask are.

So a routed model generating with ``use_cache=True`` computes exactly what the
uncached routed model computes for the whole sequence under a route mask that
makes the prompt's tokens routable (or the prompt's own route mask) and the
generated ones not. Without such a mask the uncached model would re-select
among all tokens at every step (MoD's top-k is not causal): the cached model is
the causal reading of it, and warns once that it is.

Each routed layer's cache then holds fewer keys than the sequence has tokens,
so the model's attention mask, whose key axis spans every token so far, does
not fit it. The layer keeps the position of each cached key
(:func:`routed_cache_layer`), a routed block reads its mask columns at those
positions, and the layer still reports the sequence's length, from which the
model counts positions and sizes its masks. A sliding-window layer is replaced
by one that keeps the keys of the window's positions (:func:`routed_storage`).
Beam search's reordering, batch repetition and selection, and crops of
generated tokens carry the positions with the keys.

A ``StaticCache`` layer becomes a routed layer of fixed size (:class:`StaticSlots`):
the prompt's kept tokens plus room for the generated ones (a sliding window's
worth, used as a ring, in a sliding-window layer), fewer slots than the dense
layer's. Its decoding steps are plain tensor code with no data-dependent
Python, so ``torch.compile`` traces them into the model's graph
(``fullgraph=True`` holds, as Hugging Face's compiled static-cache decoding
needs); the prompt, as in Hugging Face's ``generate()``, runs eagerly.
Quantised cache layers are refused.
"""

from __future__ import annotations

import abc
import functools
import inspect

import torch

from . import _structure, routing
from ._compat import disable_compile
from .errors import RoutingInputError
from .passes.rewrite import extra_slots_leak, mask_input, padding_reader
from .passes.token_axes import user_input_leaves
from .tasks import TaskGroup

#: The names Hugging Face layers take their cache by (``cache`` from transformers 5.25; ``layer_past`` in GPT-NeoX,
#: Falcon and GPTBigCode).
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


#: How a cached generation runs the tokens after the prompt through a routed layer (:func:`modpass.set_decoding`).
DECODING = {
    "all": "every token runs every routed layer (p-MoD's and UniMoD's decoding; exact under a route mask over the prompt)",
    "router": "a token runs a routed layer when sigmoid(its router logit) > 0.5, the top-k membership the auxiliary "
              "loss trains the router to predict (MoD's causal sampling); the others skip it",
}


def cache_of(output):
    """The cache a Hugging Face model's output carries (``cache`` from transformers 5.25, ``past_key_values`` before)."""
    return getattr(output, "cache", None) or output.past_key_values


def cache_keyword(model) -> str:
    """The keyword a Hugging Face model (or model class) takes its cache by (``cache`` from transformers 5.25)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_argument(kwargs: dict) -> str | None:
    """The name of the keyword argument that hands a block a cache object, or None."""
    for name, value in kwargs.items():
        if name in CACHE_ARGUMENTS and value is not None and not isinstance(value, (torch.Tensor, bool)):
            return name
    return None


def run(block, name: str, args: tuple, kwargs: dict, records: list):
    """Route one cached call of ``block`` (a :class:`~modpass.block.RoutedBlock`); its record's fields go to ``records``.

    A decoding step into a routed static layer is traced by ``torch.compile``;
    every other call runs eagerly (:func:`run_eagerly`).
    """
    layer = cache_layer(block, kwargs[name])
    if isinstance(layer, StaticSlots):
        return extend(block, RowTasks(block, args[0]), layer, args, kwargs, records)
    return run_eagerly(block, name, args, kwargs, records)


@disable_compile(
    "modpass: a routed block with a KV cache runs eagerly on the prompt and with a DynamicCache: it writes its "
    "selected tokens' keys and values into the cache through the block's own forward (with a StaticCache, the "
    "decoding steps compile: Hugging Face's compiled decoding)."
)
def run_eagerly(block, name: str, args: tuple, kwargs: dict, records: list):
    cache, hidden, where = kwargs[name], args[0], block.plan.path
    tasks = RowTasks(block, hidden)
    slot = cache_slot(block)
    layer = layer_at(cache, slot)
    check_layer(layer, where, slot)
    if not tasks.routed and not isinstance(layer, RoutedCacheLayer):
        return block._block(*args, **kwargs)  # tasks dense here cache every token, as the dense model does
    if layer is not None and not isinstance(layer, RoutedCacheLayer) and layer.get_seq_length() > 0:
        after_unrouted_keys(block, int(layer.get_seq_length()), hidden.shape[1])
    layer = routed_storage(cache, slot, hidden.shape[0], hidden.device, where)
    if isinstance(layer, RoutedCacheLayer) and layer.get_seq_length() > 0:
        return extend(block, tasks, layer, args, kwargs, records)
    state = block._state
    if state.route_mask is None and state.decoding == "all":
        state.warn_once(
            "causal decoding",
            "modpass: cached generation routes the prompt and runs every generated token through each routed layer "
            "(p-MoD's and UniMoD's decoding). The uncached model would select again among all tokens at each step "
            "(MoD's top-k is not causal), so generate(use_cache=False) can give other tokens. A route mask over the "
            "prompt makes the two the same: route_mask=, or for generate() modpass.default_task(model, route_mask=). "
            "modpass.set_decoding(model, 'router') skips layers by the router's prediction instead (MoD's sampling).",
            stacklevel=1,
        )
    return prefill(block, tasks, name, slot, args, kwargs, records)


def after_unrouted_keys(block, keys: int, tokens: int) -> None:
    """A routed call whose cache layer already holds keys that modpass did not route: PEFT's prefix tuning passes its
    virtual tokens so, at every call; so does a task dense at this block before a routed one. The call's tokens run the
    block as generated tokens do, every one of them: refused in training, where the layer would train unrouted; said
    once otherwise."""
    where, state = block.plan.path, block._state
    situation = (
        f"{where}: its cache layer already holds {keys} keys that modpass did not route (PEFT's prefix tuning passes "
        "its virtual tokens that way; a task dense at this block leaves them too), so the call's tokens run the block "
        "as generated tokens do, all of them"
    )
    if block.training and torch.is_grad_enabled():
        raise RoutingInputError(
            f"{situation}: its {tokens} tokens would train this routed layer without routing. Only a call into an "
            "empty cache layer is routed, as a prompt. Train without a cache: with virtual tokens as inputs (PEFT's "
            "prompt tuning) or adapters (LoRA) instead of prefix tuning."
        )
    state.warn_once("unrouted keys", f"modpass: {situation}; only a call into an empty cache layer is routed, as a prompt.",
                    stacklevel=1)


def cache_layer(block, cache):
    """The cache layer of ``block`` (None while a ``DynamicCache`` has not created it)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        if hasattr(cache, "self_attention_cache"):
            remedy = ("An encoder-decoder model's decoder keeps two caches (its self-attention's and its "
                      "cross-attention's), which modpass does not route: generate with use_cache=False, or route the "
                      "encoder's blocks only (within='encoder', say), which generate with a cache.")
        elif "Paged" in type(cache).__name__:
            remedy = ("Continuous batching's paged cache (generate_batch) is not supported: use generate(), "
                      "with a DynamicCache or a StaticCache.")
        else:
            remedy = "Call the model with use_cache=False."
        raise RoutingInputError(
            f"{block.plan.path}: a routed block caches keys and values in a transformers Cache that holds a list of "
            f"per-layer storage (DynamicCache, StaticCache and their kin), got a {type(cache).__name__}. {remedy}"
        )
    return layer_at(cache, cache_slot(block))


def layer_at(cache, slot: int):
    """The cache's layer ``slot``, or None where a ``DynamicCache`` has not created it yet."""
    return cache.layers[slot] if slot < len(cache.layers) else None


class RowTasks:
    """The tasks of a batch's rows at one routed block: a router per routed task, and the rows whose task is dense here.

    ``logits`` ``(B, T)`` are each row's router logits for ``hidden``, 0 on a
    dense row, whose gate is exactly 1 (:meth:`gate_weights`).
    """

    def __init__(self, block, hidden: torch.Tensor):
        self.block = block
        groups = block._state.groups(hidden.shape[0])
        self.routed_groups = [group for group in groups if block._ratios.get(group.task) is not None]
        self.dense = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        for group in self.routed_groups:
            self.dense = self.by_row(group, self.dense, torch.zeros_like(group.rows_of(self.dense)))
        self.logits = self.logits_of(hidden)
        self.routed = len(self.routed_groups) > 0  # not bool(list): torch 2.11 Dynamo cannot trace it

    @staticmethod
    def by_row(group: TaskGroup, whole: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """``whole`` with the group's rows replaced by ``part``."""
        return part if group.rows is None else whole.index_copy(0, group.rows.to(whole.device), part)

    def router_logits(self, group: TaskGroup, hidden: torch.Tensor) -> torch.Tensor:
        router = self.block.router(group.task)
        return routing.router_logits(hidden, router.weight, router.bias)

    def logits_of(self, selected: torch.Tensor) -> torch.Tensor:
        """``(B, k)`` router logits of the ``selected`` hidden states, each row by its task's router (0 on dense rows)."""
        logits = selected.new_zeros(selected.shape[:2])
        for group in self.routed_groups:
            logits = self.by_row(group, logits, self.router_logits(group, group.rows_of(selected)))
        return logits

    def gate_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, k, 1)`` gate of tokens with router ``logits``: exactly 1 on dense rows."""
        weight = routing.gate_weights(logits, self.block._gate)
        return torch.where(self.dense[:, None, None], torch.ones_like(weight), weight)

    def capacities(self, tokens: int, route_mask: torch.Tensor | None) -> torch.Tensor:
        """``(B,)`` each row's capacity: its task's ratio of its tokens (under ``route_mask``); every token on a dense row."""
        capacity = torch.full(self.dense.shape, tokens, dtype=torch.long, device=self.dense.device)
        for group in self.routed_groups:
            terms = self.block.ratio_terms(group.task)
            if route_mask is None:
                part = torch.full_like(group.rows_of(capacity), routing.capacity(tokens, *terms))
            else:
                part = routing.row_capacities(group.rows_of(route_mask), *terms).to(capacity.device)
            capacity = self.by_row(group, capacity, part)
        return capacity

    def record(self, records: list, index: torch.Tensor, route_mask=None, padding=None, extra=None) -> None:
        """A routing record per routed task, of its rows (see :class:`~modpass.block.RoutingRecord`)."""
        for group in self.routed_groups:
            def rows(tensor, group=group):
                return None if tensor is None else group.rows_of(tensor)

            records.append((group.task, rows(self.logits), rows(index), group.rows, rows(route_mask), rows(padding), rows(extra)))


def read_once(block, name: str, read):
    """``read(block)``, kept on the block as ``name``: what a decode step would otherwise look up on every call of
    every routed layer. On the block, not in a module-level dictionary: compiled decoding guards on what it reads,
    and a dictionary that loses the entries of collected blocks would recompile it."""
    value = block.__dict__.get(name)
    if value is None:
        value = block.__dict__[name] = read(block)
    return value


def cache_slot(block) -> int:
    """The cache slot the block's attention writes to: the ``layer_idx`` of its modules."""
    return read_once(block, "_kv_cache_slot", layer_index)


def layer_index(block) -> int:
    found = {m.layer_idx for m in block._block.modules() if isinstance(getattr(m, "layer_idx", None), int)}
    if len(found) != 1:
        raise RoutingInputError(
            f"{block.plan.path}: modpass finds a block's cache slot by its attention's layer_idx; this block has "
            f"{sorted(found) or 'none'}. Call the model with use_cache=False."
        )
    return found.pop()


def check_layer(layer, where: str, slot: int) -> None:
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer

    known = (DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer)
    if layer is not None and type(layer) not in known and not isinstance(layer, RoutedCacheLayer):
        raise RoutingInputError(
            f"{where}: its cache layer {slot} is a {type(layer).__name__}; a routed block keeps its selected tokens "
            "in a DynamicCache's or StaticCache's attention layers (a quantised layer, say, stores keys in its own "
            "way, by the model's positions, not the block's). Generate with DynamicCache or StaticCache, or use "
            "use_cache=False."
        )


def routed_storage(cache, slot: int, batch: int, device: torch.device, where: str):
    """The cache layer at ``slot`` as a routed block's (keys it ran on, with their positions), made so if it is not.

    A layer created on first use, or an empty one, is left to the block's
    first call. A sliding-window layer would keep the last keys the block
    cached, not the keys of the window's positions: it becomes a layer that
    keeps every key and hides those outside the window (see
    :func:`layer_mask`), dropping them once no later query can see them. A
    layer a dense task filled holds every token of the sequence (a sliding
    one, the last of them).
    """
    from transformers.cache_utils import DynamicLayer, StaticLayer

    layer = layer_at(cache, slot)
    if layer is None or isinstance(layer, RoutedCacheLayer):
        return layer
    seen = int(layer.get_seq_length())
    if isinstance(layer, StaticLayer):
        if seen:
            raise RoutingInputError(
                f"{where}: its static cache layer {slot} holds {seen} tokens of a task dense at this block; a routed "
                "task's tokens cannot follow them there (the routed layer's slots are sized by its prompt). Generate "
                "each task from its own prompt, or use a DynamicCache."
            )
        return layer
    window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
    if window is not None or seen > 0:
        kept = layer.keys.shape[-2] if seen else 0
        routed = routed_layer_class(DynamicLayer)()
        if kept:
            routed.lazy_initialization(layer.keys, layer.values)
            routed.keys, routed.values = layer.keys, layer.values
        routed.token_positions = torch.arange(seen - kept, seen, device=device).expand(batch, -1)
        routed.tokens_seen = routed.prompt_length = seen
        routed.sliding_window = window
        cache.layers[slot] = layer = routed
    return layer


def prefill(block, tasks: RowTasks, name: str, slot: int, args: tuple, kwargs: dict, records: list):
    """The routed call of ``passes/rewrite.py``, with the block run eagerly on the selected tokens and the cache."""
    cache, hidden, where = kwargs[name], args[0], block.plan.path
    batch, tokens = hidden.shape[:2]
    layer = layer_at(cache, slot)
    static = is_static(type(layer))
    if static:
        # The model's mask spans the static cache's length from position 0: the prompt's keys are its first columns.
        args, kwargs = with_mask(block, args, kwargs, lambda mask: mask[..., :tokens] if isinstance(mask, torch.Tensor) else mask)
    uncached = {key: value for key, value in kwargs.items() if key != name}
    if "use_cache" in uncached:
        uncached["use_cache"] = False  # the structure the uncached forward prepared
    analysed, _ = block.analysis(args, uncached)
    if analysed.graph.find_nodes(op="call_function", target=routing.token_positions):
        raise RoutingInputError(
            f"{where}: it reads a table the batch shares by token position (a (T, d) rotary table, table[:T], or "
            "arange(T)), which the routed graph reads at the selected tokens' positions; cached prefill runs the "
            "block's own code on the selected tokens, which would read the table's first rows instead. Pass the "
            "table per sequence, (B, T, d), or generate with use_cache=False."
        )
    leaves = _structure.tensors((args, uncached))
    leaf_of = dict(user_input_leaves(analysed))
    token_axes = {target: node.meta["modpass_token_axes"] for node, target in leaf_of.items()}
    inputs = list(leaf_of)
    mask_node = mask_input(inputs)
    mask_leaf = leaf_of.get(mask_node)
    mask = leaves[mask_leaf] if mask_node is not None else None
    if mask is not None and mask.shape[-1] != tokens:
        raise RoutingInputError(
            f"{where}: its cache is empty but the attention mask spans {mask.shape[-1]} keys for {tokens} tokens; "
            "start generation with an empty cache, or use use_cache=False."
        )
    padding = None if mask_node is None else padding_reader(mask_node, inputs)(mask, batch)
    route_mask = block._state.checked_route_mask(batch, tokens, where)  # the prompt's; later calls ignore it
    scores = routing.selection_scores(tasks.logits, padding, route_mask)
    row_capacity = tasks.capacities(tokens, route_mask)
    k, extra = int(row_capacity.max()), None
    if bool((row_capacity == k).all()):
        index = routing.select_tokens(scores, k)
    else:
        # Rows keep different numbers of tokens (their tasks or route masks differ): one cache holds them as k slots.
        index, extra = routing.select_tokens_per_row(scores, k, row_capacity)
        if (leak := extra_slots_leak(analysed)) is not None:
            raise RoutingInputError(
                f"{where}: this batch's rows keep different numbers of tokens (tasks or route masks differ), and one "
                f"cache holds them as one length only by hiding the extra slots from attention, which this block "
                f"cannot: {leak}. Generate rows of one task and equal routable counts in a batch, or use use_cache=False."
            )
    gathered = [routing.gather_tokens(leaf, index, token_axes[i]) if token_axes.get(i) else leaf for i, leaf in enumerate(leaves)]
    if extra is not None and mask is not None:
        gathered[mask_leaf] = routing.hide_extra_slots(gathered[mask_leaf], extra, token_axes[mask_leaf])
    call_args, call_kwargs = _structure.replace((args, kwargs), list(gathered))
    if static:
        reserve_slots(layer, k, tokens, where)  # before the block's first write allocates them
        call_args, call_kwargs = with_mask(block, call_args, call_kwargs, lambda mask: over_slots(mask, k, layer.slots, hidden.device))
    writes_hidden_state = analysed.meta["modpass_writes_hidden_state"]
    output = block._block(*hidden_to_write(writes_hidden_state, call_args), **call_kwargs)
    selected = gathered[0]
    weight = tasks.gate_weights(tasks.logits_of(selected))  # recomputed from the selected rows, as the routed graph does
    # A dense row's padding is updated as the dense model updates it; a routed row's keeps its value.
    kept_padding = None if padding is None else padding & ~tasks.dense[:, None]
    base, padding_values = hidden, None
    if block._gate == "string":
        base = routing.skip_scale(hidden, tasks.logits)  # a dense row's logits are 0: its weight is 1
        if padding is not None or extra is not None:
            padding_values = routing.gather_tokens(base, index, (1,))
    new_hidden = routing.scatter_update(base, index, selected, first_output(output), weight, kept_padding, padding_values, extra)
    tasks.record(records, index, route_mask, padding, extra)
    positions = index if extra is None else hide(index, extra)
    layer = cache.layers[slot]
    if not isinstance(layer, RoutedCacheLayer) and getattr(layer, "is_sliding", False):  # created on first use
        raise RoutingInputError(f"{where}: its cache created a sliding-window layer on first use, which keeps only the "
                                "last keys; give the cache its layers ahead (DynamicCache(config=...)) or use_cache=False.")
    check_layer(layer, where, slot)
    routed_cache_layer(layer, positions, tokens, where)
    layer.block_returns_tuple = isinstance(output, tuple)
    layer.block_writes_hidden_state = writes_hidden_state
    layer.drop_keys_outside_the_window()
    return with_first_output(output, new_hidden)


def extend(block, tasks: RowTasks, layer, args: tuple, kwargs: dict, records: list):
    """A call after the prompt: its tokens run the block over the layer's cached keys, gated on routed rows.

    Every token runs it, unless the model decodes by router (:data:`DECODING`):
    then a token of a routed row whose router logit is not positive skips the
    layer as a skipped prompt token does, and its key, cached only because
    another token of the call runs the block, is hidden from every later
    query. A call whose tokens all skip does not run the block (in eager mode:
    compiled, that would be a branch on data, and the block runs with every
    key of the call hidden).
    """
    hidden, where = args[0], block.plan.path
    batch, tokens = hidden.shape[:2]
    skipped = None
    if block._state.decoding == "router" and tasks.routed:
        skipped = (tasks.logits <= 0) & ~tasks.dense[:, None]
    base = hidden if skipped is None or block._gate != "string" else routing.skip_scale(hidden, tasks.logits)
    every = torch.arange(tokens, device=hidden.device).expand(batch, -1)
    # Recorded as outside a route mask, which generated tokens are: aux_loss leaves them out.
    outside = torch.zeros((batch, tokens), dtype=torch.bool, device=hidden.device)
    if (skipped is not None and not layer.block_returns_tuple and not torch.compiler.is_compiling()
            and bool(skipped.all())):
        tasks.record(records, every, outside, None, skipped)
        layer.advance(tokens)
        return base
    new = (layer.tokens_seen + torch.arange(tokens, device=hidden.device)).expand(batch, -1)
    keys = layer.add_positions(new if skipped is None else hide(new, skipped))

    def routed_layer_mask(mask):
        first = layer.first_mask_position(tokens, mask.shape[-1]) if isinstance(mask, torch.Tensor) else 0
        return layer_mask(mask, keys, new, first, hidden.dtype, where)

    call_args, call_kwargs = with_mask(block, args, kwargs, routed_layer_mask)
    output = block._block(*hidden_to_write(layer.block_writes_hidden_state, call_args), **call_kwargs)
    layer.block_returns_tuple = isinstance(output, tuple)
    new_hidden = first_output(output)
    if tasks.routed:
        # Every token of the call ran the block: the routed scatter over all of them is this update in place.
        new_hidden = routing.gated_update(hidden, new_hidden, tasks.gate_weights(tasks.logits)).to(hidden.dtype)
        if skipped is not None:
            new_hidden = torch.where(skipped.unsqueeze(-1), base, new_hidden)
        tasks.record(records, every, outside, None, skipped)
    layer.advance(tokens)
    layer.check_in_step(where)
    layer.drop_keys_outside_the_window()
    return with_first_output(output, new_hidden)


def hidden_to_write(writes: bool, args: tuple) -> tuple:
    """The block's positional arguments, with a copy of the hidden state where the block ``writes`` it in place
    (``x += ...``, see ``capture_block``): the gated update reads the tokens again after the block."""
    return (args[0].clone(), *args[1:]) if writes else args


def with_mask(block, args: tuple, kwargs: dict, change) -> tuple[tuple, dict]:
    """The block's call with its ``attention_mask`` (None where not given) replaced by ``change(mask)``."""
    at = read_once(block, "_kv_cache_mask_position", mask_position)
    if at < len(args):
        return (*args[:at], change(args[at]), *args[at + 1:]), kwargs
    return args, {**kwargs, "attention_mask": change(kwargs.get("attention_mask"))}


def mask_position(block) -> int:
    parameters = list(inspect.signature(block._block.forward).parameters)
    if "attention_mask" not in parameters:
        raise RoutingInputError(
            f"{block.plan.path}: a routed layer attends to its own cached keys through an attention_mask argument, "
            "which this block does not take. Call the model with use_cache=False."
        )
    return parameters.index("attention_mask")


def hide(positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``positions`` with those where ``hidden`` marked as slots no query attends: ``-1 - position``, negative and
    still telling the position (a crop counts generated keys by it)."""
    return torch.where(hidden, -1 - positions, positions)


def sequence_positions(positions: torch.Tensor) -> torch.Tensor:
    """The sequence position of every cached key, hidden (see :func:`hide`) or not."""
    return torch.where(positions >= 0, positions, -1 - positions)


def layer_mask(mask, keys: torch.Tensor, queries: torch.Tensor, first: int | torch.Tensor, dtype: torch.dtype, where: str):
    """The attention mask over a routed layer's cached keys, whose positions are ``keys`` ``(B, n)``; a negative one
    marks a slot never attended (:func:`hide`).

    The model's ``(B | 1, H | 1, q, m)`` mask spans ``m`` positions from
    ``first`` (the last of the tokens so far, all of them or a sliding
    window's; a static full-attention layer's from 0): its columns are read at the keys'
    positions, and older keys are hidden. Without one (SDPA's causal shortcut,
    every key in reach) the mask is causal over positions, additive so that
    any attention implementation takes it.
    """
    valid = keys >= 0
    if mask is None:
        if queries.shape[1] == 1 and not torch.compiler.is_compiling() and bool(valid.all()):
            return None  # one new token sees every cached one
        allowed = (keys.unsqueeze(1) <= queries.unsqueeze(2)) & valid.unsqueeze(1)
        return torch.zeros(allowed.shape, dtype=dtype, device=keys.device).masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or (isinstance(first, int) and first < 0):
        got = f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else f"a {type(mask).__name__}"
        raise RoutingInputError(
            f"{where}: a routed layer reads its keys' columns from the model's 4-D attention mask, whose key axis spans "
            f"the tokens so far (or the last of them), got {got}. Use an attention implementation with such masks "
            "(sdpa or eager), or use_cache=False."
        )
    valid = valid & (keys >= first)
    mask = mask.expand(keys.shape[0], *mask.shape[1:])
    columns = (keys - first).clamp(min=0)[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1)
    picked = torch.take_along_dim(mask, columns, dim=3)
    hidden = ~valid[:, None, None, :]
    if picked.dtype == torch.bool:
        return picked & ~hidden
    return picked.masked_fill(hidden, torch.finfo(picked.dtype).min)


def first_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def with_first_output(output, hidden: torch.Tensor):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


# -- the cache layer of a routed block ------------------------------------------------------------


@functools.cache
def positive_crops_refused() -> bool:
    """Whether transformers' cache layers refuse ``crop`` with a positive count (from 5.18; before, it was the length
    to keep)."""
    from packaging.version import Version
    from transformers import __version__

    return Version(__version__) >= Version("5.18")


class RoutedCacheLayer(abc.ABC):
    """Base of a routed block's cache layers: a transformers layer class with keys only for the tokens the block ran on.

    :func:`routed_layer_class` mixes :class:`GrowingKeys` into a
    ``DynamicLayer`` and :class:`StaticSlots` into a ``StaticLayer``; what
    follows is common to both.
    """

    # An ABC, as transformers' layers are: only then does a layer object take the routed class's layout (__class__).

    #: ``(B, n)``: the sequence position of each cached key; ``-1 - position`` for a slot no query may attend (:func:`hide`).
    token_positions: torch.Tensor
    #: How many tokens of the sequence this layer has been called on (cached or not).
    tokens_seen: int | torch.Tensor
    #: How many of them its first call (the routed prompt) had.
    prompt_length: int
    #: Whether the block returns a tuple (then it runs even when every token skips it, to give its other outputs).
    block_returns_tuple: bool = True
    #: Whether the block writes its hidden state in place, as the prompt's analysed call said; unknown (True) for a
    #: layer whose first call comes after keys modpass did not route.
    block_writes_hidden_state: bool = True
    #: The block's attention window, for a layer that replaced a sliding-window one (see :func:`routed_storage`).
    sliding_window: int | None = None
    #: The transformers layer class this one extends (a reset makes the layer one of those again).
    made_from: type

    def get_seq_length(self):
        # The sequence's length, as a dense layer reports it: Hugging Face models count new tokens' positions
        # (layer 0) and size the attention mask (the first full-attention layer) by it.
        return self.tokens_seen

    @property
    def is_sliding(self) -> bool:
        return self.sliding_window is not None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.token_positions = self.token_positions.index_select(0, beam_idx.to(self.token_positions.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.token_positions = self.token_positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.token_positions = self.token_positions[indices]

    def length_after_crop(self, tokens_to_remove: int) -> int | None:
        """The sequence length a crop keeps (None: nothing to remove); a crop into the prompt is refused."""
        # A negative count removes that many tokens from the end of the sequence; a positive one
        # (transformers < 5.18, see positive_crops_refused) is the sequence length to keep.
        if tokens_to_remove > 0 and positive_crops_refused():
            # Refused before any layer changes, as transformers' own layers refuse it, not after the routed ones cropped.
            raise RoutingInputError(
                f"crop({tokens_to_remove}): this transformers release takes the number of tokens to remove, as a "
                "negative integer; a positive one (the length to keep) is refused, as for a dense cache."
            )
        seen = int(self.tokens_seen)
        cut = tokens_to_remove if tokens_to_remove > 0 else seen + tokens_to_remove
        if cut >= seen:
            return None
        if cut < self.prompt_length:
            raise RoutingInputError(
                f"cropping the sequence to {cut} tokens would cut into the prompt ({self.prompt_length} tokens), "
                "of which a routed layer cached only the tokens it selected. Crop only generated tokens. Assisted "
                "decoding cannot work this way: it verifies its first candidates in one call with the prompt, which "
                "routes them as prompt tokens; generate without assistant_model, or with use_cache=False."
            )
        return cut

    def reset(self) -> None:
        super().reset()
        self.__class__ = self.made_from
        for name in ("token_positions", "tokens_seen", "prompt_length", "block_returns_tuple", "block_writes_hidden_state",
                     "sliding_window"):
            self.__dict__.pop(name, None)

    def check_in_step(self, where: str) -> None:
        if tuple(self.token_positions.shape) != (self.keys.shape[0], self.keys.shape[-2]):
            raise RoutingInputError(
                f"{where}: its cache layer holds {tuple(self.keys.shape[::2])} (batch, keys), but modpass tracked "
                f"{tuple(self.token_positions.shape)}: something changed the layer outside its block and the cache's "
                "own methods. Start from a fresh cache."
            )


class GrowingKeys(RoutedCacheLayer):
    """A routed ``DynamicLayer``: each call appends the keys of the tokens that ran the block."""

    tokens_seen: int

    def start(self, positions: torch.Tensor, seen: int) -> None:
        self.token_positions, self.tokens_seen = positions, seen

    def add_positions(self, new: torch.Tensor) -> torch.Tensor:
        """The positions of every key once the block has cached ``new`` ``(B, q)``."""
        self.token_positions = torch.cat([self.token_positions.expand(new.shape[0], -1), new], dim=1)
        return self.token_positions

    def advance(self, tokens: int) -> None:
        self.tokens_seen += tokens

    def first_mask_position(self, tokens: int, columns: int) -> int:
        """The sequence position of the first of the model's ``columns`` mask columns, in a call of ``tokens``."""
        return self.tokens_seen + tokens - columns

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The model's mask spans the window (a sliding-window layer's sizes, by the sequence's length) or every token."""
        if self.sliding_window is None:
            return self.tokens_seen + query_length, 0
        return min(self.tokens_seen, self.sliding_window - 1) + query_length, max(self.tokens_seen - self.sliding_window + 1, 0)

    def drop_keys_outside_the_window(self) -> None:
        if self.sliding_window is None:
            return
        gone = self.token_positions < self.tokens_seen - self.sliding_window + 1  # hidden slots included
        count = int(gone.long().cumprod(dim=1).sum(dim=1).min())  # in every row at once: the cache stays rectangular
        if count:
            self.keys, self.values = self.keys[..., count:, :], self.values[..., count:, :]
            self.token_positions = self.token_positions[:, count:]

    def crop(self, tokens_to_remove: int) -> None:
        cut = self.length_after_crop(tokens_to_remove)
        if cut is None:
            return
        # Past the prompt a routed layer caches the tokens of each call that ran it, one key per position and
        # row, in order (a call whose tokens all skipped it, decoding by router, cached none).
        count = int((sequence_positions(self.token_positions[0]) >= cut).sum())
        if count:
            super().crop(-count)
            self.token_positions = self.token_positions[:, :-count]
        self.tokens_seen = cut


class StaticSlots(RoutedCacheLayer):
    """A routed ``StaticLayer``: fixed slots, the prompt's kept tokens first, then one per generated token.

    Every attribute that changes while decoding is a tensor updated in place
    (``tokens_seen``, ``token_positions``, and the layer's own
    ``cumulative_length``, the keys written), so a compiled decoding step
    neither guards on nor recompiles for the step's number, and CUDA graphs
    keep their addresses. ``max_cache_len`` stays the dense layer's, and so do
    its mask sizes: a full-attention layer's mask spans that many positions
    from 0, a sliding-window layer's (``max_cache_len`` is its window) the
    window's positions before the call and the call's own.

    A key goes to the slot after the last one written. A full-attention layer
    has room for the whole sequence; a sliding-window layer's slots are a ring,
    the prompt's kept ones and a window's worth after them, which is enough:
    a key is overwritten only after as many later tokens as there are slots,
    when no query's window reaches it any more.
    """

    tokens_seen: torch.Tensor
    #: How many keys the layer holds room for (:func:`reserve_slots`).
    slots: int

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        full, self.max_cache_len = self.max_cache_len, self.slots  # transformers allocates max_cache_len keys
        try:
            super().lazy_initialization(key_states, value_states)
        finally:
            self.max_cache_len = full
        for slots_axis in (self.keys, self.values):
            torch._dynamo.maybe_mark_dynamic(slots_axis, 2)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = self.next_slots(key_states.shape[-2])
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        self.cumulative_length.add_(key_states.shape[-2])
        return self.keys, self.values

    def check_room(self, count: int) -> None:
        """A full-attention layer that is full says so (in eager mode; compiled, the write's index is out of bounds,
        as in transformers' dense static layer)."""
        if not torch.compiler.is_compiling():
            written = int(self.cumulative_length)
            if written + count > self.slots:
                raise RoutingInputError(
                    f"the static cache is full: a routed layer holds {self.slots} keys ({written} written), and this "
                    f"call brings {count} more. Give StaticCache a larger max_cache_len (the prompt's length plus the "
                    "tokens to generate), and generate with use_cache=True (without it the model passes the whole "
                    "sequence again at each step)."
                )

    def next_slots(self, count: int) -> torch.Tensor:
        """The slots the next ``count`` keys go to: round the ring in a sliding-window layer; past the last slot in a
        full one that is full, where the write then fails as a dense static layer's does."""
        slots = self.cumulative_length + torch.arange(count, device=self.cumulative_length.device)
        if self.sliding_window is not None:
            return slots % self.keys.shape[-2]  # a size, not the Python count, which Dynamo would guard on
        self.check_room(count)
        return slots

    def start(self, positions: torch.Tensor, seen: int) -> None:
        unfilled = torch.full((positions.shape[0], self.slots), UNFILLED, device=positions.device)
        self.token_positions = unfilled.index_copy(1, torch.arange(positions.shape[1], device=positions.device), positions)
        self.tokens_seen = torch.tensor(seen, device=positions.device)
        if self.sliding_window is not None:
            self.cumulative_length_int = seen  # the Python count a sliding layer's mask sizes come from
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.token_positions)
            torch._dynamo.mark_static_address(self.tokens_seen)
            torch._dynamo.maybe_mark_dynamic(self.token_positions, 1)

    def add_positions(self, new: torch.Tensor) -> torch.Tensor:
        """The positions of every slot once the block has cached ``new`` ``(B, q)`` in the next slots."""
        self.token_positions.index_copy_(1, self.next_slots(new.shape[1]), new)
        return self.token_positions

    def advance(self, tokens: int) -> None:
        self.tokens_seen.add_(tokens)
        if self.sliding_window is not None:
            self.cumulative_length_int += tokens

    def first_mask_position(self, tokens: int, columns: int) -> int | torch.Tensor:
        if self.sliding_window is None:
            return 0
        return (self.tokens_seen - self.sliding_window + 1).clamp(min=0)

    def drop_keys_outside_the_window(self) -> None:
        """Nothing to drop: a sliding-window layer's ring overwrites them."""

    def crop(self, tokens_to_remove: int) -> None:
        cut = self.length_after_crop(tokens_to_remove)
        if cut is None:
            return
        written = int(self.cumulative_length)
        if written > self.slots:
            raise RoutingInputError(
                f"cropping the sequence to {cut} tokens needs keys that this sliding-window layer has overwritten "
                "(its window has moved past them). Crop before the window moves, or use a DynamicCache."
            )
        count = int((sequence_positions(self.token_positions[0, :written]) >= cut).sum())
        self.token_positions[:, written - count:written] = UNFILLED
        self.cumulative_length.sub_(count)  # the next keys overwrite the cropped ones
        self.tokens_seen.fill_(cut)
        if self.sliding_window is not None:
            self.cumulative_length_int = cut

    def reset(self) -> None:
        # Back to a dense layer of the model's size, allocated again on first use.
        self.keys = self.values = None
        self.is_initialized = False
        self.__dict__.pop("slots", None)
        super().reset()


#: The position of a static slot not written yet: hidden (negative, :func:`hide`) and past any cropping point.
UNFILLED = -(2**62)


def reserve_slots(layer, kept: int, tokens: int, where: str) -> None:
    """Make an empty ``StaticLayer`` a routed one with room for ``kept`` prompt tokens and what follows them: the rest
    of a full-attention layer's length, a sliding-window layer's window (see :class:`StaticSlots`)."""
    window = layer.max_cache_len if layer.is_sliding else None  # transformers' class attribute, before the change
    if layer.is_initialized:  # early_initialization allocated the dense size
        layer.keys = layer.values = None
        layer.is_initialized = False
    layer.__class__ = routed_layer_class(type(layer))
    layer.sliding_window = window
    layer.slots = kept + (window if window is not None else layer.max_cache_len - tokens)
    if layer.slots <= kept:
        raise RoutingInputError(
            f"{where}: the static cache holds {layer.max_cache_len} tokens, and the prompt has {tokens}: no room for a "
            "generated one. Give StaticCache a larger max_cache_len."
        )


def over_slots(mask, kept: int, slots: int, device: torch.device) -> torch.Tensor:
    """The prompt's ``(B | 1, H | 1, k, k)`` mask over its kept tokens (None: causal) extended over a static layer's
    ``slots``, the unfilled ones hidden (its keys, the block's attention reads all of them)."""
    if mask is None:
        mask = torch.ones(kept, kept, dtype=torch.bool, device=device).tril()[None, None]
    hidden = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
    return torch.cat([mask, mask.new_full((*mask.shape[:-1], slots - kept), hidden)], dim=-1)


def routed_cache_layer(layer, positions: torch.Tensor, seen: int, where: str) -> None:
    """Make ``layer`` a routed block's: it keeps ``positions`` beside its keys and values."""
    if not isinstance(layer, RoutedCacheLayer):
        layer.__class__ = routed_layer_class(type(layer))
    layer.start(positions, seen)
    layer.prompt_length = seen
    layer.check_in_step(where)


@functools.cache
def routed_layer_class(base: type) -> type:
    """``base`` (a transformers cache layer class) keeping the positions of its keys, through every batch and length
    operation (beam search, crops)."""
    mixin = StaticSlots if is_static(base) else GrowingKeys
    return type(f"Routed{base.__name__}", (mixin, base), {"__module__": __name__, "made_from": base})


def is_static(layer_class: type) -> bool:
    from transformers.cache_utils import StaticLayer

    return issubclass(layer_class, StaticLayer)
