"""The Triton code of :mod:`modpass.kernels.selection` (imported only where Triton runs it).

Triton resolves a kernel's helpers through its module's globals, so they live
at module level here rather than behind a lazy import.
"""

import triton
import triton.language as tl


@triton.jit
def ordered_keys(row_scores, position, num_tokens):
    """int32 keys whose signed order is the scores' float order, and which lanes hold a token."""
    in_row = position < num_tokens
    score = tl.load(row_scores + position, mask=in_row, other=0.0)
    bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True)
    # Flipping the magnitude bits of negative floats makes signed int order equal float order.
    return bits ^ ((bits >> 31) & 0x7FFFFFFF), in_row


@triton.jit
def count_reaching(row_scores, num_tokens, floor, CHUNK: tl.constexpr):
    """How many keys of the row are >= ``floor``."""
    lanes = tl.arange(0, CHUNK)
    count = tl.zeros([CHUNK], dtype=tl.int32)
    for start in range(0, num_tokens, CHUNK):
        key, in_row = ordered_keys(row_scores, start + lanes, num_tokens)
        count += (in_row & (key >= floor)).to(tl.int32)
    return tl.sum(count, axis=0)


@triton.jit
def select_rows(scores_ptr, index_ptr, num_tokens, k, scores_row_stride, index_row_stride, CHUNK: tl.constexpr):
    row = tl.program_id(0)
    row_scores = scores_ptr + row * scores_row_stride
    row_index = index_ptr + row * index_row_stride

    # The k-th largest key, one bit at a time from the top: the largest threshold that k keys reach.
    threshold = tl.where(count_reaching(row_scores, num_tokens, 0, CHUNK) >= k, 0, -2147483648)
    # A runtime loop, not an unrolled one: unrolled, the 31 passes made the cubin 4x larger, the
    # Triton compile 4-5x longer (benchmarks/kernel_compile.py) and the kernel slower (22.3 against
    # 19.5 us at 4096 tokens on an H100, benchmarks/results/cuda-select-radix8.md): each pass waits
    # for the threshold of the one before, so unrolling leaves nothing to overlap.
    for step in range(31):
        candidate = threshold | (1 << (30 - step))
        threshold = tl.where(count_reaching(row_scores, num_tokens, candidate, CHUNK) >= k, candidate, threshold)

    # Keep every key above the threshold and the earliest of those equal to it; each kept position
    # goes to its rank among the kept, so the output comes out in position order.
    tied_needed = k - count_reaching(row_scores, num_tokens, threshold + 1, CHUNK)
    lanes = tl.arange(0, CHUNK)
    tied_before = 0
    kept_before = 0
    for start in range(0, num_tokens, CHUNK):
        position = start + lanes
        key, in_row = ordered_keys(row_scores, position, num_tokens)
        tied = (in_row & (key == threshold)).to(tl.int32)
        tied_rank = tied_before + tl.cumsum(tied, axis=0)
        kept = (in_row & (key > threshold)) | ((tied != 0) & (tied_rank <= tied_needed))
        slot = kept_before + tl.cumsum(kept.to(tl.int32), axis=0) - 1
        tl.store(row_index + slot, position.to(tl.int64), mask=kept)
        tied_before += tl.sum(tied, axis=0)
        kept_before += tl.sum(kept.to(tl.int32), axis=0)
