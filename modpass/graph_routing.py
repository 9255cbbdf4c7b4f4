"""The second entry to the pass: route an unrouted model inside the compile backend.

Dynamo has already traced the model to one flat FX graph. This module finds
the blocks in it (``find_blocks`` on ``nn_module_stack``), cuts each planned
block's region out as a graph of its own, runs the same block stages as
``transform`` (``capture_block -> token_axes -> token_mixing -> rewrite``)
and splices the routed region back in. Routers are constants here: zeros for
``options={"ratios": ...}`` (identity gates) or the trained weights of a plan
saved by ``modpass.save``.

The token count must be symbolic in the Dynamo graph (``dynamic=True``, or
the dynamic recompile after a second length): a static graph bakes ``T`` into
reshapes and cannot run on ``k`` tokens. Dynamo has also already chosen
every branch the model's code takes on ``T`` and kept only a guard for it, so
the graph is refused where a guard on ``T`` fails for fewer tokens (the cut
region would run that branch on ``k`` tokens regardless).
"""

from __future__ import annotations

import dataclasses
import operator
import re
import warnings
from collections import Counter

import sympy
import torch

from . import _structure
from ._compat import INDUCTOR_FAILS_ON_ONE_TOKEN_ROUTING, outside_dynamo_tracing
from ._export import condition_failing_for_fewer, resolve, symbolic_axes
from .block import RoutedBlock, copy_graph_module
from .capture_sharing import RegionCaptures, graph_structure
from .config import RoutingConfig
from .errors import ConfigError, NoBlocksError, PlanError, UnroutableBlockError
from .io import read
from .passes.find_blocks import block_stacks, find_blocks
from .passes.plan import plan as plan_stage
from .passes.token_mixing import POSITION_WISE_OPS
from .pipeline import capture_block_graph, route_block_graph
from .plan import RoutingPlan, in_scope, scope_note

# The traced model is a local of the compiled frame: its ``self``, or, where the model's forward is
# wrapped by a ``(*args, **kwargs)`` decorator (transformers >= 5.24 wraps
# ``LlamaForCausalLM.forward`` so), an element of ``args``: ``L['args'][0].model.layers.0``.
_DYNAMO_ROOT = re.compile(r"^L\['args'\]\[\d+\]|^L\['[^']+'\]")


# Older Dynamo (torch 2.6) names submodules by their access path, ``_modules['layers']._modules['0']``
# or ``layers[0]``; newer releases already write ``layers.0``.
_MODULES_ACCESS = re.compile(r"_modules\['([^']*)'\]")
_INDEX_ACCESS = re.compile(r"\[(\d+)\]")


def module_path(dynamo_path: str) -> str:
    """``named_modules()``-style path of a Dynamo module-stack entry (``""`` for the model itself)."""
    path = _DYNAMO_ROOT.sub("", dynamo_path).removeprefix(".")
    return _INDEX_ACCESS.sub(r".\1", _MODULES_ACCESS.sub(r"\1", path))


def normalise_dynamo_metadata(gm: torch.fx.GraphModule) -> None:
    """Give Dynamo nodes the metadata the passes read: ``val`` and module paths relative to the model."""
    for node in gm.graph.nodes:
        if "val" not in node.meta and "example_value" in node.meta:
            node.meta["val"] = node.meta["example_value"]
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {key: (module_path(path), cls) for key, (path, cls) in stack.items()}


def rooted_at_graph(
    plan: RoutingPlan, routers: dict[str, torch.Tensor], graph_paths: list[str]
) -> tuple[RoutingPlan, dict[str, torch.Tensor]]:
    """The plan (and router names) with block paths relative to the module Dynamo traced.

    A graph break above the blocks (in the model's own wrapper code, say)
    hands the backend a frame rooted at a submodule: there ``layers.1`` is the
    plan's ``model.layers.1``. The plan fits when every one of its blocks is
    one prefix away from a block of the graph and the block counts inside the
    plan's ``within`` agree.
    """
    prefixes = sorted({p.path[: -len(g)] for p in plan.blocks for g in graph_paths if p.path.endswith("." + g)})
    for prefix in ["", *prefixes]:  # a prefix ends with "."
        scoped = {g for g in graph_paths if in_scope(prefix + g, plan.within)}
        if len(scoped) != plan.num_blocks or not all(
            b.path.startswith(prefix) and b.path.removeprefix(prefix) in scoped for b in plan.blocks
        ):
            continue
        if not prefix:
            return plan, routers
        within = plan.within[len(prefix):] if (plan.within + ".").startswith(prefix) else ""
        blocks = tuple(dataclasses.replace(b, path=b.path.removeprefix(prefix)) for b in plan.blocks)
        moved = {name.removeprefix(prefix): value for name, value in routers.items() if name.startswith(prefix)}
        return dataclasses.replace(plan, blocks=blocks, within=within), moved
    raise PlanError(
        f"the plan routes {[b.path for b in plan.blocks]} of {plan.num_blocks} blocks{scope_note(plan.within)}; the graph has "
        f"{graph_paths}. Save the plan from a transform of this model class and depth."
    )


