"""Block stage 3, ``token_tables``: a table the whole batch shares, read by token position, is read per sequence.

Expects: a graph annotated by ``token_axes``.
Guarantees: each value the block reads by position from a table without a batch axis,

* an input indexed by token and not by sequence (litgpt's rotary ``cos, sin`` of ``(T, d)``, Meta Llama's
  ``freqs_cis``, a ``(T, T)`` bias or mask),
* a table cut to ``T`` rows from a constant row inside the block (``table[:T]``, ``table[1 : T + 1]``,
  ``table.narrow(0, s, T)``: torchtitan's ``freqs_cis[0:seqlen]``, a rotary buffer),
* positions the block counts out itself and computes with (``arange(T)`` turned into rotary angles), counted in
  steps of one from a constant or a start in ``T`` (MPT's ALiBi distances, ``arange(1 - T, 1)``),

is read per sequence at ``routing.token_positions(hidden)`` (``(B, T)``), plus the cut's or count's start: a
table's rows by ``routing.rows_of_table``, counted positions as those positions. A start in ``T`` is taken at
``routing.token_count(hidden)``, which the rewrite leaves reading the whole sequences (the routed block's own ``T``
is k). What the block computes from such values alone (views, casts, pointwise math with its weights, ``outer``,
``einsum``, products with weights) runs with a leading batch axis,
and where it meets a value of the sequences (a pointwise op, an attention mask, a matrix product), it takes that
value's layout (``cos (T, d)`` multiplying queries ``(B, H, T, d)`` becomes ``(B, 1, T, d)``). The graph computes
what it did. The rewrite puts the selected tokens' positions in place of ``token_positions``, so a routed token
reads its own position's rows, not row ``i`` for its slot ``i`` among the selected. Inputs read this way get
``meta["modpass_token_axes"] = ()``: the rewrite passes them whole. A call captured for a fixed batch above
one (no batch symbol to tell a table from a sequence-first input) is left as it is.

Refuses (``UnroutableBlockError``) a table's values transformed or met by an op this stage cannot apply per
sequence (the message names it), and a table cut to the token count under ``no_grad`` or ``autocast``
(a subgraph, which this stage does not rewrite).
"""

from __future__ import annotations

import operator
import string
from typing import NamedTuple

import sympy
import torch

from .. import routing
from .._subgraphs import graphs
from ..errors import UnroutableBlockError
from .token_axes import mentions, shared_by_the_batch, shared_table, size_expr, user_inputs
from .token_mixing import (
    ATTENTION,
    RowWindow,
    aten_name,
    model_source_line,
    named_arguments,
    normalise,
    positions_read_as_values,
    window_of_rows,
)

aten = torch.ops.aten

# How each op a table's values go through takes a leading batch axis: the arguments naming axes shift by one, those
# giving a shape gain the batch in front; pointwise ops (by their tag) line their operands up instead.
_AXIS_ARGUMENTS = ("dim", "dims", "dim0", "dim1", "start_dim", "end_dim", "source", "destination")
_AXIS_OPS = {"unsqueeze", "squeeze", "transpose", "permute", "movedim", "select", "slice", "narrow", "split", "flip",
             "split_with_sizes", "chunk", "unbind", "flatten", "unflatten", "sum", "mean", "amax", "amin", "prod",
             "index_select", "cat", "stack", "sym_size"}
_SHAPE_ARGUMENTS = {"view": "size", "_unsafe_view": "size", "reshape": "shape", "expand": "size", "repeat": "repeats"}
_SAME_ARGUMENTS = {"_to_copy", "to", "type_as", "clone", "contiguous", "alias", "detach", "lift_fresh_copy", "zeros_like",
                   "ones_like", "full_like", "empty_like", "view_as_complex", "view_as_real", "tril", "triu"}
#: Elementwise ops with broadcasting that torch does not tag pointwise.
_UNTAGGED_POINTWISE = {"where", "__and__", "__or__", "__xor__", "polar", "complex"}


