"""Stage 2, ``find_blocks``: locate the transformer blocks in a captured graph.

Expects: a ``GraphModule`` from ``capture`` (or a Dynamo graph) whose nodes
carry ``nn_module_stack`` and ``val`` metadata.
Guarantees: ``gm.meta["modpass_blocks"]`` holds a list of :class:`BlockInfo`
in execution order; the graph itself is unchanged. Raises ``NoBlocksError``
when nothing qualifies.

The rule, with no architecture or class names:

1. A *module region* is the set of graph nodes whose ``nn_module_stack``
   contains one module path (placeholders are ignored: their stacks are not
   reliable). Regions of modules called more than once are skipped.
2. A region is a *block candidate* when at least one sibling (same parent
   path) of the same class also qualifies: transformer layers are repeated
   children of one container.
3. Its *hidden input* is a rank-3 tensor flowing in from outside whose shape
   (symbolically, ``(B, T, D)``) equals the shape of a tensor the region hands
   to the rest of the graph. A pre-norm residual block reaches that output from
   the hidden input through ``add`` nodes, which breaks ties between inputs of
   equal shape; otherwise the first such input in graph order is used.
4. It mixes tokens by attention: it contains an attention kernel or a
   product of two activations (scores = q @ k^T), not only weight products
   (read in line where the block runs it under ``autocast`` or ``no_grad``).
5. Candidates nested inside another candidate are dropped.

Every other tensor flowing into a block (masks, rotary tables, position ids)
is recorded as a side input; which of their axes are token axes is decided
per block from symbolic shapes when the block itself is captured.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from .._subgraphs import inlined
from ..errors import ConfigError, NoBlocksError
from ..plan import in_scope
from .residual_stream import reaches_through_adds
from .token_mixing import ATTENTION


@dataclass(frozen=True)
class BlockInfo:
    """A block found: its index among all blocks in execution order, module path, class and width, and the symbolic
    shapes of its hidden state and side inputs (``("s0", "s1", "64")``)."""

    index: int
    path: str
    block_class: str
    hidden_size: int
    hidden_shape: tuple[str, ...]
    side_inputs: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def stack(self) -> str:
        """The module holding this block and its siblings (a ``within=`` that routes them)."""
        return self.path.rpartition(".")[0]


def block_stacks(blocks: list[BlockInfo]) -> str:
    """Where blocks lie, one entry per stack: ``"model.vision_model.encoder.layers (24 blocks), ..."``."""
    counts = Counter(block.stack or "<root>" for block in blocks)
    return ", ".join(f"{stack} ({n} block{'s' * (n != 1)})" for stack, n in counts.items())


def blocks_within(blocks: list[BlockInfo], within: str) -> list[BlockInfo]:
    """The blocks inside the module at ``within`` ("" = all); ``ConfigError`` naming the stacks when there are none."""
    scoped = [block for block in blocks if in_scope(block.path, within)]
    if not scoped:
        raise ConfigError(
            f"within={within!r} holds none of the model's blocks, which lie in {block_stacks(blocks)}; give one of those "
            "module paths (or a module above one)."
        )
    return scoped


def shape_key(node: torch.fx.Node) -> tuple[str, ...] | None:
    val = node.meta.get("val")
    return tuple(str(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def module_regions(graph: torch.fx.Graph) -> tuple[dict[str, list[torch.fx.Node]], dict[str, str]]:
    """``{module path: nodes in graph order}`` and ``{module path: class name}``."""
    regions: dict[str, list[torch.fx.Node]] = defaultdict(list)
    classes: dict[str, str] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            if path:
                regions[path].append(node)
                classes[path] = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    return regions, classes


def hidden_input(nodes: list[torch.fx.Node]) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    region = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in region and a.op != "get_attr"))
    outputs = [n for n in nodes if any(u not in region for u in n.users)]
    output_shapes = {shape_key(o): o for o in outputs if shape_key(o) is not None}
    matches = [i for i in inputs if (k := shape_key(i)) is not None and len(k) == 3 and k in output_shapes]
    if not matches:
        return None
    residual = [i for i in matches if reaches_through_adds(i, output_shapes[shape_key(i)], region)]
    chosen = (residual or matches)[0]
    return chosen, [i for i in inputs if i is not chosen and isinstance(i.meta.get("val"), torch.Tensor)]


_PRODUCTS = {"matmul", "bmm", "einsum", "baddbmm"}


def op_name(target) -> str:
    """``scaled_dot_product_attention`` for both ``aten.scaled_dot_product_attention.default`` and the torch function."""
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet if packet is not None else target, "__name__", str(target))


def is_weight(placeholder: torch.fx.Node) -> bool:
    """Dynamo passes parameters and buffers as graph inputs; its ``grapharg`` says which they are."""
    graph_arg = placeholder.meta.get("grapharg")
    return isinstance(getattr(graph_arg, "example", None), torch.nn.Parameter) or "_buffers" in str(getattr(graph_arg, "source", ""))


def activation_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes whose value depends on a graph input (not only on weights and constants).

    Dynamo records tensor methods (``k.transpose(2, 3)``) as ``call_method``: eager attention's
    ``q @ k.transpose`` goes through one.
    """
    active = {n for n in graph.nodes if n.op == "placeholder" and not is_weight(n)}
    for node in graph.nodes:
        if node.op in ("call_function", "call_method", "call_module") and any(a in active for a in node.all_input_nodes):
            active.add(node)
    return active


