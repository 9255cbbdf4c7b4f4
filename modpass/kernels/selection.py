"""Top-k token selection as one Triton program per sequence (radix select).

The reference (:func:`modpass.routing.select_tokens`) is two stable sorts: a
descending sort of the scores, then an ascending sort of the k winning
positions. Inductor lowers each to a full sort of the row; on an H100 (two
rows of 4096 tokens) the pair took 34 us, more than half of the routing glue,
against 19.5 us for this kernel.
Selection needs neither sort. This kernel, one program per row:

1. maps each fp32 score to an int32 key with the same order
   (``-0.0`` first becomes ``0.0``, so the two stay tied);
2. finds the k-th largest key bit by bit, most significant first: a bit is
   set when at least k keys reach the threshold with it (32 block-wide counts);
3. keeps every key above that threshold and, of the keys equal to it, the
   earliest ``k - above`` by position (a prefix sum), which is exactly the
   reference's tie-break;
4. writes each kept position at its rank among the kept (another prefix sum),
   so the output is sorted by position without sorting.

Scores must not be NaN (``routing.selection_scores`` maps NaN to ``-inf``).
One program per row loops over the row in chunks of :data:`CHUNK` tokens; each
of the 33 counting passes re-reads the row (from L1 for rows of a few thousand
tokens), so rows past :data:`MAX_TOKENS` go to the sorts, which are faster there.
Fewer, wider passes were slower on the GPU and were not kept: counting 2 or 4
bits per pass (``benchmarks/results/cuda-select-sweep.md``) and a 256-bin
histogram per 8-bit digit, four passes (``benchmarks/results/cuda-select-radix8.md``).
The 33 dependent block-wide counts, more than the reads, set the time: 13 us
at 1024 tokens, 19.5 at four times as many (H100).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

#: Tokens one program handles per step of its loops over the row. A
#: constant, not a function of the sequence length, so that a compiled model
#: with a symbolic length does not recompile for each new one.
CHUNK = 2048
#: Warps per program: one per 256 tokens of a chunk.
NUM_WARPS = CHUNK // 256

#: Longest row the kernel takes; longer rows use the sorts. One program per row
#: re-reads its row 33 times, which stops paying once the row outgrows L1: on an
#: H100 (two rows, ``benchmarks/results/cuda-select-radix8.md``, column
#: ``bit_loop``) the kernel takes 19.5 us against 34 us for the compiled sorts at
#: 4096 tokens (c = 0.125), 57 against 100 at 16384, 106 against 108 (c = 0.125)
#: and 158 (c = 0.5) at 32768, but 332 against 174 at 65536. A compiled model
#: with a symbolic length guards on this bound: a length on the other side of it
#: compiles once more.
MAX_TOKENS = 32768

#: A CUDA build of torch with Triton installed, new enough to register Triton
#: ops (2.6+). Decided at import without touching the driver or importing
#: Triton (a CPU build never pays Triton's import), and a constant for Dynamo.
AVAILABLE = (
    torch.backends.cuda.is_built()
    and importlib.util.find_spec("triton") is not None
    and hasattr(torch.library, "triton_op")
)


def supported(scores: torch.Tensor) -> bool:
    """Whether :func:`select_tokens` runs the Triton kernel for ``scores`` (B, T): not in an ONNX export, which has no
    such operator."""
    return (AVAILABLE and scores.is_cuda and scores.dim() == 2 and scores.shape[1] <= MAX_TOKENS
            and not torch.onnx.is_in_onnx_export())


def launch(scores: torch.Tensor, k: int, wrap=lambda kernel: kernel, kernel=None, chunk: int = CHUNK,
           num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Run the kernel on ``scores`` (B, T) fp32; returns int64 indices (B, k).

    ``wrap`` is ``torch.library.wrap_triton`` inside the registered op, so that
    Inductor sees the kernel; tests call this directly under the Triton
    interpreter, on CPU tensors. ``kernel`` (``select_rows`` from another
    source), ``chunk`` and ``num_warps`` are for ``benchmarks/select_bench.py``'s
    A/B runs.
    """
    batch, num_tokens = scores.shape
    scores = scores.contiguous()
    index = torch.empty((batch, k), dtype=torch.int64, device=scores.device)
    if kernel is None:
        from modpass.kernels._selection_triton import select_rows as kernel
    wrap(kernel)[(batch,)](
        scores, index, num_tokens, k, scores.stride(0), index.stride(0), CHUNK=chunk, num_warps=num_warps
    )
    return index


def compile_for(capability: int, kernel=None):
    """Compile the kernel for CUDA compute capability ``capability`` (90: H100/H200) on the host.

    No GPU is needed: Triton runs its whole pipeline down to the cubin here.
    CI uses it to check that the kernel compiles (the interpreter accepts code
    the compiler refuses) and ``benchmarks/kernel_compile.py`` to time the
    compile that a routed model's GPU compile pays. ``kernel`` is
    ``select_rows`` from another source, as for :func:`launch`; returns
    Triton's compiled kernel.
    """
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if kernel is None:
        from modpass.kernels._selection_triton import select_rows as kernel
    signature = {"scores_ptr": "*fp32", "index_ptr": "*i64", "num_tokens": "i32", "k": "i32",
                 "scores_row_stride": "i32", "index_row_stride": "i32", "CHUNK": "constexpr"}
    # Triton 3.3 renamed ``constants`` to ``constexprs``.
    constants = "constexprs" if "constexprs" in inspect.signature(ASTSource).parameters else "constants"
    source = ASTSource(fn=kernel, signature=signature, **{constants: {"CHUNK": CHUNK}})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": NUM_WARPS})


@functools.cache
def register():
    """Register ``torch.ops.modpass.select_tokens`` (once) and return it.

    A Triton op, not an opaque custom op: Inductor sees the kernel, calls it
    from its generated code and schedules it with its own kernels.
    """

    @torch.library.triton_op("modpass::select_tokens", mutates_args=())
    def select_tokens_op(scores: torch.Tensor, k: int) -> torch.Tensor:
        return launch(scores, k, torch.library.wrap_triton)

    return select_tokens_op


if AVAILABLE:
    register()


def select_tokens(scores: torch.Tensor, k) -> torch.Tensor:
    """Indices ``(B, k)`` of the k best positions per row, sorted by position (see :func:`supported`)."""
    return torch.ops.modpass.select_tokens(scores.float(), k)