def choose_plan(gm: torch.fx.GraphModule, options: dict) -> tuple[RoutingPlan, str, dict[str, torch.Tensor]] | None:
    """The plan, the task to route and the router tensors, from backend options.

    None when the graph holds none of the blocks to route: where graph
    breaks split a model, a part with only a vision tower's blocks (of
    another class than the plan's, or outside ``within``) compiles unrouted.
    """
    found = gm.meta["modpass_blocks"]
    if "plan" in options:
        if any(k in options for k in ("ratios", "layers", "within", "gate")):
            raise ConfigError("give either options['plan'] or options['ratios'] (with 'layers', 'within', 'gate'), not both.")
        plan, routers = read(options["plan"])
        if scope_in_graph(found, plan.within) is None or not {b.block_class for b in plan.blocks} & {b.block_class for b in found}:
            return None
        plan, routers = rooted_at_graph(plan, routers, [b.path for b in found])
        widths = {b.path: b.hidden_size for b in found}
        other = next((b for b in plan.blocks if widths.get(b.path, b.hidden_size) != b.hidden_size), None)
        if other is not None:
            raise PlanError(
                f"the plan routes {other.path} at width {other.hidden_size}, but this model's block there is "
                f"{widths[other.path]} wide: the plan was saved from another configuration. Save the plan from a "
                "transform of this model."
            )
    else:
        if "ratios" not in options:
            raise ConfigError("backend routing needs options['ratios'] (or options['plan']).")
        within = scope_in_graph(found, options.get("within", ""))
        if within is None:
            return None
        refuse_a_stack_split_by_graph_breaks(found, within)
        config = RoutingConfig.from_arguments(options["ratios"], layers=options.get("layers", "every_other"),
                                              within=within, gate=options.get("gate", "tanh"))
        plan = plan_stage(gm, config).meta["modpass_plan"]
        routers = {}
        warnings.warn(
            "modpass backend: routing with fresh identity-gated routers (zero weights): the selection is "
            "positional until routers are trained; use this to measure speed and equivalence.",
            stacklevel=2,
        )
    task = options.get("task")
    if task is None:
        if len(plan.tasks) != 1:
            raise ConfigError(f"the plan routes tasks {list(plan.tasks)}; pick one with options['task'].")
        task = plan.tasks[0]
    elif task not in plan.tasks:
        raise ConfigError(f"unknown task {task!r}; the plan routes {list(plan.tasks)}.")
    return plan, task, routers


def refuse_a_stack_split_by_graph_breaks(found: list, within: str) -> None:
    """Refuse a graph that holds a stack's blocks from the middle on (``h.3``, ``h.4``, ``h.5`` of six): graph breaks
    between blocks split the model, and ``layers``, per-block lists and schedules count the blocks of the one graph the
    backend sees, so they would count ``h.3`` as block 0. (A part that starts at a stack's first block cannot tell
    that more follow, but the part after it, compiled in the same call, refuses.)"""
    by_stack: dict[str, list[str]] = {}
    for block in found:
        if in_scope(block.path, within):
            by_stack.setdefault(block.stack, []).append(block.path.rpartition(".")[2])
    for stack, names in by_stack.items():
        if all(name.isdigit() for name in names) and sorted(map(int, names)) != list(range(len(names))):
            raise ConfigError(
                f"this graph holds blocks {names} of {stack or 'the model'} and not the others: graph breaks split the "
                "model between its blocks, and options['ratios'] counts blocks (layers, per-block lists, schedules) "
                "within one graph, so it would count the first of these as block 0. Remove the graph break "
                "(torch.compile(fullgraph=True) names it), or route with modpass.transform(model, ratios, ...) and "
                "compile the routed model."
            )


