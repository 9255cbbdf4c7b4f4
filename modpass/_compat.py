"""Every private torch import modpass relies on, in one place (they change between releases)."""

from __future__ import annotations

import torch


def compile_fx(gm, example_inputs, config_patches: dict):
    from torch._inductor.compile_fx import compile_fx as inductor_compile_fx

    return inductor_compile_fx(gm, example_inputs, config_patches=config_patches)


def inductor_mode_options(mode: str | None) -> dict:
    if mode in (None, "default"):
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


def disable_compile(reason: str):
    """``torch.compiler.disable`` with the reason that a graph break reports (torch 2.6 takes none)."""
    import inspect

    import torch

    if "reason" in inspect.signature(torch.compiler.disable).parameters:
        return lambda fn: torch.compiler.disable(fn, reason=reason)
    return torch.compiler.disable


def uncompiled(module):
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds; any other module as it is."""
    from torch._dynamo.eval_frame import OptimizedModule

    while isinstance(module, OptimizedModule):
        module = module._orig_mod
    return module


def outside_dynamo_tracing():
    """A context in which torch.export can run from inside a Dynamo backend.

    Dynamo's tracing context is still active while a backend runs; an export
    started there would add its own guards to the frame being compiled.
    """
    from torch._guards import tracing

    return tracing(None)


def known_to_be_one(size) -> bool:
    """``size == 1`` without a guard: a data-dependent size counts as not 1.

    ``statically_known_true`` says exactly that, but torch 2.6's Dynamo cannot
    trace it (a skipped function); there ``guard_size_oblivious`` gives the
    same answer for sizes (newer releases deprecate it, with a warning).
    """
    return _KNOWN_TRUE(size == 1)


def _known_true_helper():
    from torch._dynamo import trace_rules
    from torch.fx.experimental import symbolic_shapes

    if "torch.fx.experimental.symbolic_shapes.statically_known_true" in trace_rules.manual_torch_name_rule_map:
        return symbolic_shapes.statically_known_true
    return symbolic_shapes.guard_size_oblivious


_KNOWN_TRUE = _known_true_helper()


def size_hints(shape_env) -> dict:
    """The values the shape environment's symbols took in the traced example (torch 2.13 renamed them, with a warning)."""
    hints = getattr(shape_env, "backed_var_to_val", None)
    return dict(shape_env.var_to_val if hints is None else hints)


def torch_func_transform_running() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ...) is running. Dynamo answers False outside
    one, and breaks the graph inside one: ``torch.compile`` runs such a transform eagerly (``fullgraph=True`` refuses
    it), since the routing records a routed block keeps would otherwise leave the transform as graph outputs, which AOT
    autograd cannot take. Not ``peek_interpreter_stack()``, which Dynamo reads as an object, never None."""
    return torch._C._functorch.maybe_current_level() is not None


#: torch releases whose Inductor gives the view of a non-contiguous tensor with a data-dependent
#: size contiguous strides, a silent wrong result (pytorch#143498, fixed in 2.7 by #145548); see
#: ``passes/unbacked_views.py``.
INDUCTOR_MISREADS_UNBACKED_VIEWS = torch.__version__ < (2, 7)


def contiguous_while_compiling(tensor):
    """``tensor``, or while Dynamo traces it, a contiguous copy of it (see ``passes/unbacked_views.py``)."""
    return tensor.contiguous() if torch.compiler.is_compiling() else tensor


#: torch releases whose compiled code does not check ``torch._check`` on data-dependent sizes
#: (a minimal reproduction: 2.6.0 and 2.7.1 drop it; 2.8.0, 2.11, 2.12.1 and 2.13 raise).
DYNAMO_DROPS_UNBACKED_CHECKS = torch.__version__ < (2, 8)


#: torch releases whose torch.export fails on a batch split by task ids (the groups' data-dependent sizes reach a
#: guard in a block's linear layer: GuardOnDataDependentSymNode, 2.6.0 and 2.7.1; 2.8.0, 2.9.1 and 2.13 export one
#: program for every batch and mix). Compiling the same split works there.
EXPORT_FAILS_ON_TASK_ID_SPLIT = torch.__version__ < (2, 8)


def exporting_without_dynamo() -> bool:
    """Whether a non-strict torch.export (the default from 2.8; ONNX's exporter's) is tracing. Not
    ``torch.compiler.is_exporting()``: 2.6 lacks it, and under Dynamo 2.7 and 2.8 trace it as True."""
    return torch.compiler.is_compiling() and not torch.compiler.is_dynamo_compiling()


#: torch releases that cannot compile one call for rows of different capacities under a route mask
#: (:meth:`modpass.block.RoutedBlock.share_one_call`): 2.6's Dynamo cannot narrow a row to the
#: data-dependent slot count, and its Inductor then fails to lower the backward. There the rows
#: are split by capacity, one call each, with graph breaks.
DYNAMO_CANNOT_SHARE_ONE_CALL = torch.__version__ < (2, 7)


#: torch releases whose CPU attention, choosing its kernel while Dynamo traces, asks whether the
#: mask's batch size is 1: "Could not guard on data-dependent expression Eq(u0, 1)" where that
#: size depends on data, as a task's group of a mixed batch does (pytorch#181084; a minimal
#: reproduction fails on 2.6.0, 2.7.1, 2.8.0, 2.9.1, 2.10.0, 2.11.0 and 2.12.1, and passes on 2.13).
#: See ``passes/unbacked_attention_masks.py``.
CPU_ATTENTION_GUARDS_ON_MASK_BATCH = torch.__version__ < (2, 13)

#: torch 2.6's Inductor fails on the routed graph of a one-token call that the backend's routing options build
#: (``KeyError: 'buf59'`` in its scheduler, 2026-12-07), so that first call is refused there as before.
INDUCTOR_FAILS_ON_ONE_TOKEN_ROUTING = torch.__version__ < (2, 7)


def masked_attention_while_compiling(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                                     enable_gqa=False):
    """``aten.scaled_dot_product_attention``; while Dynamo traces a masked call, the CPU kernel it would run.

    With a 4-D mask and no dropout, CPU attention runs flash attention for CPU on
    a contiguous additive mask in the query's dtype, with grouped keys repeated
    per query head, after autocast's cast to its lower precision. Calling that kernel
    directly skips the kernel choice, whose mask check is what cannot take a
    data-dependent batch size.
    """
    if not torch.compiler.is_compiling() or attn_mask is None or attn_mask.dim() != 4 or dropout_p != 0.0 or is_causal:
        return torch.ops.aten.scaled_dot_product_attention.default(query, key, value, attn_mask, dropout_p, is_causal,
                                                                    scale=scale, enable_gqa=enable_gqa)
    if torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    if enable_gqa:
        # Query head h reads key head h // repeats; indexing, not repeat_interleave, whose reshape torch 2.6
        # cannot trace on a data-dependent batch.
        heads = torch.arange(query.shape[-3], device=query.device) // (query.shape[-3] // key.shape[-3])
        key, value = key.index_select(-3, heads), value.index_select(-3, heads)
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    # Contiguous: torch 2.6 and 2.7's kernel ignores the mask's stride along the keys, and a gathered
    # mask's key axis is strided (the compiled output was silently wrong there).
    return flash(query, key, value, attn_mask=attn_mask.to(query.dtype).contiguous(), scale=scale)[0]
