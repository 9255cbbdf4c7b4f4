"""Block stage 1, ``capture_block``: one block call as a flat, functional FX graph.

Expects: a block module and the ``(args, kwargs)`` of one real call to it.
Guarantees: a ``GraphModule`` whose placeholders are, in order, the block's
parameters, buffers and lifted constants, then every tensor leaf of the call
(``meta["modpass_inputs"]`` names each: ``("parameter", "self_attn.q_proj.weight")``,
``("input", 0)``, ...; a weight that a forward pre-hook sets (pruned by
``torch.nn.utils.prune``, or the older ``weight_norm`` and ``spectral_norm``), which
export lifts as a constant, is ``"hooked"``: it is taken anew at each call, while
other constants keep their captured value). Its output is the flat list of the call's outputs
(``meta["modpass_output_template"]`` rebuilds the structure). Every dimension larger
than 1 of every tensor leaf is symbolic unless the block itself fixes it, so
placeholder ``val`` shapes say which axes follow the token count; ``dynamic_axes``
narrows that to the given axes of each leaf (a region of a Dynamo graph passes the
axes Dynamo traced symbolically: its weights arrive as leaves, and symbols for their
sizes would only slow the capture down). View and
reshape sizes are written out where the model wrote ``-1`` (see
:func:`spell_out_inferred_sizes`), so the graph also runs on an empty batch.
The graph writes none of its inputs: where the block writes its hidden state in place (``x += ...``), it writes a
copy (``meta["modpass_writes_hidden_state"]`` says so, for callers that run the block's own forward on tokens they
read again). Raises ``CaptureError`` for blocks that do not export, that mutate state, assign tensor attributes or
write other Python state (see :class:`modpass._export.PythonState`), or that write another input in place.

Non-tensor leaves (flags, None) are baked into the graph, so a call with
different flags needs its own capture (the routed block caches per call
structure). ``meta["modpass_trace_dependencies"]`` is what else the capture
depended on (a :class:`~modpass.capture_sharing.TraceDependencies`: the block's
tree, its tensors' metadata, the attributes its forward read), by which another
block of the model can take it; None where that cannot be told.
"""

from __future__ import annotations

import operator
import sys
from functools import reduce

import sympy
import torch
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from .._export import (
    FlatCall,
    condition_failing_for_fewer,
    first_user_frame,
    hooks_silenced,
    tensor_attributes_detached,
    weight_hook_of,
)
from .._structure import Slot
from .._subgraphs import inlined
from ..capture_sharing import TraceDependencies
from ..errors import CaptureError
from .token_axes import mentions, size_expr
from .token_mixing import aliased_base, model_source_line, written_arguments
from .token_tables import cut_to_token_count

_ROLE = {
    InputKind.PARAMETER: "parameter",
    InputKind.BUFFER: "buffer",
    InputKind.CONSTANT_TENSOR: "constant",
}
_METADATA_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}
RESHAPES = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default}