def scope_in_graph(found: list, within: str) -> str | None:
    """``within`` (a path in the compiled model) as a path in a graph that may be rooted below it, or None when the
    graph holds no block inside it. A graph break above the blocks roots the graph at a submodule: there
    ``model.language_model`` is ``language_model``."""
    if not within:
        return ""
    parts = within.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        if any(in_scope(b.path, candidate) for b in found):
            return candidate
    return None


def unrouted(gm: torch.fx.GraphModule, why: str) -> torch.fx.GraphModule:
    # Not an error: where graph breaks split a model, a part may hold only blocks that are not to be routed (a vision
    # tower's). The backend sees one part at a time, so it cannot tell that from options that route nothing anywhere.
    warnings.warn(
        f"modpass backend: a graph Dynamo traced ({len(gm.graph.nodes)} nodes: the whole model, or a part of it between "
        f"graph breaks) {why}; it compiles unrouted. If nothing of the model is routed, check options['within'] and "
        "that options['plan'] was saved from this model: modpass.load(model, plan) or modpass.transform(model, ratios, "
        "within=...) says what does not fit. Blocks count only where they lie whole in one graph with their siblings: "
        "a graph break inside the layer loop or inside a block (a print, .item()) leaves none to route "
        "(torch.compile(fullgraph=True) names it).",
        stacklevel=3,
    )
    return gm


def region_of(gm: torch.fx.GraphModule, path: str) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr") and path in module_paths(n)]


def refuse_a_planned_block_split_by_graph_breaks(gm: torch.fx.GraphModule, options: dict) -> None:
    """Refuse a graph that holds a block the plan option routes, or part of it, where no stack of blocks lies whole:
    a graph break inside the block (``nn.TransformerEncoderLayer``'s fast-path checks, a print) or between blocks
    split the model, and compiled unrouted the served model would run the block dense, which a warning alone leaves
    easy to miss."""
    if "plan" not in options:
        return
    plan, _ = read(options["plan"])
    paths = {path for node in gm.graph.nodes for path in module_paths(node)}
    split = next((b.path for b in plan.blocks if any(p == b.path or p.startswith(b.path + ".") for p in paths)), None)
    if split is not None:
        raise ConfigError(
            f"options['plan'] routes {split}, and this graph Dynamo traced holds it, or part of it, without a whole "
            "stack of blocks: a graph break inside the block or between blocks splits the model, so the block cannot "
            "be routed here, and the model would run it dense. "
            "torch.compile(model, fullgraph=True) names the break; or route the model with modpass.load(model, plan) "
            "and compile that, which captures each block on its own."
        )


def module_paths(node: torch.fx.Node) -> set[str]:
    return {path for path, _ in (node.meta.get("nn_module_stack") or {}).values()}