class TableRead(NamedTuple):
    """How a value is read by position: rows of ``table`` (None: the positions themselves) along ``axes``, at the
    positions plus ``offset`` (an int, or for counted positions, the count's start, a size node)."""

    table: torch.fx.Node | None
    axes: tuple[int, ...]
    offset: int | torch.fx.Node = 0


def cut_to_token_count(node: torch.fx.Node, symbol, batch) -> RowWindow | None:
    """Where ``node`` cuts ``T`` consecutive rows off a table without a batch or token axis (``table[:T]``,
    ``table[1 : T + 1]``, ``table.narrow(axis, s, T)``), that window, else None."""
    cut = window_of_rows(node, symbol)
    if cut is None:
        return None
    shape = cut.source.meta["val"].shape
    return cut if not any(mentions(s, symbol) for s in shape) and shared_by_the_batch(shape, batch) else None


def counted_from(count: torch.fx.Node, symbol) -> int | torch.fx.Node | None:
    """Where ``arange`` node ``count`` counts ``T`` positions from, with step 1: a constant, or a size linear in
    ``T`` (MPT's ALiBi distances, ``arange(1 - T, 1)``); None for other counts."""
    args = named_arguments(count)
    start = args.get("start", 0)
    if args.get("step", 1) != 1 or size_expr(count.meta["val"].shape[0]) != symbol:
        return None
    if isinstance(start, int):
        return start
    value = start.meta.get("val") if isinstance(start, torch.fx.Node) else None
    if not isinstance(value, torch.SymInt):
        return None
    expr = size_expr(value)
    if not (expr.free_symbols <= {symbol} and expr.is_polynomial(symbol)):
        return None
    polynomial = sympy.Poly(expr, symbol)
    return start if polynomial.degree() <= 1 and all(c.is_integer for c in polynomial.all_coeffs()) else None


def token_tables(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    symbol, batch = gm.meta["modpass_token_symbol"], gm.meta["modpass_batch_symbol"]
    if symbol is None or not shared_by_the_batch((), batch):  # a batch fixed to a size above one: no symbol to read
        return gm
    where = gm.meta.get("modpass_where", "block")
    for subgraph in list(graphs(gm))[1:]:
        for node in subgraph.nodes:
            if cut_to_token_count(node, symbol, batch) is not None:
                raise UnroutableBlockError(
                    f"{where}: the block cuts a table to its token count under no_grad or autocast [{model_source_line(node)}], "
                    "where modpass cannot read it per sequence. Pass the rows in from outside the block, or leave it "
                    "dense with layers=."
                )
    inputs = user_inputs(gm)
    reads = table_reads(gm, inputs, symbol, batch)
    if reads:
        _PerSequence(gm, inputs, reads, where).rewrite()
    return gm


def table_reads(gm: torch.fx.GraphModule, inputs: list[torch.fx.Node], symbol, batch) -> dict[torch.fx.Node, TableRead]:
    """Each value read by position from a shared table, and each count of positions, -> how it is read."""
    reads = {}
    for node in inputs[1:]:
        if shared_table(node.meta["val"], axes := node.meta["modpass_token_axes"], batch):
            reads[node] = TableRead(node, axes)
    for node in gm.graph.nodes:
        if (cut := cut_to_token_count(node, symbol, batch)) is not None:
            reads[node] = TableRead(cut.source, (cut.axis,), cut.start)
    for count in positions_read_as_values(gm, symbol):
        if (start := counted_from(count, symbol)) is not None:
            reads[count] = TableRead(None, (), start)
    return reads


def is_pointwise(op: torch._ops.OpOverload) -> bool:
    """Whether ``op`` is elementwise with broadcasting: tagged so, or the in-place form of an op tagged so
    (``masked_fill_``, which ``nn.MultiheadAttention`` applies to a boolean mask's float copy)."""
    if torch.Tag.pointwise in op.tags or op.overloadpacket.__name__ in _UNTAGGED_POINTWISE:
        return True
    name = op.overloadpacket.__name__
    functional = getattr(getattr(aten, name[:-1], None), op._overloadname, None) if name.endswith("_") else None
    return functional is not None and torch.Tag.pointwise in functional.tags


def writes(node: torch.fx.Node) -> bool:
    """Whether ``node``'s op writes one of its arguments in place (``masked_fill_``)."""
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def holds_tensors(node: torch.fx.Node) -> bool:
    """Whether ``node``'s value is a tensor or several (``split``'s), not a size."""
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) or (isinstance(val, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in val))


