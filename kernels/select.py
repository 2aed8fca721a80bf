"""Exact k-th smallest of the valid values of each image: multi-block radix select.

Used for the lower median (median/MAD SSI) and the trimming threshold (trimmed SSI). Exact, not approximate,
and no sort: fp32 values are mapped to order-preserving uint32 keys and the key of rank k is found 8 bits at a
time, most significant first. Each of the 4 passes is
- a histogram kernel, grid (rows, chunks): every program histograms the current digit of the valid keys that
  still match the prefix found so far and atomically adds its 256 counts to the row's histogram;
- a scan kernel, grid (rows,): a cumulative sum finds the bin that holds rank k, appends the bin to the
  prefix and makes k relative to that bin.
After 4 passes the prefix is the exact key, decoded back to the fp32 value. Reads: 4 passes over the values
and the mask; the atomics are integer adds, so the result is deterministic.

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

from ._common import interpreter_enabled, resolve

MODE_MEDIAN = 0
MODE_KEEP = 1
NUM_BINS = 256
NUM_PASSES = 4
SELECT_BLOCK = 4096
FORCE_CUMSUM: bool | None = None
"""Tests set this to run the compiled path's `tl.cumsum` scan in the interpreter too (None: cumsum when compiled)."""


@triton.jit
def _radix_hist_kernel(
    x_ptr,  # B x HW values, source 0
    y_ptr,  # B x HW values, source 1 (ignored with one source)
    valid_ptr,  # B x HW uint8
    state_ptr,  # R x 4 int32: n, k, prefix bits, unused
    hist_ptr,  # R x NUM_BINS int32 for this pass, zeroed
    num_images,
    HW,
    PASS: tl.constexpr,
    TWO_SOURCES: tl.constexpr,
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
        prefix = tl.load(state_ptr + row * 4 + 2).to(tl.uint32, bitcast=True)
        keep = keep & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
    digit = ((key >> SHIFT) & 0xFF).to(tl.int32)
    counts = tl.histogram(digit, 256, mask=keep)
    tl.atomic_add(hist_ptr + row * 256 + tl.arange(0, 256), counts, sem="relaxed")


@triton.jit
def _radix_scan_kernel(
    hist_ptr,  # R x NUM_BINS int32 for this pass
    state_ptr,  # R x 4 int32
    out_ptr,  # R fp32, written by the last pass
    count_ptr,  # R int32, written by the first pass
    trim,
    PASS: tl.constexpr,
    MODE: tl.constexpr,
    CUMSUM: tl.constexpr,
):
    row = tl.program_id(0)
    bins = tl.arange(0, 256)
    counts = tl.load(hist_ptr + row * 256 + bins)
    if PASS == 0:
        n = tl.sum(counts, axis=0)
        if MODE == 0:
            k = (n - 1) // 2
            k = tl.where(n > 0, k, -1)
        else:
            num_drop = tl.floor(n.to(tl.float32) * trim).to(tl.int32)
            k = n - num_drop - 1
        tl.store(state_ptr + row * 4 + 0, n)
        tl.store(count_ptr + row, n)
        prefix = tl.full([], 0, tl.uint32)
    else:
        k = tl.load(state_ptr + row * 4 + 1)
        prefix = tl.load(state_ptr + row * 4 + 2).to(tl.uint32, bitcast=True)
    if CUMSUM:
        cum = tl.cumsum(counts, axis=0)
    else:  # the same inclusive prefix sums as a 256 x 256 masked row sum: much faster in the interpreter
        cum = tl.sum(tl.where(bins[None, :] <= bins[:, None], counts[None, :], 0), axis=1)
    chosen = tl.sum((cum <= k).to(tl.int32), axis=0)  # first bin whose cumulative count exceeds k
    below = tl.sum(tl.where(bins < chosen, counts, 0), axis=0)
    k = k - below
    SHIFT: tl.constexpr = 24 - 8 * PASS
    prefix = prefix | (chosen.to(tl.uint32) << SHIFT)
    tl.store(state_ptr + row * 4 + 1, k)
    tl.store(state_ptr + row * 4 + 2, prefix.to(tl.int32, bitcast=True))
    if PASS == 3:
        key = prefix.to(tl.int32, bitcast=True)
        bits = key ^ tl.where(key < 0, -2147483648, -1)
        value = bits.to(tl.float32, bitcast=True)
        n = tl.load(state_ptr + row * 4 + 0)
        value = tl.where(n > 0, value, 0.0)
        tl.store(out_ptr + row, value)


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
    state_R4 = torch.zeros((num_rows, 4), dtype=torch.int32, device=device)
    values_R = torch.empty(num_rows, dtype=torch.float32, device=device)
    counts_R = torch.empty(num_rows, dtype=torch.int32, device=device)
    hist_kernel, scan_kernel = resolve(_radix_hist_kernel), resolve(_radix_scan_kernel)
    cumsum = not interpreter_enabled() if FORCE_CUMSUM is None else FORCE_CUMSUM
    grid = (num_rows, triton.cdiv(hw, SELECT_BLOCK))
    y = sources[-1]
    for p in range(NUM_PASSES):
        hist_kernel[grid](
            sources[0],
            y,
            valid_u8_BM,
            state_R4,
            hist_PRK[p],
            num_images,
            hw,
            PASS=p,
            TWO_SOURCES=len(sources) == 2,
            BLOCK=SELECT_BLOCK,
            num_warps=8,
        )
        scan_kernel[(num_rows,)](
            hist_PRK[p], state_R4, values_R, counts_R, float(trim), PASS=p, MODE=mode, CUMSUM=cumsum, num_warps=4
        )
    return values_R, counts_R[:num_images]