def unshare_scalar_arithmetic(gm: torch.fx.GraphModule, block_paths: list[str]) -> None:
    """Give each block its own copy of the scalar arithmetic it uses from outside itself.

    Dynamo traces a float global once per graph (``math.pi`` in GPT-2's
    ``gelu_new`` becomes one 0-d input), and the first block's
    ``sqrt(2 / pi)`` then feeds every later block. Cut as it is, one region
    would hand a float to the next, which neither can be routed with (a
    region's inputs and outputs are tensors and sizes). A copy inside each
    block makes every region self-contained; the arithmetic is on scalars
    and costs nothing. Only arithmetic that starts from graph inputs is
    copied, so no region gains a tensor input.
    """
    portable: dict[torch.fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            portable[node] = True
        elif node.op in ("call_function", "call_method"):
            portable[node] = not isinstance(node.meta.get("val"), torch.Tensor) and all(portable.get(a, False) for a in node.all_input_nodes)
    copies: dict[tuple[torch.fx.Node, str], torch.fx.Node] = {}

    def local(node: torch.fx.Node, path: str, before: torch.fx.Node) -> torch.fx.Node:
        if node.op == "placeholder" or not portable.get(node) or path in module_paths(node):
            return node
        if (node, path) not in copies:
            with gm.graph.inserting_before(before):
                copy = gm.graph.node_copy(node, lambda arg: local(arg, path, before))
            copy.meta = {**node.meta, "nn_module_stack": before.meta["nn_module_stack"]}
            copies[node, path] = copy
        return copies[node, path]

    for user in list(gm.graph.nodes):
        path = next((p for p in block_paths if p in module_paths(user)), None)
        if path is not None:
            for node in user.all_input_nodes:
                user.replace_input_with(node, local(node, path, user))


def scalar_attribute(node: torch.fx.Node) -> float | int | None:
    """The value of a module's float attribute (say a norm's ``eps``) that Dynamo passes as a 0-d tensor."""
    example = getattr(node.meta.get("grapharg"), "example", None)
    if node.op != "placeholder" or not isinstance(example, torch.Tensor) or example.dim() != 0:
        return None
    if isinstance(example, torch._subclasses.FakeTensor) or not all(u.op == "call_method" and u.target == "item" for u in node.users):
        return None
    return example.item()


LEAVE_DENSE = "modpass.transform, which captures each block on its own, may route it; or leave it dense with options['layers']."


def extract(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], where: str, shared: set[torch.fx.Node] = frozenset()
            ) -> tuple[torch.fx.GraphModule, list[torch.fx.Node], list[torch.fx.Node]]:
    """A region as its own graph: ``(region module, outer input nodes, outer output nodes)``.

    The hidden state is the first input and the new hidden state the first
    output: of the inputs shaped like an output, the first that is not
    ``shared`` with the region's sibling blocks (a positional tensor every
    block reads, which it may read before its hidden state). Sizes that Dynamo passes as inputs, or that the region computes
    from them, are re-derived from a tensor input carrying the same size, so
    the region's sizes follow its tensors when it is captured again.
    """
    region = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in region))
    outputs = [n for n in nodes if any(u not in region for u in n.users)]
    hidden_shape = None
    for node in sorted(inputs, key=lambda node: node in shared):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 3 and any(
            isinstance(o.meta.get("val"), torch.Tensor) and tuple(map(str, o.meta["val"].shape)) == tuple(map(str, val.shape)) for o in outputs
        ):
            hidden_shape = tuple(map(str, val.shape))
            inputs.remove(node)
            inputs.insert(0, node)
            break
    outputs.sort(key=lambda o: not (isinstance(o.meta.get("val"), torch.Tensor) and tuple(map(str, o.meta["val"].shape)) == hidden_shape))

    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    scalars = {i: scalar_attribute(i) for i in inputs}
    scalars = {i: v for i, v in scalars.items() if v is not None}
    tensor_inputs = [i for i in inputs if isinstance(i.meta.get("val"), torch.Tensor) and i not in scalars]
    for node in tensor_inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    dims: dict[str, tuple[torch.fx.Node, int]] = {}
    for tensor in tensor_inputs:
        for d, size in enumerate(tensor.meta["val"].shape):
            dims.setdefault(str(size), (tensor, d))

    def read_size(node: torch.fx.Node) -> torch.fx.Node:
        tensor, d = dims[str(node.meta["val"])]
        return graph.call_function(torch.ops.aten.sym_size.int, (env[tensor], d))

    # A size the block computes from outer symbols (a concatenated sequence's ``s0 + s1``) is read off the
    # tensor input that carries it, so its sizes follow its tensors and the symbols need not cross.
    derived = {n for n in nodes if n.op != "placeholder" and isinstance(n.meta.get("val"), torch.SymInt) and str(n.meta["val"]) in dims}
    used = {a for n in nodes if n not in derived for a in n.all_input_nodes}
    for node in inputs:
        if node in env or node in scalars or node not in used:
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.SymInt):
            raise UnroutableBlockError(f"{where}: block input {node.name} is a {type(value).__name__}; only tensors and sizes "
                                       f"can cross a routed block. {LEAVE_DENSE}")
        if str(value) not in dims:
            raise UnroutableBlockError(f"{where}: size {value} used by the block is not the size of any tensor it receives "
                                       f"(it is computed outside the block). {LEAVE_DENSE}")
        env[node] = read_size(node)
    for node in nodes:
        if node in derived:
            env[node] = read_size(node)
        elif node.op == "call_method" and node.target == "item" and node.args[0] in scalars:
            env[node] = scalars[node.args[0]]
        else:
            env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(tuple(env[o] for o in outputs))
    return torch.fx.GraphModule(gm, graph), tensor_inputs, outputs


def freeze_constants(routed: torch.fx.GraphModule, constants: dict, reference: torch.Tensor) -> list[int]:
    """Turn the routed graph's router and constant inputs into values built inside it.

    Inside a Dynamo graph, new parameters, buffers or tensor attributes have
    no source Inductor accepts, so each constant becomes a ``torch.tensor``
    literal in the graph (a router is ``D + 1`` numbers). Returns the
    outer-input indices the remaining placeholders take, in order.
    """
    placeholders = [n for n in routed.graph.nodes if n.op == "placeholder"]
    kept = []
    for node, (role, target) in zip(placeholders, routed.meta["modpass_inputs"]):
        if role == "input":
            kept.append(target)
            continue
        value = constants[(role, target)].detach()
        dtype = reference.dtype if value.is_floating_point() else value.dtype
        with routed.graph.inserting_before(node):
            literal = routed.graph.call_function(torch.tensor, (value.tolist(),), {"dtype": dtype, "device": reference.device})
        node.replace_all_uses_with(literal)
        routed.graph.erase_node(node)
    routed.recompile()
    return kept


