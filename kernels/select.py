"""Exact k-th smallest of the valid values of each image: multi-block radix select.

Used for the lower median (median/MAD SSI) and the trimming threshold (trimmed SSI). Exact, not approximate,
and no sort: fp32 values are mapped to order-preserving uint32 keys and the key of rank k is found 8 bits at a
time, most significant first. Each of the 4 passes is a histogram kernel, grid (rows, chunks): every program
histograms the current digit of the valid keys that still match the prefix found so far and atomically adds its
256 counts to the row's histogram of that pass. The prefix comes from the earlier passes' histograms: a cumulative
sum finds the bin that holds rank k, appends the bin to the prefix and makes k relative to that bin. Every
program redoes these few scans of 256 bins itself (from L2), so no launch sits between two passes; one scan
kernel, grid (rows,), ends the select. The prefix is then the exact key, decoded back to the fp32 value.
Launches: 1 memset, 4 histogram passes, 1 scan. Reads: 4 passes over the values and the mask; the atomics are
integer adds, so the result is deterministic.

Rows: one source (B rows) or two sources sharing a mask (2B rows: pred then target) in the same launches.
The rank is computed on the device from the valid count n of each row:
- MODE_MEDIAN: k = (n - 1) // 2 (the lower median; torch.median's choice);
- MODE_KEEP:   k = n - floor(trim * n) - 1 (the largest kept per-pixel loss when trimming).
A row with n = 0 gives 0.

-0.0 sorts before +0.0 in key order; as values they compare equal, so this never changes a result.
NaN is not supported (garbage in, garbage out); invalid pixels may hold anything.

Shapes: B images, HW pixels per image (`_BM` = B x HW), R rows (B or 2B), P passes, K = 256 bins.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreter_enabled, jit_helper, resolve

MODE_MEDIAN = 0
MODE_KEEP = 1
NUM_BINS = 256
NUM_PASSES = 4
SELECT_BLOCK = 4096
FORCE_CUMSUM: bool | None = None
"""Tests set this to run the compiled path's `tl.cumsum` scan in the interpreter too (None: cumsum when compiled)."""