def has_attention(nodes: list[torch.fx.Node], active: set[torch.fx.Node]) -> bool:
    for node in nodes:
        name = op_name(node.target)
        if any(key in name for key in ATTENTION):
            return True
        # einsum takes its operands as one list
        operands = torch.utils._pytree.tree_leaves((node.args, node.kwargs))
        if name in _PRODUCTS and sum(isinstance(a, torch.fx.Node) and a in active for a in operands) >= 2:
            return True
    return False


def find_blocks(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Annotate ``gm.meta["modpass_blocks"]``; see the module docstring for the rule."""
    view = inlined(gm)  # attention run under autocast counts
    regions, classes = module_regions(view.graph)
    siblings: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in regions:
        if "@" not in path:
            siblings[(path.rpartition(".")[0], classes[path])].append(path)
    active = activation_nodes(view.graph)
    candidates = {}
    for paths in siblings.values():
        qualifying = {p: found for p in paths if (found := hidden_input(regions[p])) is not None and has_attention(regions[p], active)}
        if len(qualifying) >= 2:
            candidates.update(qualifying)
    outermost = [p for p in candidates if not any(p.startswith(q + ".") for q in candidates if q != p)]
    order = {n: i for i, n in enumerate(view.graph.nodes)}
    outermost.sort(key=lambda p: order[regions[p][0]])
    if not outermost:
        repeated = sorted({f"{parent or '<root>'}: {cls.rpartition('.')[2]} x{len(p)}" for (parent, cls), p in siblings.items() if len(p) > 1})
        raise NoBlocksError(
            "no transformer blocks found: looked for repeated sibling modules of one class (e.g. the "
            "layers of a ModuleList) that map a (batch, tokens, features) hidden state to a tensor of the "
            f"same shape and attend over tokens. Repeated modules seen: {repeated or 'none'}. If the model keeps its layers in "
            "one module, or runs one layer repeatedly instead of a list of layers (ALBERT), modpass cannot route it."
        )
    blocks = []
    for index, path in enumerate(outermost):
        hidden, side = candidates[path]
        blocks.append(
            BlockInfo(
                index=index,
                path=path,
                block_class=classes[path],
                hidden_size=int(hidden.meta["val"].shape[-1]),
                hidden_shape=shape_key(hidden),
                side_inputs=tuple((s.name, shape_key(s)) for s in side),
            )
        )
    gm.meta["modpass_blocks"] = blocks
    return gm
