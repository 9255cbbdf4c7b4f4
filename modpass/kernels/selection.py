"""Top-k token selection as one Triton program per sequence (radix select).

The reference (:func:`modpass.routing.select_tokens`) is two stable sorts: a
descending sort of the scores, then an ascending sort of the k winning
positions. Inductor lowers each to a full sort of the row; on an H200 (two
rows of 4096 tokens) the pair took 34 us, more than half of the routing glue.
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
One program per row loops over the row in chunks of :data:`CHUNK` tokens, so
any length works; each of the 33 counting passes re-reads the row (from L1
for rows of a few thousand tokens).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

#: Tokens one program handles per step of its loops over the row. A
#: constant, not a function of the sequence length: a compiled model with a
#: symbolic length then never recompiles for a new one.
CHUNK = 2048

#: Bits of the k-th largest key found per pass over the row: each pass counts
#: the keys reaching 2**RADIX_BITS thresholds at once, so 32 / RADIX_BITS passes.
RADIX_BITS = 1

#: A CUDA build of torch with Triton installed, new enough to register Triton
#: ops (2.6+). Decided at import without touching the driver or importing
#: Triton (a CPU build never pays Triton's import), and a constant for Dynamo.
AVAILABLE = (
    torch.backends.cuda.is_built()
    and importlib.util.find_spec("triton") is not None
    and hasattr(torch.library, "triton_op")
)


def supported(scores: torch.Tensor) -> bool:
    """Whether :func:`select_tokens` runs the Triton kernel for ``scores`` (B, T)."""
    return AVAILABLE and scores.is_cuda and scores.dim() == 2


def launch(
    scores: torch.Tensor, k: int, wrap=lambda kernel: kernel, *, chunk: int | None = None, radix_bits: int | None = None
) -> torch.Tensor:
    """Run the kernel on ``scores`` (B, T) fp32; returns int64 indices (B, k).

    ``wrap`` is ``torch.library.wrap_triton`` inside the registered op, so that
    Inductor sees the kernel; tests call this directly under the Triton
    interpreter, on CPU tensors, and ``benchmarks/select_bench.py --sweep``
    with other ``chunk`` and ``radix_bits`` (default :data:`CHUNK`, :data:`RADIX_BITS`).
    """
    chunk = chunk or CHUNK
    radix_bits = radix_bits or RADIX_BITS
    batch, num_tokens = scores.shape
    scores = scores.contiguous()
    index = torch.empty((batch, k), dtype=torch.int64, device=scores.device)
    from modpass.kernels._selection_triton import select_rows

    wrap(select_rows)[(batch,)](
        scores,
        index,
        num_tokens,
        k,
        scores.stride(0),
        index.stride(0),
        CHUNK=chunk,
        RADIX_BITS=radix_bits,
        num_warps=max(chunk // 256, 4),
    )
    return index


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