def with_a_batch_label(equation: str, batched: list[bool]) -> str:
    """``equation`` with a label for a leading batch axis on the operands ``batched`` says and on the output
    (``"i,j->ij"`` for positions ``(B, T)`` and weights is ``"ai,j->aij"``)."""
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    operands = inputs.split(",")
    if not arrow:  # einsum's implicit output: the ellipsis's axes, then the labels used once, in alphabetical order
        labels = "".join(operands).replace(".", "")
        output = ("..." if "..." in inputs else "") + "".join(sorted(c for c in set(labels) if labels.count(c) == 1))
    batch = next(c for c in string.ascii_letters if c not in equation)
    return ",".join(batch + o if b else o for o, b in zip(operands, batched)) + f"->{batch}{output}"


class _PerSequence:
    """One block graph's rewrite: the values read from tables (``reads``), what is computed from them alone (the
    chain), and the ops where they meet the sequences' values."""

    def __init__(self, gm: torch.fx.GraphModule, inputs: list[torch.fx.Node], reads: dict, where: str):
        self.gm, self.graph, self.reads, self.where = gm, gm.graph, reads, where
        self.hidden = inputs[0]
        self.symbol = gm.meta["modpass_token_symbol"]
        self.batch_symbol = size_expr(self.hidden.meta["val"].shape[0])
        self.fake_mode = torch._guards.detect_fake_mode([self.hidden.meta["val"]])
        # Values that differ by sequence: the hidden state, inputs that follow the batch, and token-indexed inputs
        # (the rewrite gathers those per sequence); then what is computed from their values.
        self.of_sequences = {n for n in inputs if n.meta["modpass_batch_axis"] == 0 or (n.meta["modpass_token_axes"] and n not in reads)}
        self.chain: set[torch.fx.Node] = set()
        for node in self.graph.nodes:
            if node in reads:
                self.chain.add(node)
            elif any(arg in self.of_sequences for arg in node.all_input_nodes if holds_tensors(arg)):
                self.of_sequences.add(node)
            elif any(arg in self.chain for arg in node.all_input_nodes):
                # Expanded to the batch (``cos.expand(B, T, d)``), a table's values are the sequences' from here on.
                val = node.meta.get("val")
                batched = (isinstance(val, torch.Tensor) and val.dim() and not isinstance(self.batch_symbol, int)
                           and size_expr(val.shape[0]) == self.batch_symbol)
                (self.of_sequences if batched else self.chain).add(node)
        self.per_sequence: dict[torch.fx.Node, torch.fx.Node] = {}  # a chain node -> its value with a batch axis
        self.created: set[torch.fx.Node] = set()

    def rewrite(self) -> None:
        body = next(n for n in self.graph.nodes if n.op != "placeholder")
        with self.graph.inserting_before(body):
            self.batch = self.call(aten.sym_size.int, self.hidden, 0)
            self.positions = self.call(routing.token_positions, self.hidden)
            # A count's start may be a size in T (arange(1 - T, 1)): taken at the whole sequence's length, as the
            # block's own T is k once routed.
            self.tokens = self.call(aten.sym_size.int, self.hidden, 1)
            self.whole_length = self.call(routing.token_count, self.hidden)
        for node in list(self.graph.nodes):
            if node in self.chain:
                with self.graph.inserting_before(node if node.op != "placeholder" else body):
                    self.per_sequence[node] = self.read(node) if node in self.reads else self.lift(node)
                if "stack_trace" in node.meta:  # later stages' refusals name the model's line
                    self.per_sequence[node].meta.setdefault("stack_trace", node.meta["stack_trace"])
            elif node in self.of_sequences and node.op != "output" and any(arg in self.chain for arg in node.all_input_nodes):
                with self.graph.inserting_before(node):
                    self.meet(node)
            elif node.op == "output":
                if any(arg in self.chain and arg.op != "placeholder" for arg in node.all_input_nodes):
                    self.refuse(node, "returns it from the block")  # an input table returned as it came stays whole
            elif any(arg in self.chain for arg in node.all_input_nodes):
                self.refuse(node, "uses it")
        # What the lifted values replaced, and what nothing reads (a table passed in and not used: cache_position),
        # but no write in place, which its result's users need not read.
        for node in reversed(list(self.graph.nodes)):
            if (node in self.chain or node in self.created) and node.op != "placeholder" and not node.users and not writes(node):
                self.graph.erase_node(node)
        for node in self.reads:
            if node.op == "placeholder":
                node.meta["modpass_token_axes"] = ()
        self.graph.lint()
        self.gm.recompile()

    def call(self, target, *args, **kwargs) -> torch.fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        self.created.add(node)
        values = torch.fx.map_arg((args, kwargs), lambda n: n.meta["val"])
        with self.fake_mode:
            node.meta["val"] = target(*values[0], **values[1])
        return node

    def read(self, node: torch.fx.Node) -> torch.fx.Node:
        table, axes, offset = self.reads[node]
        positions = self.positions_from(offset)
        if table is None:  # positions the block counts out: the tokens' own
            dtype = node.meta["val"].dtype
            return positions if dtype == torch.int64 else self.call(aten._to_copy.default, positions, dtype=dtype)
        return self.call(routing.rows_of_table, table, positions, axes)

    def positions_from(self, offset: int | torch.fx.Node) -> torch.fx.Node:
        """The tokens' positions plus ``offset``, a size in ``T`` taken at the whole sequence's length."""
        if isinstance(offset, int):
            return self.positions if offset == 0 else self.call(operator.add, self.positions, offset)
        if slope := int(size_expr(offset.meta["val"]).coeff(self.symbol)):
            shift = self.call(operator.mul, self.call(operator.sub, self.whole_length, self.tokens), slope)
            offset = self.call(operator.add, offset, shift)
        return self.call(operator.add, self.positions, offset)

    def refuse(self, node: torch.fx.Node, what: str):
        tables = ", ".join(sorted({read.table.name if read.table is not None else "positions counted with arange"
                                   for read in self.reads.values()}))
        raise UnroutableBlockError(
            f"{self.where}: the block reads a table by token position ({tables}), shared by the whole batch, and "
            f"{node.target if node.op == 'call_function' else node.op} {what} [{model_source_line(node)}]; modpass reads "
            "such tables per sequence at the routed tokens' positions and cannot do so through this op. Pass the "
            "table in with a batch axis, (B, T, ...), or leave this block dense with layers=."
        )

    def lifted(self, value):
        """``value`` with a batch axis where it is a chain node; other arguments as they are."""
        return self.per_sequence.get(value, value) if isinstance(value, torch.fx.Node) else value

    def with_batch(self, value: torch.fx.Node) -> torch.fx.Node:
        """A chain value with its batch axis, or another tensor expanded to the batch (a weight joined to a table)."""
        if value in self.per_sequence:
            return self.per_sequence[value]
        rank = value.meta["val"].dim()
        return self.call(aten.expand.default, self.call(aten.unsqueeze.default, value, 0), [self.batch, *[-1] * rank])

    def operand(self, value, rank: int):
        """An argument of a pointwise op with ``rank`` axes: a chain tensor aligned with a batch axis, a size read from
        its lifted value, anything else as it is."""
        if not isinstance(value, torch.fx.Node) or value not in self.chain:
            return value
        return self.aligned(value, rank) if holds_tensors(value) else self.per_sequence[value]

    def aligned(self, value: torch.fx.Node, rank: int) -> torch.fx.Node:
        """A chain value with its batch axis, then as many unit axes as broadcasting to ``rank`` axes gives it."""
        lifted = self.per_sequence[value]
        for _ in range(rank - value.meta["val"].dim()):
            lifted = self.call(aten.unsqueeze.default, lifted, 1)
        return lifted

    def lift(self, node: torch.fx.Node) -> torch.fx.Node:
        """``node``'s op applied to values with a batch axis: the same values in each sequence's slice."""
        if node.op == "call_function" and node.target is operator.getitem:
            return self.call(operator.getitem, self.lifted(node.args[0]), node.args[1])
        name = aten_name(node)
        if name is None and not holds_tensors(node):  # arithmetic on sizes, which lifting leaves as they were
            return self.call(node.target, *torch.fx.map_arg(node.args, self.lifted), **node.kwargs)
        if name is None:
            self.refuse(node, "computes with it")
        args = named_arguments(node)
        rank = node.meta["val"].dim() if isinstance(node.meta.get("val"), torch.Tensor) else 0
        if name in ("slice", "narrow") and self.cuts_by_the_token_count(args):
            # A second axis of a table cut to T (nanoGPT's causal buffer, bias[:, :, :T, :T]): read at the positions too.
            if (cut := window_of_rows(node, self.symbol)) is None:
                self.refuse(node, "cuts it by the token count other than to T rows from a constant start")
            if mentions(cut.source.meta["val"].shape[cut.axis], self.symbol):
                return self.lift_axes(node, name, args, rank)  # a cut of a token axis to all of it
            return self.call(routing.gather_tokens, self.lifted(cut.source), self.positions_from(cut.start), (cut.axis + 1,))
        if is_pointwise(node.target):
            return self.call_op(node, {k: self.operand(v, rank) for k, v in args.items()})
        if name in _SAME_ARGUMENTS:
            return self.call_op(node, {k: self.lifted(v) for k, v in args.items()})
        if name in _SHAPE_ARGUMENTS:
            key = _SHAPE_ARGUMENTS[name]
            shape = [1 if key == "repeats" else self.batch, *args[key]]
            return self.call_op(node, {**args, "self": self.lifted(args["self"]), key: shape})
        if name in _AXIS_OPS:
            return self.lift_axes(node, name, args, rank)
        if name == "t":  # a matrix's transpose; a vector's is itself
            return self.call(aten.transpose.int, self.lifted(args["self"]), -2, -1) if rank == 2 else self.lifted(args["self"])
        if name == "outer" and not (args["self"] in self.chain and args["vec2"] in self.chain):
            # Each sequence's outer product: its positions down the rows, the weights along the columns.
            rows = self.call(aten.unsqueeze.default, self.lifted(args["self"]), -1)
            columns = self.call(aten.unsqueeze.default, self.lifted(args["vec2"]), -2)
            return self.call(aten.mul.Tensor, rows, columns)
        if name == "einsum":  # each sequence's: a label for the batch axis, on the lifted operands and the output
            lifted = [t in self.chain for t in args["tensors"]]
            equation = with_a_batch_label(args["equation"], lifted)
            return self.call(aten.einsum.default, equation, [self.lifted(t) for t in args["tensors"]])
        if name in ("mm", "matmul") and self.times_weights(args["self"], args["mat2" if name == "mm" else "other"]):
            return self.call(aten.matmul.default, self.lifted(args["self"]), args["mat2" if name == "mm" else "other"])
        if name == "embedding" and args["weight"] not in self.chain:
            return self.call_op(node, {**args, "indices": self.lifted(args["indices"])})
        if name == "index" and args["self"] not in self.chain and len(args["indices"]) == 1:
            return self.call_op(node, {**args, "indices": [self.lifted(args["indices"][0])]})
        self.refuse(node, "computes with it")

    def cuts_by_the_token_count(self, args: dict) -> bool:
        bounds = [args.get(key) for key in ("start", "end", "length")]
        return any(isinstance(b, torch.fx.Node) and mentions(b.meta["val"], self.symbol) for b in bounds)

    def times_weights(self, table, weights) -> bool:
        """Whether a matrix product is a table's (a matrix or a stack of them) times a matrix of weights."""
        return (table in self.chain and weights not in self.chain and table.meta["val"].dim() >= 2
                and weights.meta["val"].dim() == 2)

    def lift_axes(self, node: torch.fx.Node, name: str, args: dict, rank: int) -> torch.fx.Node:
        tensors = args.get("tensors")
        source = tensors[0] if tensors else args["self"]
        # Axes count in the result for the ops that add one, in the input for the others.
        axes_of = rank if name in ("unsqueeze", "stack") else source.meta["val"].dim()
        lifted = dict(args)
        if tensors:
            lifted["tensors"] = [self.with_batch(t) for t in tensors]
        else:
            lifted["self"] = self.lifted(source)
        if name == "squeeze" and not any(k in args for k in ("dim", "dims")):
            return self.call(aten.squeeze.dims, lifted["self"], [d + 1 for d, s in enumerate(source.meta["val"].shape) if s == 1])
        for key in _AXIS_ARGUMENTS:
            if key not in args:
                continue
            value = args[key]
            if value is None or (isinstance(value, (list, tuple)) and not value):
                self.refuse(node, "reduces over every axis of it")  # the batch axis too, once it has one
            shifted = [d + 1 for d in normalise(value, axes_of)]
            lifted[key] = ([0] if name == "permute" else []) + shifted if isinstance(value, (list, tuple)) else shifted[0]
        return self.call_op(node, lifted)

    def call_op(self, node: torch.fx.Node, values: dict) -> torch.fx.Node:
        """A call of ``node``'s op with arguments by name, positional where its schema takes them so. Sizes read
        from chain values are read from their per-sequence values (the same numbers); a chain tensor left in an
        argument the rule did not lift is refused."""

        def size_or_refusal(value: torch.fx.Node) -> torch.fx.Node:
            if value not in self.chain:
                return value
            if holds_tensors(value):
                self.refuse(node, "takes it as an argument modpass does not read per sequence")
            return self.per_sequence[value]

        values = torch.fx.map_arg(values, size_or_refusal)
        schema = node.target._schema.arguments
        positional = [values[a.name] for a in schema if not a.kwarg_only and a.name in values]
        keywords = {a.name: values[a.name] for a in schema if a.kwarg_only and a.name in values}
        return self.call(node.target, *positional, **keywords)

    def meet(self, node: torch.fx.Node) -> None:
        """Give ``node``, which combines the sequences' values with a table's, the table's values per sequence in the
        layout its other operands have: the batch axis first, unit axes where broadcasting puts them."""
        name = aten_name(node)
        chained = [arg for arg in node.all_input_nodes if arg in self.chain]
        for size in [arg for arg in chained if not holds_tensors(arg)]:
            node.replace_input_with(size, self.per_sequence[size])  # the same number, read from the lifted value
            chained.remove(size)
        if not chained:
            return
        if name is None:
            self.refuse(node, "combines it with the tokens")
        args = named_arguments(node)
        out = node.meta["val"]
        if any(key in name for key in ATTENTION) and set(chained) == {args.get("attn_mask")}:
            rank, leading = args["query"].meta["val"].dim(), args["query"].meta["val"].shape[0]
        elif is_pointwise(node.target) or name in ("matmul", "expand", "repeat"):
            rank, leading = out.dim(), out.shape[0] if out.dim() else None
        else:
            self.refuse(node, "combines it with the tokens")
        if leading is None or size_expr(leading) != self.batch_symbol:
            self.refuse(node, "combines it with values whose first axis is not the batch")
        for value in chained:
            original = value.meta["val"]
            if name == "matmul" and original.dim() < 2:
                self.refuse(node, "multiplies it as a vector")
            if original.dim() < rank:
                laid_out = self.aligned(value, rank - 1)
            elif original.dim() == rank and original.shape[0] == 1:
                laid_out = self.call(aten.squeeze.dim, self.per_sequence[value], 1)
            else:
                self.refuse(node, "combines it with the tokens along the batch axis")
            node.replace_input_with(value, laid_out)
        if name == "repeat":  # repeated to the batch (table[None].repeat(B, 1, 1)): each sequence's rows once
            node.update_arg(1, [1, *args["repeats"][1:]])