def refuse_fixed_token_count(gm: torch.fx.GraphModule, hidden: torch.fx.Node, where: str) -> None:
    """A block can run on k tokens only where the Dynamo graph keeps the token count symbolic, and apart from the batch."""
    batch, tokens = hidden.meta["val"].shape[:2]
    if isinstance(tokens, torch.SymInt) and isinstance(batch, torch.SymInt) and batch.node.expr == tokens.node.expr:
        raise ConfigError(
            f"{where}: Dynamo traced the batch and the sequence length as one size ({tokens.node.expr}): the call it "
            "compiled had as many sequences as tokens in each, and Dynamo gives equal sizes one symbol (duck sizing). "
            "Compile on a first call whose batch and length differ, or set torch.fx.experimental._config."
            "use_duck_shape = False before compiling."
        )
    if isinstance(tokens, torch.SymInt) or (tokens == 1 and not INDUCTOR_FAILS_ON_ONE_TOKEN_ROUTING):
        return  # one token, which Dynamo never makes symbolic: k is 1 too
    if tokens == 1:
        raise ConfigError(f"{where}: the call Dynamo compiled had one token per sequence, whose routed graph this torch's "
                          "Inductor cannot compile (torch 2.6). Compile on a first call of two tokens or more.")
    symbolic = any(
        isinstance(size, torch.SymInt)
        for node in gm.graph.find_nodes(op="placeholder") if isinstance(node.meta.get("val"), torch.Tensor)
        for size in node.meta["val"].shape
    )
    cause = (
        "the model's code fixes it although other sizes are symbolic (ViT, say, adds position embeddings of one length)"
        if symbolic else "the graph is static: compile with torch.compile(..., dynamic=True)"
    )
    raise ConfigError(
        f"{where}: the traced graph has a fixed sequence length of {tokens}, so the block cannot run on k tokens there: "
        f"{cause}. modpass.transform(model, ratios) followed by torch.compile routes such models: it captures each block on its own."
    )


def refuse_token_count_branches(inputs: list[torch.fx.Node], where: str) -> None:
    """Refuse a graph whose code took a branch that holds for T tokens but not for fewer.

    Dynamo has already chosen the branches a block's code takes on the token
    count (``if T > 8``) and left a guard for each; the region cut from its
    graph no longer shows them, and the routed block runs that branch on k
    of T tokens. So every guard and runtime assert on the token count must
    hold for each count from 2 (export's least) up to T: an upper bound
    (``T <= max_positions``) does, ``T > 8`` or ``T % 8 == 0`` does not. The
    guards are the whole graph's, so one outside the blocks is refused too
    (``modpass.transform`` checks each block alone); those relating T to other
    sizes are not judged (see :func:`modpass._export.condition_failing_for_fewer`).
    """
    tokens = inputs[0].meta["val"].shape[1]
    failing = condition_failing_for_fewer(tokens) if isinstance(tokens, torch.SymInt) else None
    if failing is not None:
        condition, location, count = failing
        shown = condition.xreplace({tokens.node.expr: sympy.Symbol("T", integer=True, positive=True)})
        raise UnroutableBlockError(
            f"{where}: the traced graph holds only where {shown} for the token count T (at {location}); at T = {count} "
            f"of {tokens.node.hint} it does not. Routing runs blocks on k of T tokens, where a branch the code took on T "
            "may not hold. modpass.transform(model, ratios) then torch.compile checks each block on its own and refuses "
            "only blocks that branch so; or leave the block that branches dense with options['layers']."
        )


#: The analysed captures of the regions routed so far, in this process (see :mod:`modpass.capture_sharing`).
REGION_CAPTURES = RegionCaptures()


def region_key(region: torch.fx.GraphModule) -> tuple | None:
    """What a region's analysis depends on: its graph, the grad mode it is traced in, and the custom ops declared
    position-wise (``modpass.declare_position_wise``); the rest is fixed by the torch release (``modpass._compat``).
    None where the graph cannot be compared."""
    structure = graph_structure(region)
    return None if structure is None else (structure, torch.is_grad_enabled(), frozenset(POSITION_WISE_OPS))


