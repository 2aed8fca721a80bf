"""Exact k-th smallest of the valid values of each image: sample, partition, then radix select.

Used for the lower median (median/MAD SSI) and the trimming threshold (trimmed SSI). Exact, not approximate,
and no sort of the image: fp32 values are mapped to order-preserving uint32 keys, and the key of rank k is found
8 bits at a time, most significant first, by histograms of 256 bins. A histogram pass is bound by
`tl.histogram`'s arithmetic, not by memory (65 us per pass over 64 rows of 518 x 518 on an H200, 4 passes
before): so the passes run over a small candidate set instead of the image, in the manner of SampleSelect
(Ribizel and Anzt, "Approximate and exact selection on GPUs", 2019).

1. Sample, grid (rows,): a program sorts a stratified sample of the row (`SAMPLE` pixels at even spacing, the
   valid ones only) and takes bounds lo <= hi around the sample's rank of the target quantile, `MARGIN` x
   sqrt(valid samples) ranks either side (about 4 standard deviations of the sample rank).
2. Partition, grid (rows, chunks): one read of the row counts its valid pixels n, those below lo, equal to lo and
   equal to hi, and copies the keys strictly between lo and hi into a per-row candidate buffer (a quarter of the
   row), in any order. Ties at a bound are counted, not copied: a median inside a large tie (sky at disparity 0,
   depth clamped at its maximum) needs no pass at all.
3. Radix select over the candidates: 4 histogram passes, grid (rows, chunks), each adding a program's 256 counts
   of the current digit of the candidates that still match the prefix found so far to the row's histogram of
   that pass (integer atomics: deterministic whatever the order). The prefix comes from the earlier passes'
   histograms: a cumulative sum finds the bin that holds the rank, appends it to the prefix and makes the rank
   relative to that bin. Every program redoes these few scans of 256 bins itself (from L2), so no launch sits
   between two passes; one scan kernel, grid (rows,), ends the select and decodes the key to its fp32 value.

Exactness never rests on the sample. From the counts, rank k is lo, hi, or a rank among the candidates; when it
is below lo or above hi, or the candidates overflow the buffer (an unlucky sample, many ties strictly inside),
the row's radix passes read the whole row instead (valid pixels as keys): the plain multi-pass radix select.
Programs past a row's length (the candidate count, 0 for a bound, or the row) do nothing. So a row costs one
partition read plus passes over a few percent of its pixels, and at worst the old 4 full passes. The scan kernel
records the path each row took in its state (`PATH_*`; tests and benchmarks read it).

Launches: 1 memset, 1 sample, 1 partition, 4 histogram passes, 1 scan.

Rows: one source (B rows) or two sources sharing a mask (2B rows: pred then target) in the same launches.
The rank is computed on the device from the valid count n of each row:
- MODE_MEDIAN: k = (n - 1) // 2 (the lower median; torch.median's choice);
- MODE_KEEP:   k = max(n - floor(trim * n), min(n, 1)) - 1 (the largest kept per-pixel loss when trimming).
A row with n = 0 gives 0.

-0.0 sorts before +0.0 in key order; as values they compare equal, so this never changes a result.
NaN is not supported (garbage in, garbage out); invalid pixels may hold anything.

Shapes: B images, HW pixels per image (`_BM` = B x HW), R rows (B or 2B), P passes, K = 256 bins, C candidate
slots per row, S state fields per row (`ROW_*`).
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
SAMPLE = 2048
"""Sampled pixels per row when compiled. The interpreter sorts slowly, so it samples `INTERPRETED_SAMPLE`."""
INTERPRETED_SAMPLE = 64
MARGIN = 2.0
"""Half-width of the candidate interval, in units of sqrt(valid samples) sample ranks (a sample rank's standard
deviation is at most 0.5 sqrt(samples)): about 2 x 2 x 45 / 2048 = 9% of the row's pixels at 2048 samples."""
FORCE_CUMSUM: bool | None = None
"""Tests set this to run the compiled path's `tl.cumsum` scan in the interpreter too (None: cumsum when compiled)."""
ROW_VALID, ROW_BELOW, ROW_AT_LO, ROW_INSIDE, ROW_AT_HI, ROW_LO, ROW_HI, ROW_PATH = range(8)
ROW_FIELDS = 8
"""Per-row state (int32): valid pixels n; valid pixels below lo, equal to lo, strictly between lo and hi (the
candidates), equal to hi (not lo); the bounds lo and hi (uint32 keys, stored bitwise); the path taken."""
PATH_WHOLE_ROW, PATH_CANDIDATES, PATH_LO, PATH_HI, PATH_EMPTY = range(5)
"""How a row's value was found: radix passes over the whole row (the fallback) or over its candidates, the bound
lo or hi itself (rank k in a tie at a bound), or none (no valid pixel: 0)."""