@jit_helper
def _rank(hist_ptr, row, trim, MODE: tl.constexpr):
    """The row's valid count n (the sum of the first pass's histogram, which counts every valid key) and the rank
    k it selects (-1 for an empty row)."""
    n = tl.sum(tl.load(hist_ptr + row * 256 + tl.arange(0, 256)), axis=0)
    if MODE == 0:
        k = tl.where(n > 0, (n - 1) // 2, -1)
    else:
        k = n - tl.floor(n.to(tl.float32) * trim).to(tl.int32) - 1
    return n, k


@jit_helper
def _scan(hist_ptr, row, k, prefix, SHIFT: tl.constexpr, CUMSUM: tl.constexpr):
    """One pass's digit: the bin of this pass's histogram that holds rank k, appended to the prefix; k made
    relative to that bin."""
    bins = tl.arange(0, 256)
    counts = tl.load(hist_ptr + row * 256 + bins)
    if CUMSUM:
        cum = tl.cumsum(counts, axis=0)
    else:  # the same inclusive prefix sums as a 256 x 256 masked row sum: much faster in the interpreter
        cum = tl.sum(tl.where(bins[None, :] <= bins[:, None], counts[None, :], 0), axis=1)
    chosen = tl.sum((cum <= k).to(tl.int32), axis=0)  # first bin whose cumulative count exceeds k
    below = tl.sum(tl.where(bins < chosen, counts, 0), axis=0)
    return k - below, prefix | (chosen.to(tl.uint32) << SHIFT)


@jit_helper
def _prefix(hist_ptr, row, num_rows, trim, PASSES: tl.constexpr, MODE: tl.constexpr, CUMSUM: tl.constexpr):
    """The row's count n, its remaining rank k and the key bits found by the first PASSES passes. Every program
    that needs them redoes these few scans of 256 bins (from L2) rather than wait for a launch that stores them."""
    n, k = _rank(hist_ptr, row, trim, MODE)
    prefix = tl.full([], 0, tl.uint32)
    for q in tl.static_range(PASSES):
        k, prefix = _scan(hist_ptr + q * num_rows * 256, row, k, prefix, 24 - 8 * q, CUMSUM)
    return n, k, prefix


@triton.jit
def _radix_hist_kernel(
    x_ptr,  # B x HW values, source 0
    y_ptr,  # B x HW values, source 1 (ignored with one source)
    valid_ptr,  # B x HW uint8
    hist_ptr,  # P x R x NUM_BINS int32, zeroed; this pass adds to hist[PASS]
    num_images,
    num_rows,
    HW,
    trim,
    PASS: tl.constexpr,
    MODE: tl.constexpr,
    TWO_SOURCES: tl.constexpr,
    CUMSUM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    img = row % num_images
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    inb = offs < HW
    base = img.to(tl.int64) * HW
    if TWO_SOURCES:
        if row < num_images:
            x = tl.load(x_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
        else:
            x = tl.load(y_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
    else:
        x = tl.load(x_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
    keep = (tl.load(valid_ptr + base + offs, mask=inb, other=0) != 0) & inb
    # Order-preserving key: flip all bits of negatives, only the sign bit of non-negatives.
    bits = x.to(tl.int32, bitcast=True)
    key = (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)  # arithmetic shift: -1 or 0
    SHIFT: tl.constexpr = 24 - 8 * PASS
    if PASS > 0:
        _, _, prefix = _prefix(hist_ptr, row, num_rows, trim, PASS, MODE, CUMSUM)
        keep = keep & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
    digit = ((key >> SHIFT) & 0xFF).to(tl.int32)
    counts = tl.histogram(digit, 256, mask=keep)
    tl.atomic_add(hist_ptr + (PASS * num_rows + row) * 256 + tl.arange(0, 256), counts, sem="relaxed")


@triton.jit
def _radix_scan_kernel(
    hist_ptr,  # P x R x NUM_BINS int32, all passes done
    out_ptr,  # R fp32
    count_ptr,  # R int32
    num_rows,
    trim,
    MODE: tl.constexpr,
    CUMSUM: tl.constexpr,
):
    """After the last pass: the row's exact key of rank k, decoded to its fp32 value (0 for an empty row)."""
    row = tl.program_id(0)
    n, _, prefix = _prefix(hist_ptr, row, num_rows, trim, 4, MODE, CUMSUM)
    key = prefix.to(tl.int32, bitcast=True)
    bits = key ^ tl.where(key < 0, -2147483648, -1)
    value = bits.to(tl.float32, bitcast=True)
    tl.store(out_ptr + row, tl.where(n > 0, value, 0.0))
    tl.store(count_ptr + row, n)


def radix_select(
    sources: list[torch.Tensor], valid_u8_BM: torch.Tensor, *, mode: int = MODE_MEDIAN, trim: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the radix select over the rows of one or two B x HW sources sharing a B x HW uint8 mask.

    Returns:
        (values_R, num_valid_B): R = len(sources) * B fp32 values (source 0's rows first) and the int32 count of
        valid pixels per image.
    """
    assert 1 <= len(sources) <= 2
    num_images, hw = valid_u8_BM.shape
    for s in sources:
        assert s.shape == (num_images, hw) and s.is_contiguous()
    num_rows = len(sources) * num_images
    device = valid_u8_BM.device
    hist_PRK = torch.zeros((NUM_PASSES, num_rows, NUM_BINS), dtype=torch.int32, device=device)
    values_R = torch.empty(num_rows, dtype=torch.float32, device=device)
    counts_R = torch.empty(num_rows, dtype=torch.int32, device=device)
    hist_kernel, scan_kernel = resolve(_radix_hist_kernel), resolve(_radix_scan_kernel)
    cumsum = not interpreter_enabled() if FORCE_CUMSUM is None else FORCE_CUMSUM
    grid = (num_rows, triton.cdiv(hw, SELECT_BLOCK))
    for p in range(NUM_PASSES):
        hist_kernel[grid](
            sources[0], sources[-1], valid_u8_BM, hist_PRK, num_images, num_rows, hw, float(trim),
            PASS=p, MODE=mode, TWO_SOURCES=len(sources) == 2, CUMSUM=cumsum, BLOCK=SELECT_BLOCK, num_warps=8,
        )  # fmt: skip
    scan_kernel[(num_rows,)](hist_PRK, values_R, counts_R, num_rows, float(trim), MODE=mode, CUMSUM=cumsum, num_warps=4)
    return values_R, counts_R[:num_images]
