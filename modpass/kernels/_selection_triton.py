"""The Triton code of :mod:`modpass.kernels.selection` (imported only where Triton runs it).

Triton resolves a kernel's helpers through its module's globals, so they live
at module level here rather than behind a lazy import.
"""

import triton
import triton.language as tl


@triton.jit
def ordered_keys(row_scores, position, num_tokens):
    """uint32 keys whose order is the scores' float order, and which lanes hold a token."""
    in_row = position < num_tokens
    score = tl.load(row_scores + position, mask=in_row, other=0.0)
    bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True)
    # Negative floats: flip every bit (larger magnitude, smaller key); others: flip the sign bit.
    return (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True), in_row


@triton.jit
def count_reaching(row_scores, num_tokens, floors, CHUNK: tl.constexpr):
    """For each of ``floors`` (a vector), how many keys of the row are >= it."""
    lanes = tl.arange(0, CHUNK)
    count = tl.zeros(floors.shape, dtype=tl.int32)
    for start in range(0, num_tokens, CHUNK):
        key, in_row = ordered_keys(row_scores, start + lanes, num_tokens)
        count += tl.sum((in_row[None, :] & (key[None, :] >= floors[:, None])).to(tl.int32), axis=1)
    return count


@triton.jit
def select_rows(
    scores_ptr,
    index_ptr,
    num_tokens,
    k,
    scores_row_stride,
    index_row_stride,
    CHUNK: tl.constexpr,
    RADIX_BITS: tl.constexpr,
):
    row = tl.program_id(0)
    row_scores = scores_ptr + row * scores_row_stride
    row_index = index_ptr + row * index_row_stride

    # The k-th largest key, RADIX_BITS bits per pass from the top: of the 2**RADIX_BITS thresholds
    # that extend the bits found so far, keep the largest that at least k keys reach (the counts fall
    # as the threshold rises, so that is the number of thresholds reached, less one).
    digits = tl.arange(0, 2**RADIX_BITS).to(tl.uint32)
    threshold = tl.zeros((), dtype=tl.uint32)
    for step in tl.static_range(32 // RADIX_BITS):
        shift = 32 - RADIX_BITS * (step + 1)
        reached = count_reaching(row_scores, num_tokens, threshold | (digits << shift), CHUNK) >= k
        threshold = threshold | ((tl.sum(reached.to(tl.int32), axis=0) - 1).to(tl.uint32) << shift)

    # Keep every key above the threshold and the earliest of those equal to it; each kept position
    # goes to its rank among the kept, so the output comes out in position order.
    lanes = tl.arange(0, CHUNK)
    above = tl.zeros((), dtype=tl.int32)
    for start in range(0, num_tokens, CHUNK):
        key, in_row = ordered_keys(row_scores, start + lanes, num_tokens)
        above += tl.sum((in_row & (key > threshold)).to(tl.int32), axis=0)
    tied_needed = k - above
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
