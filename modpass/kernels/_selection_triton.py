"""The Triton code of :mod:`modpass.kernels.selection` (imported only where Triton runs it).

Triton resolves a kernel's helpers through its module's globals, so they live
at module level here rather than behind a lazy import.
"""

import triton
import triton.language as tl

#: Bits of the key decided per pass, and the digits they make: four passes of a 256-bin histogram.
DIGIT_BITS = tl.constexpr(8)
DIGITS = tl.constexpr(256)
#: Histogram bins: the 256 digits, then one bin for lanes outside the current bucket. Triton 3.2's
#: histogram takes no mask, and its bin count must be a power of two.
BINS = tl.constexpr(512)


@triton.jit
def ordered_keys(row_scores, position, num_tokens):
    """uint32 keys whose order is the scores' float order, and which lanes hold a token."""
    in_row = position < num_tokens
    score = tl.load(row_scores + position, mask=in_row, other=0.0)
    bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True)
    # Flipping the magnitude bits of negative floats makes signed order equal float order; flipping
    # the sign bit then makes unsigned order equal it, so digits compare as plain unsigned numbers.
    signed = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (signed ^ -2147483648).to(tl.uint32, bitcast=True), in_row


@triton.jit
def digit_counts(row_scores, num_tokens, prefix, shift, CHUNK: tl.constexpr):
    """How many keys of the row have each digit at ``shift``, among those whose higher digits are ``prefix``'s."""
    lanes = tl.arange(0, CHUNK)
    counts = tl.zeros([BINS], dtype=tl.int32)
    for start in range(0, num_tokens, CHUNK):
        key, in_row = ordered_keys(row_scores, start + lanes, num_tokens)
        # A key is in the bucket when it differs from the prefix only in this digit and below.
        in_bucket = in_row & (((key ^ prefix) >> shift) < DIGITS)
        digit = ((key >> shift) & (DIGITS - 1)).to(tl.int32)
        counts += tl.histogram(tl.where(in_bucket, digit, DIGITS), BINS)
    return tl.where(tl.arange(0, BINS) < DIGITS, counts, 0)


@triton.jit
def max_pair(digit_a, count_a, digit_b, count_b):
    return tl.maximum(digit_a, digit_b), tl.maximum(count_a, count_b)


@triton.jit
def select_rows(scores_ptr, index_ptr, num_tokens, k, scores_row_stride, index_row_stride, CHUNK: tl.constexpr):
    row = tl.program_id(0)
    row_scores = scores_ptr + row * scores_row_stride
    row_index = index_ptr + row * index_row_stride

    # The k-th largest key, one 8-bit digit at a time from the top (a radix select): each pass
    # counts the digits of the keys still tied with the threshold so far and takes the largest
    # digit that, with the keys above it, reaches the k still wanted. Four passes, each three
    # block-wide steps (histogram, suffix sum, reduction), where a bit per pass took 32 counts.
    prefix = tl.zeros([], dtype=tl.uint32)
    wanted = k
    digits = tl.arange(0, BINS)
    for step in range(32 // DIGIT_BITS):
        shift = 32 - DIGIT_BITS * (step + 1)
        counts = digit_counts(row_scores, num_tokens, prefix, shift, CHUNK)
        reaching = tl.cumsum(counts, axis=0, reverse=True)  # keys in the bucket with this digit or above
        takes = (digits < DIGITS) & (reaching >= wanted)
        digit, above = tl.reduce((tl.where(takes, digits, 0), tl.where(takes, 0, reaching)), 0, max_pair)
        prefix = prefix | (digit.to(tl.uint32) << shift)
        wanted -= above
    threshold = prefix

    # Keep every key above the threshold and the earliest ``wanted`` of those equal to it; each kept
    # position goes to its rank among the kept, so the output comes out in position order.
    lanes = tl.arange(0, CHUNK)
    tied_before = 0
    kept_before = 0
    for start in range(0, num_tokens, CHUNK):
        position = start + lanes
        key, in_row = ordered_keys(row_scores, position, num_tokens)
        tied = (in_row & (key == threshold)).to(tl.int32)
        tied_rank = tied_before + tl.cumsum(tied, axis=0)
        kept = (in_row & (key > threshold)) | ((tied != 0) & (tied_rank <= wanted))
        slot = kept_before + tl.cumsum(kept.to(tl.int32), axis=0) - 1
        tl.store(row_index + slot, position.to(tl.int64), mask=kept)
        tied_before += tl.sum(tied, axis=0)
        kept_before += tl.sum(kept.to(tl.int32), axis=0)