def capture_block(block: torch.nn.Module, args: tuple, kwargs: dict, *, where: str = "block",
                  dynamic_axes: tuple[tuple[int, ...], ...] | None = None) -> torch.fx.GraphModule:
    swapped = [name for name, value in block.named_parameters(remove_duplicate=False) if type(value) is torch.Tensor]
    if swapped:
        raise CaptureError(
            f"{where}: the block's parameters are plain tensors in this call ({', '.join(swapped[:3])}"
            f"{', ...' if len(swapped) > 3 else ''}), as torch.func.functional_call passes them, and this call has a "
            "structure the routed block has not prepared (another dtype, device, or set of inputs), which modpass "
            "cannot capture there. Call the model once as it is with such inputs and parameters (after model.to(...), "
            "say) so that the structure is prepared, then call functional_call."
        )
    wrapper, tensors = FlatCall.wrap(block, args, kwargs, watch_reads=True)
    try:
        with hooks_silenced(block), tensor_attributes_detached(block):
            program = wrapper.export(tensors, dynamic_axes)
    except Exception as exc:  # torch raises many unrelated types here
        raise CaptureError(
            f"{where}: could not capture the block with symbolic sizes: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''} (at {first_user_frame(exc)}). Blocks must trace "
            "with torch.export (non-strict) for any sequence length; leave this block dense with layers=."
        ) from exc

    if wrapper.assignments.paths:
        raise CaptureError(
            f"{where}: the block's forward assigns tensor attributes ({', '.join(wrapper.assignments.paths)}). A routed "
            "call runs the block's captured graph, which makes no such assignment, so they would keep the values of an "
            "earlier dense call. Return the tensors from the block instead, or leave this block dense with layers=."
        )
    if wrapper.assignments.state:
        raise CaptureError(
            f"{where}: the block's forward writes Python state ({', '.join(wrapper.assignments.state)}). A routed call "
            "runs the block's captured graph, which holds its tensor operations only, so that state would keep what an "
            "earlier dense call left there and never see a routed call. Return the values from the block instead, or "
            "leave this block dense with layers=."
        )
    if wrapper.assignments.draws:
        raise CaptureError(
            f"{where}: the block's forward draws from the global random generator of {' and '.join(wrapper.assignments.draws)} "
            "(a LayerDrop written `random.random() < p`?). A routed call runs the block's captured graph, in which that "
            "draw is a constant: every routed call would repeat the outcome of the capture's draw. Draw with torch "
            "(torch.rand), which the graph draws again at every call, or leave this block dense with layers=."
        )
    signature = program.graph_signature
    refuse_size_assumptions(program, where)
    gm = program.graph_module
    state = state_targets(signature)
    roles = []
    user_index = 0
    for input_spec in signature.input_specs:
        if input_spec.kind == InputKind.USER_INPUT:
            roles.append(("input", user_index))
            user_index += 1
        else:
            target = state[input_spec.arg.name]
            role = _ROLE[input_spec.kind]
            if role == "constant" and weight_hook_of(block, target) is not None:
                role = "hooked"
            roles.append((role, target))
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    written = placeholders_written_in_place(gm)
    refuse_state_updates([target for node, (role, target) in zip(placeholders, roles) if role != "input" and node in written], where)
    inputs = [node for node, (role, _) in zip(placeholders, roles) if role == "input"]
    gm.meta["modpass_writes_hidden_state"] = give_the_hidden_state_a_copy_to_write(gm.graph, inputs, written, where)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _METADATA_ASSERTS:
            gm.graph.erase_node(node)
    spell_out_inferred_sizes(gm.graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    gm.meta["modpass_inputs"] = roles
    gm.meta["modpass_constants"] = {name.removeprefix(FlatCall.PREFIX): value for name, value in program.constants.items()}
    outputs = len(gm.graph.output_node().args[0])
    gm.meta["modpass_output_template"] = pytree.tree_unflatten([Slot(i) for i in range(outputs)], program.call_spec.out_spec)
    gm.meta["modpass_where"] = where
    gm.meta["modpass_trace_dependencies"] = TraceDependencies.of(block, wrapper.reads.by_path)
    return gm


def refuse_state_updates(written: list[str], where: str) -> None:
    """Refuse a block that updates its parameters, buffers or constants in place (``written``, their paths): a running
    average of its tokens, routed, would be updated from the selected ones only, and a mixed-task batch, whose groups
    run apart, would update it once per group (spectral norm's power iteration in training). (Export, on torch 2.6 and
    2.13 as checked, keeps such updates in the graph as in-place ops and lists none among its outputs.)"""
    if written:
        raise CaptureError(
            f"{where}: the block updates state in place ({', '.join(written)}). Routed, it runs on the selected tokens "
            "only, and on each task's rows apart in a mixed-task batch, so the update would differ from the dense "
            "model's. Leave this block dense with layers=."
        )


def give_the_hidden_state_a_copy_to_write(graph: torch.fx.Graph, inputs: list[torch.fx.Node],
                                          written: dict[torch.fx.Node, torch.fx.Node], where: str) -> bool:
    """Where the block writes its hidden state (``inputs[0]``) in place (``x += self.attn(x)``), have it write a
    copy; say whether it did. Refuse a block that writes another of its ``inputs`` in place (``written`` says which
    placeholders the graph writes, and where).

    The routed graph reads the selected tokens again after the block (``x_sel + w * (block(x_sel) - x_sel)``), so a
    write into them would change that update, silently (and autograd refuses it in training). The caller's hidden
    state is not changed by a routed call; a model that reassigns it from the block's output (``h = block(h)``), as
    models do, sees no difference. A write into another input (a mask, position embeddings) would reach the later
    blocks that read it in the dense model, but not from a routed block, which runs on gathered copies of them.
    """
    for i, node in enumerate(inputs[1:], start=1):
        if node in written:
            raise CaptureError(
                f"{where}: the block writes its input {i} (shape {tuple(node.meta['val'].shape)}) in place ({written[node].target} at "
                f"{model_source_line(written[node])}). Routed, the block runs on a gathered copy of the inputs that "
                "follow the tokens, so later blocks would not see the write as they do in the dense model. Compute a new "
                "tensor instead of writing into the input, or leave this block dense with layers=."
            )
    hidden = inputs[0] if inputs else None
    if hidden not in written:
        return False
    with graph.inserting_after(graph.find_nodes(op="placeholder")[-1]):
        copy = graph.call_function(torch.ops.aten.clone.default, (hidden,))
    copy.meta["val"] = hidden.meta["val"]
    hidden.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
    return True


def placeholders_written_in_place(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, torch.fx.Node]:
    """Each placeholder of ``gm`` that an op writes in place (through views of it too, and under ``no_grad`` or
    ``autocast``, as running statistics are updated), with the first such op."""
    view = inlined(gm)
    placeholder = dict(zip(view.graph.find_nodes(op="placeholder"), gm.graph.find_nodes(op="placeholder")))
    written: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in view.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        for value in written_arguments(node):
            base = aliased_base(value)
            if base.op == "placeholder":
                written.setdefault(placeholder[base], node)
    return written


def state_targets(signature: torch.export.ExportGraphSignature) -> dict[str, str]:
    """Each parameter, buffer and constant placeholder's name -> its path in the block (``self_attn.q_proj.weight``)."""
    return {
        spec.arg.name: spec.target.removeprefix(FlatCall.PREFIX)
        for spec in signature.input_specs
        if spec.kind != InputKind.USER_INPUT and spec.target is not None
    }


# Torch before 2.8 bounds a token count by 2**63 + 1, not infinity, after `diagonal(offset=1)`.
_NO_SIZE_REACHES = sys.maxsize


def refuse_size_assumptions(program: torch.export.ExportedProgram, where: str) -> None:
    """Refuse a block whose code made its graph hold only for some batch sizes or token counts.

    Export records what the block's code assumed about a symbolic size (a
    branch on ``T > 8`` gives ``T`` the range ``[9, inf]``, reading a 64-row
    table by it, ``table[:T]``, the range ``[2, 64]``) and drops the other
    branch. The routed graph runs the block on k of T tokens, and a mixed
    batch on groups of any size, where that branch may not hold: the result
    would differ without a word. Both sizes of the hidden state keep export's
    default range, ``[2, inf]``, or the block is refused (other sizes, such as
    the width, are the same in every call); an upper bound no tensor size can
    reach counts as none. A block that reads a table by its
    token count is refused with or without a recorded range, since export
    traces ``table.split(T)`` for one count without recording one. What a
    range cannot say (``if T % 2 == 0``) export keeps as a guard, tried with
    each smaller size (:func:`modpass._export.condition_failing_for_fewer`).
    """
    placeholders = {node.name: node for node in program.graph.find_nodes(op="placeholder")}
    inputs = [placeholders[spec.arg.name] for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]
    varying = dict(zip(("batch", "token count"), inputs[0].meta["val"].shape[:2]))
    tokens = varying.get("token count")
    symbol = tokens.node.expr if isinstance(tokens, torch.SymInt) else None
    batch = size_expr(varying["batch"])
    # A table cut to T rows (read per sequence, see token_tables) bounds T by its length: k <= T keeps within it.
    table_lengths = {size_expr(cut.source.meta["val"].shape[cut.axis]) - cut.start for node in program.graph.nodes
                     if (cut := cut_to_token_count(node, symbol, batch)) is not None}
    described = []
    for name, size in varying.items():
        bounds = program.range_constraints.get(size.node.expr) if isinstance(size, torch.SymInt) else None
        upper_bounded = bounds is not None and bounds.upper < _NO_SIZE_REACHES
        if name == "token count" and upper_bounded and bounds.upper in table_lengths:
            upper_bounded = False
        if bounds is not None and (bounds.lower > 2 or upper_bounded):
            described.append(f"a {name} in [{bounds.lower}, {bounds.upper}]")
    held = f"its graph holds only for {' and '.join(described)}"
    # Looked for even where export recorded no range: it traces `table.split(T)` without one.
    tables = tables_read_by_length(program, symbol, batch) if symbol is not None else []
    if tables:
        raise CaptureError(
            f"{where}: the block reads a fixed-size table by its token count ({', '.join(tables)})"
            f"{', so ' + held if described else ''}. Routed, it would read rows by the k selected tokens' slots, not "
            "the rows of their positions, so it is not routed. Pass the rows (or positions) in from outside the "
            "block, or leave this block dense with layers=."
        )
    for name, size in varying.items() if not described else ():
        failing = condition_failing_for_fewer(size) if isinstance(size, torch.SymInt) else None
        if failing is not None:
            condition, location, value = failing
            shown = condition.xreplace({size.node.expr: sympy.Symbol("T" if name == "token count" else "B")})
            described, held = [name], f"its graph holds only where {shown} (at {location}), which fails for a {name} of {value}"
            break
    if described:
        raise CaptureError(
            f"{where}: the block's code branches on the size of its hidden state: {held}. Routing runs the block on "
            "the k selected tokens (and a mixed batch on groups of any size), where the branch it took may not hold, "
            "so it is not routed. Leave this block dense with layers=."
        )


# Each way of cutting rows off a tensor: how the message says it, and its source, axis and the bounds it cuts at.
_CUTS = {
    torch.ops.aten.slice.Tensor: ("sliced", lambda source, dim=0, start=None, end=None, step=1: (source, dim, [start, end])),
    torch.ops.aten.narrow.default: ("narrowed", lambda source, dim, start, length: (source, dim, [length])),
    torch.ops.aten.split.Tensor: ("split", lambda source, split_size, dim=0: (source, dim, [split_size])),
    torch.ops.aten.split_with_sizes.default: ("split", lambda source, sizes, dim=0: (source, dim, list(sizes))),
}


def tables_read_by_length(program: torch.export.ExportedProgram, symbol: sympy.Symbol, batch) -> list[str]:
    """The tensors without a token axis that the block cuts to its token count (``table.split(T)``, a table with
    a batch axis cut to ``[:T]``, ``table[-T:]``), described; not those ``token_tables`` reads per sequence
    (``table[:T]``, ``table[1 : T + 1]``, ``table.narrow(0, 0, T)`` where the table has no batch axis)."""
    names = state_targets(program.graph_signature)
    user_inputs = [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]
    names.update({name: f"tensor input {i} of the call (counting from 0)" for i, name in enumerate(user_inputs)})
    tables = []
    for node in inlined(program.graph_module).graph.nodes:
        if node.op != "call_function" or node.target not in _CUTS or cut_to_token_count(node, symbol, batch) is not None:
            continue
        cut, arguments = _CUTS[node.target]
        source, dim, lengths = arguments(*node.args, **node.kwargs)
        bounds = [length.meta.get("val") if isinstance(length, torch.fx.Node) else length for length in lengths]
        if not any(isinstance(bound, torch.SymInt) and mentions(bound, symbol) for bound in bounds):
            continue
        if any(mentions(size, symbol) for size in source.meta["val"].shape):
            continue
        tables.append(f"{names.get(source.name, 'a tensor the block computes')} {cut} to the token count along dim {dim} "
                      f"[{model_source_line(node)}]")
    return tables


def spell_out_inferred_sizes(graph: torch.fx.Graph) -> None:
    """Replace the ``-1`` of each view/reshape by the size it stands for.

    A ``-1`` is inferred from the element count, which is ambiguous for an
    empty tensor: torch refuses it in eager mode and, for a data-dependent
    batch, asserts a non-zero batch at run time. A routed block meets both
    when a task has no sequences in a mixed batch (an empty group), so sizes
    are written out from symbolic sizes (``meta["val"]``) of the reshaped
    tensor or the graph inputs, wherever they are a product or sum of them;
    any other ``-1`` is left as it was.
    """
    placeholder_symbols = _symbols_of(graph.find_nodes(op="placeholder"))
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in RESHAPES:
            continue
        shape = list(node.args[1])
        inferred = [i for i, size in enumerate(shape) if isinstance(size, int) and size == -1]
        if not inferred:
            continue
        # Sizes of the reshaped tensor itself first: the routing rewrite later
        # feeds the block k gathered tokens, and a size read from the tensor
        # follows; one read from an input follows only if that input is gathered.
        symbols = {**placeholder_symbols, **_symbols_of([node.args[0]])}
        with graph.inserting_before(node):
            size = node.meta["val"].shape[inferred[0]]
            size = _size_node(graph, sympy.sympify(size.node.expr if isinstance(size, torch.SymInt) else size), symbols)
        if size is not None:
            shape[inferred[0]] = size
            node.args = (node.args[0], shape, *node.args[2:])


def _symbols_of(nodes) -> dict:
    """``{symbol: (node, axis)}`` for the axes of ``nodes`` whose size is a plain symbol (first occurrence wins)."""
    symbols = {}
    for node in nodes:
        value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        for axis, size in enumerate(value.shape if isinstance(value, torch.Tensor) else ()):
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                symbols.setdefault(size.node.expr, (node, axis))
    return symbols


def _size_node(graph: torch.fx.Graph, expr: sympy.Expr, symbols: dict):
    """``expr`` as an int or a graph value built from input sizes; None if it is not expressible."""
    if expr.is_Integer:
        return int(expr)
    if expr in symbols:
        source, axis = symbols[expr]
        node = graph.call_function(torch.ops.aten.sym_size.int, (source, axis))
        node.meta["val"] = source.meta["val"].shape[axis]
        return node
    if isinstance(expr, (sympy.Mul, sympy.Add)):
        terms = [_size_node(graph, term, symbols) for term in expr.args]
        if any(term is None for term in terms):
            return None
        combine = operator.mul if isinstance(expr, sympy.Mul) else operator.add
        return reduce(lambda a, b: _combined(graph, combine, a, b), terms)
    return None


def _combined(graph: torch.fx.Graph, combine, a, b) -> torch.fx.Node:
    node = graph.call_function(combine, (a, b))
    node.meta["val"] = combine(*(x.meta["val"] if isinstance(x, torch.fx.Node) else x for x in (a, b)))
    return node