@jit_helper
def _key(x):
    """Order-preserving uint32 key of fp32 values: flip all bits of negatives, only the sign bit of the others."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)  # arithmetic shift: -1 or 0


@jit_helper
def _rank_of(n, trim, MODE: tl.constexpr):
    """The rank k that the mode selects among n valid values (-1 for n = 0 in median mode)."""
    if MODE == 0:
        k = tl.where(n > 0, (n - 1) // 2, -1)
    else:
        k = tl.maximum(n - tl.floor(n.to(tl.float32) * trim).to(tl.int32), tl.minimum(n, 1)) - 1  # keeps >= 1
    return k


@jit_helper
def _load_row(x_ptr, y_ptr, valid_ptr, row, num_images, HW, offs, inb, TWO_SOURCES: tl.constexpr):
    """Keys and valid mask of the row's pixels at `offs` (source 0 for rows < B, else source 1)."""
    base = (row % num_images).to(tl.int64) * HW
    if TWO_SOURCES:
        if row < num_images:
            x = tl.load(x_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
        else:
            x = tl.load(y_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
    else:
        x = tl.load(x_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
    keep = (tl.load(valid_ptr + base + offs, mask=inb, other=0) != 0) & inb
    return _key(x), keep


@jit_helper
def _row_plan(state_ptr, row, HW, CAPACITY, trim, MODE: tl.constexpr):
    """Where the row's value is: (n, the rank to find where the radix passes look, the path, the length of what
    they read). Rank k of the row is lo, a candidate (when they all fit) or hi, by the partition's counts; else
    the passes read the whole row."""
    st = state_ptr + row * 8
    n = tl.load(st + 0)
    k = _rank_of(n, trim, MODE)
    j = k - tl.load(st + 1)  # rank among the pixels from lo up
    at_lo = tl.load(st + 2)
    inside = tl.load(st + 3)
    at_hi = tl.load(st + 4)
    in_lo = (j >= 0) & (j < at_lo)
    in_candidates = (j >= at_lo) & (j < at_lo + inside) & (inside <= CAPACITY)
    in_hi = (j >= at_lo + inside) & (j < at_lo + inside + at_hi)
    path = tl.where(in_lo, 2, tl.where(in_candidates, 1, tl.where(in_hi, 3, 0)))
    path = tl.where(n > 0, path, 4)
    length = tl.where(path == 1, inside, tl.where(path == 0, HW, 0))
    return n, tl.where(path == 1, j - at_lo, k), path, length


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
def _prefix(hist_ptr, row, num_rows, k, PASSES: tl.constexpr, CUMSUM: tl.constexpr):
    """The key bits found by the first PASSES passes (and k made relative to them). Every program that needs them
    redoes these few scans of 256 bins (from L2) rather than wait for a launch that stores them."""
    prefix = tl.full([], 0, tl.uint32)
    for q in tl.static_range(PASSES):
        k, prefix = _scan(hist_ptr + q * num_rows * 256, row, k, prefix, 24 - 8 * q, CUMSUM)
    return prefix


@triton.jit
def _sample_bounds_kernel(
    x_ptr,  # B x HW values, source 0
    y_ptr,  # B x HW values, source 1 (ignored with one source)
    valid_ptr,  # B x HW uint8
    state_ptr,  # R x ROW_FIELDS int32; this kernel writes lo and hi
    num_images,
    HW,
    trim,
    MODE: tl.constexpr,
    TWO_SOURCES: tl.constexpr,
    SAMPLE: tl.constexpr,
    MARGIN: tl.constexpr,
):
    row = tl.program_id(0)
    i = tl.arange(0, SAMPLE)
    offs = tl.where(HW > SAMPLE, (i.to(tl.int64) * HW) // SAMPLE, i)  # even spacing; all pixels of a small row
    key, keep = _load_row(x_ptr, y_ptr, valid_ptr, row, num_images, HW, offs, offs < HW, TWO_SOURCES)
    top = tl.full([SAMPLE], 0xFFFFFFFF, tl.uint32)
    ordered = tl.sort(tl.where(keep, key, top))  # the valid samples first, in key order
    s = tl.sum(keep.to(tl.int32), axis=0)
    r = _rank_of(s, trim, MODE)
    m = (MARGIN * tl.sqrt(s.to(tl.float32))).to(tl.int32) + 1
    lo = tl.where(r - m >= 0, tl.max(tl.where(i == r - m, ordered, 0), axis=0), 0)
    hi = tl.where(r + m < s, tl.max(tl.where(i == r + m, ordered, 0), axis=0), tl.max(top, axis=0))
    tl.store(state_ptr + row * 8 + 5, lo.to(tl.int32, bitcast=True))
    tl.store(state_ptr + row * 8 + 6, hi.to(tl.int32, bitcast=True))


@triton.jit
def _partition_kernel(
    x_ptr,
    y_ptr,
    valid_ptr,
    state_ptr,  # R x ROW_FIELDS int32: adds the counts
    cand_ptr,  # R x CAPACITY int32: the candidates' keys (bitwise)
    num_images,
    HW,
    CAPACITY,
    TWO_SOURCES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    key, keep = _load_row(x_ptr, y_ptr, valid_ptr, row, num_images, HW, offs, offs < HW, TWO_SOURCES)
    st = state_ptr + row * 8
    lo = tl.load(st + 5).to(tl.uint32, bitcast=True)
    hi = tl.load(st + 6).to(tl.uint32, bitcast=True)
    inside = keep & (key > lo) & (key < hi)
    flags = inside.to(tl.int32)
    tl.atomic_add(st + 0, tl.sum(keep.to(tl.int32), axis=0), sem="relaxed")
    tl.atomic_add(st + 1, tl.sum((keep & (key < lo)).to(tl.int32), axis=0), sem="relaxed")
    tl.atomic_add(st + 2, tl.sum((keep & (key == lo)).to(tl.int32), axis=0), sem="relaxed")
    tl.atomic_add(st + 4, tl.sum((keep & (key == hi) & (key != lo)).to(tl.int32), axis=0), sem="relaxed")
    start = tl.atomic_add(st + 3, tl.sum(flags, axis=0), sem="relaxed")  # this program's slots in the buffer
    slot = start + tl.cumsum(flags, axis=0) - 1
    tl.store(
        cand_ptr + row.to(tl.int64) * CAPACITY + slot, key.to(tl.int32, bitcast=True), mask=inside & (slot < CAPACITY)
    )


@triton.jit
def _radix_hist_kernel(
    x_ptr,  # B x HW values, source 0
    y_ptr,  # B x HW values, source 1 (ignored with one source)
    valid_ptr,  # B x HW uint8
    state_ptr,  # R x ROW_FIELDS int32, partition done
    cand_ptr,  # R x CAPACITY int32 candidate keys
    hist_ptr,  # P x R x NUM_BINS int32, zeroed; this pass adds to hist[PASS]
    num_images,
    num_rows,
    HW,
    CAPACITY,
    trim,
    PASS: tl.constexpr,
    MODE: tl.constexpr,
    TWO_SOURCES: tl.constexpr,
    CUMSUM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    start = tl.program_id(1) * BLOCK
    _, k, path, length = _row_plan(state_ptr, row, HW, CAPACITY, trim, MODE)
    if start < length:
        offs = start + tl.arange(0, BLOCK)
        inb = offs < length
        if path == 1:
            key = tl.load(cand_ptr + row.to(tl.int64) * CAPACITY + offs, mask=inb, other=0).to(tl.uint32, bitcast=True)
            keep = inb
        else:
            key, keep = _load_row(x_ptr, y_ptr, valid_ptr, row, num_images, HW, offs, inb, TWO_SOURCES)
        SHIFT: tl.constexpr = 24 - 8 * PASS
        if PASS > 0:
            prefix = _prefix(hist_ptr, row, num_rows, k, PASS, CUMSUM)
            keep = keep & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
        digit = ((key >> SHIFT) & 0xFF).to(tl.int32)
        counts = tl.histogram(digit, 256, mask=keep)
        tl.atomic_add(hist_ptr + (PASS * num_rows + row) * 256 + tl.arange(0, 256), counts, sem="relaxed")


@triton.jit
def _radix_scan_kernel(
    state_ptr,  # R x ROW_FIELDS int32; this kernel writes the path
    hist_ptr,  # P x R x NUM_BINS int32, all passes done
    out_ptr,  # R fp32
    count_ptr,  # R int32
    num_rows,
    HW,
    CAPACITY,
    trim,
    MODE: tl.constexpr,
    CUMSUM: tl.constexpr,
):
    """After the last pass: the row's exact key of rank k (a bound, or the passes' prefix), decoded to its fp32
    value (0 for an empty row)."""
    row = tl.program_id(0)
    n, k, path, _ = _row_plan(state_ptr, row, HW, CAPACITY, trim, MODE)
    key = _prefix(hist_ptr, row, num_rows, k, 4, CUMSUM).to(tl.int32, bitcast=True)
    key = tl.where(
        path == 2, tl.load(state_ptr + row * 8 + 5), tl.where(path == 3, tl.load(state_ptr + row * 8 + 6), key)
    )
    bits = key ^ tl.where(key < 0, -2147483648, -1)
    value = bits.to(tl.float32, bitcast=True)
    tl.store(out_ptr + row, tl.where(n > 0, value, 0.0))
    tl.store(count_ptr + row, n)
    tl.store(state_ptr + row * 8 + 7, path)


def sample_size() -> int:
    """Pixels sampled per row now: `SAMPLE` compiled, `INTERPRETED_SAMPLE` in the interpreter."""
    return INTERPRETED_SAMPLE if interpreter_enabled() else SAMPLE


def candidate_capacity(hw: int) -> int:
    """Candidate slots per row: a quarter of the row (a whole block at least, never more than the row)."""
    return min(hw, max(SELECT_BLOCK, hw // 4))


def select_with_state(
    sources: list[torch.Tensor], valid_u8_BM: torch.Tensor, *, mode: int = MODE_MEDIAN, trim: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`radix_select`, also returning the R x ROW_FIELDS per-row state (for tests and benchmarks: column
    `ROW_PATH` says how each row's value was found, `PATH_*`)."""
    assert 1 <= len(sources) <= 2
    num_images, hw = valid_u8_BM.shape
    for s in sources:
        assert s.shape == (num_images, hw) and s.is_contiguous()
    num_rows = len(sources) * num_images
    device = valid_u8_BM.device
    capacity = candidate_capacity(hw)
    scratch = torch.zeros(num_rows * (ROW_FIELDS + NUM_PASSES * NUM_BINS), dtype=torch.int32, device=device)
    state_RS = scratch[: num_rows * ROW_FIELDS].view(num_rows, ROW_FIELDS)
    hist_PRK = scratch[num_rows * ROW_FIELDS :].view(NUM_PASSES, num_rows, NUM_BINS)
    cand_RC = torch.empty((num_rows, capacity), dtype=torch.int32, device=device)
    values_R = torch.empty(num_rows, dtype=torch.float32, device=device)
    counts_R = torch.empty(num_rows, dtype=torch.int32, device=device)
    cumsum = not interpreter_enabled() if FORCE_CUMSUM is None else FORCE_CUMSUM
    two = len(sources) == 2
    x, y = sources[0], sources[-1]
    resolve(_sample_bounds_kernel)[(num_rows,)](
        x, y, valid_u8_BM, state_RS, num_images, hw, float(trim),
        MODE=mode, TWO_SOURCES=two, SAMPLE=sample_size(), MARGIN=MARGIN, num_warps=4,
    )  # fmt: skip
    grid = (num_rows, triton.cdiv(hw, SELECT_BLOCK))
    resolve(_partition_kernel)[grid](
        x, y, valid_u8_BM, state_RS, cand_RC, num_images, hw, capacity, TWO_SOURCES=two, BLOCK=SELECT_BLOCK, num_warps=8
    )
    hist_kernel = resolve(_radix_hist_kernel)
    for p in range(NUM_PASSES):
        hist_kernel[grid](
            x, y, valid_u8_BM, state_RS, cand_RC, hist_PRK, num_images, num_rows, hw, capacity, float(trim),
            PASS=p, MODE=mode, TWO_SOURCES=two, CUMSUM=cumsum, BLOCK=SELECT_BLOCK, num_warps=8,
        )  # fmt: skip
    resolve(_radix_scan_kernel)[(num_rows,)](
        state_RS, hist_PRK, values_R, counts_R, num_rows, hw, capacity, float(trim),
        MODE=mode, CUMSUM=cumsum, num_warps=4,
    )  # fmt: skip
    return values_R, counts_R[:num_images], state_RS


def radix_select(
    sources: list[torch.Tensor], valid_u8_BM: torch.Tensor, *, mode: int = MODE_MEDIAN, trim: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select over the rows of one or two B x HW sources sharing a B x HW uint8 mask.

    Returns:
        (values_R, num_valid_B): R = len(sources) * B fp32 values (source 0's rows first) and the int32 count of
        valid pixels per image.
    """
    values_R, num_valid_B, _ = select_with_state(sources, valid_u8_BM, mode=mode, trim=trim)
    return values_R, num_valid_B