def route_dynamo_graph(gm: torch.fx.GraphModule, example_inputs, options: dict) -> torch.fx.GraphModule:
    normalise_dynamo_metadata(gm)
    if any(cls is RoutedBlock or (isinstance(cls, str) and cls.endswith(".RoutedBlock"))
           for node in gm.graph.nodes for _, cls in (node.meta.get("nn_module_stack") or {}).values()):
        raise ConfigError(
            "the model is already routed (modpass.transform or modpass.load): compile it without routing options "
            "(torch.compile(model, backend='modpass')); options['plan'] and options['ratios'] route an unrouted model."
        )
    try:
        gm = find_blocks(gm)
    except NoBlocksError:
        refuse_a_planned_block_split_by_graph_breaks(gm, options)
        return unrouted(gm, "holds no transformer blocks")
    chosen = choose_plan(gm, options)
    if chosen is None:
        found = gm.meta["modpass_blocks"]
        return unrouted(gm, f"holds none of the blocks to route (it holds {block_stacks(found)}, of "
                            f"{sorted({b.block_class.rpartition('.')[2] for b in found})})")
    plan, task, routers = chosen
    unshare_scalar_arithmetic(gm, [block.path for block in plan.blocks if block.ratios.get(task) is not None])
    regions = {block.path: region_of(gm, block.path) for block in gm.meta["modpass_blocks"]}
    readers = Counter(a for nodes in regions.values() for a in {a for n in nodes for a in n.all_input_nodes} - set(nodes))
    shared = {node for node, count in readers.items() if count > 1}
    for number, block in enumerate(plan.blocks):
        ratio = block.ratios.get(task)
        if ratio is None:
            continue
        nodes = regions[block.path]  # splicing earlier blocks in leaves a later block's nodes as they were
        where = block.where
        region, inputs, outputs = extract(gm, nodes, where, shared)
        refuse_fixed_token_count(gm, inputs[0], where)
        refuse_token_count_branches(inputs, where)
        values = [i.meta["val"] for i in inputs]
        key = region_key(region)
        analysed = REGION_CAPTURES.find(key)
        if analysed is None:
            with outside_dynamo_tracing():
                analysed = capture_block_graph(region, tuple(_structure.realize(v) for v in values), {}, where=where,
                                               dynamic_axes=tuple(symbolic_axes(v) for v in values))
            # What a module's capture depended on: regions are shared by their code instead, and its module layout holds
            # the region's class, made per GraphModule, which Inductor's FX graph cache cannot pickle (it then bypasses).
            analysed.meta.pop("modpass_trace_dependencies", None)
            REGION_CAPTURES.add(key, analysed)
        routed = route_block_graph(copy_graph_module(analysed, where=where), ratio=ratio, gate=plan.gate)
        reference = next(v for v in values if v.is_floating_point())
        if routers:  # a saved plan: io.read has checked that every router is there
            weight, bias = (routers[f"{block.path}.mod_routers.{task}.{name}"] for name in ("weight", "bias"))
        else:  # fresh identity-gated routers
            weight, bias = torch.zeros(1, block.hidden_size), torch.zeros(1)
        constants = {("router", "weight"): weight, ("router", "bias"): bias}
        constants.update({("constant", name): value for name, value in routed.meta["modpass_constants"].items()})
        constants.update({(role, target): resolve(region, target) for role, target in routed.meta["modpass_inputs"] if role in ("parameter", "buffer")})
        region_inputs = freeze_constants(routed, constants, reference)
        name = f"modpass_block{number}"
        gm.add_submodule(name, routed)
        with gm.graph.inserting_before(nodes[-1].next):
            call = gm.graph.call_module(name, tuple(inputs[i] for i in region_inputs))
            for position, output in enumerate(outputs):
                routed_output = gm.graph.call_function(operator.getitem, (call, position))
                routed_output.meta["val"] = output.meta.get("val")  # later blocks read it
                output.replace_all_uses_with(routed_output)
        # The region's own nodes, and only those: a dead-code pass over the whole graph would also drop the
        # model's in-place writes through views elsewhere (DeepSeek-V3 fills its keys with `k[..., :n].copy_()`,
        # a call_method that nothing uses), leaving the memory they should have filled uninitialised.
        for node in reversed(nodes):
            gm.graph.erase_node(node)
    gm.recompile()
    return gm
