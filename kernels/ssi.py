"""Fused scale-and-shift-invariant (SSI) losses: least-squares (MiDaS) and median/MAD (Depth Anything) alignment.

Three layers, Liger style:
1. Triton kernels + launchers (this file's `_*_kernel` and `_loss_passes`).
2. `SSILsqFunction` / `SSIMedianFunction`: `torch.autograd.Function`s with a fused one-pass backward.
3. `ssi_lsq` / `ssi_median`: the dispatch functions (`impl="auto" | "triton" | "torch"`).
The spec is `reference.ssi_lsq_reference` / `reference.ssi_median_reference`; read those first.

Passes over the B x HW maps (C = chunks of `BLOCK` pixels per image). Each pass is one launch; the per-image
step between two passes (combining the chunks, the solve) is done by every program of the next pass for its own
image (a few hundred values from L2), not by a launch of its own: at batch 32 these losses take tenths of a
millisecond, and every launch costs the host about as much as a pass costs the device.
- least squares: 1 stats pass (per-chunk count, means and *centered* moments, combined exactly per image by
  the parallel-variance formula; no raw sums of squares, so no catastrophic cancellation in fp32), the 2x2
  solve (in the loss pass), 1 loss pass, 1 per-image finalize (loss, G, Z), and 1 backward pass. The MSE loss
  also has a closed form from the moments alone (var_d - cov^2 / var_p, one pass), but it cancels
  catastrophically when the fit is good: in fp32 its relative error grows like 1e-7 / (1 - rho^2), 1e-3 at
  rho^2 = 0.9999. So the loss is summed from the residuals.
- median/MAD: the select (pred and target medians in the same launches: a sample, 1 partition pass, then 4
  radix passes over a few percent of the pixels, see `select.py`), 1 MAD pass, 1 loss pass (which forms the
  MADs), 1 finalize, 1 backward pass.
- trimming adds: the loss pass writes the per-pixel loss map (fp32), a select finds the threshold, 1 pass sums
  the kept losses; the backward reads the map to recover the kept set bit-exactly.

Backward, per image (n valid pixels, N kept, w_j trim weights, g_j = dphi/de at the residual e_j, upstream
gradients gL for the image's loss and gA / gB for the alignment outputs; c = gL / N):
- least squares, e = s p + t - d, s = cov / var, t = mean_d - s mean_p:
  dp_j = c w_j g_j s + ds_j (c Z + gA - mean_p gB) - (s / n)(c G + gB),
  ds_j = ((d_j - mean_d) - 2 s (p_j - mean_p)) / var, with G = sum w g, Z = sum w g (p - mean_p)
  (no-ops when the system is singular: s = 0 and t = mean_d carry no gradient).
- median/MAD, e = (p - m_p) / S_p - (d - m_d) / S_d, output pred_scale = 1 / S_p:
  dp_j = c w_j g_j / S_p + k_S [S_p unfloored] (sgn(p_j - m_p) / n) + [p_j == m_p] k_m / n_tied,
  k_S = -c Z / S_p - gA / S_p^2 with Z = sum w g (p - m_p) / S_p, and
  k_m = -c G / S_p - k_S [S_p unfloored] sum(sgn(p - m_p)) / n.
G and Z are summed in the forward loss pass, so the backward is a single elementwise pass.

Shapes: B images, HW pixels per image (`_BM` = B x HW, the flattened maps), C chunks per image, F per-image
fields (`IMG_FIELDS`), A per-image backward fields (`AUX_FIELDS`). Non-contiguous inputs are copied.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import reference
from ._common import (
    check_maps,
    chunk,
    first_order,
    flat_contiguous,
    jit_helper,
    load_maps,
    resolve,
    sign,
    upstream_grad,
    use_triton,
    valid_bytes,
)
from .select import MODE_KEEP, MODE_MEDIAN, radix_select

BLOCK = 2048
ALIGN_LSQ = 0
ALIGN_MEDIAN = 1
IMG_FIELDS = 8
# Per-image fields in `img` (fp32):
#   least squares: 0 n, 1 mean_p, 2 mean_d, 3 n*var_p, 4 scale, 5 shift, 6 singular (0/1)
#   median/MAD:    0 n, 1 median_p, 2 median_d, 3 S_p unfloored (0/1), 4 S_p, 5 S_d, 6 sum sgn(p - m_p), 7 n_tied
AUX_FIELDS = 4  # per image: 0 num_keep, 1 G = sum w g, 2 Z = sum w g z, 3 tie fraction at the trim threshold
# Per-chunk partial sums (`part`, fp32), one width per pass; compile-time constants, so kernels index them as literals.
LSQ_PARTS = tl.constexpr(5)  # least-squares stats: n, mean_p, mean_d, centered sum p^2, centered sum p d
MAD_PARTS = tl.constexpr(4)  # median/MAD: sum |p - m_p|, sum |d - m_d|, sum sgn(p - m_p), #(p == m_p)
LOSS_PARTS = tl.constexpr(3)  # first loss pass: sum loss, G = sum g, Z = sum g z
TRIM_PARTS = tl.constexpr(7)  # trimmed loss pass: below (loss, count), tied count, below (G, Z), tied (G, Z)


def _reduce_block(C):
    return max(16, triton.next_power_of_2(C))


@jit_helper
def _aligned_residual(p, d, f1, f2, f4, f5, ALIGN: tl.constexpr):
    """The aligned residual e and the z that Z = sum w g z weighs, from the image's fields 1, 2, 4, 5 (IMG_FIELDS).

    Least squares: e = scale p + shift - d, z = p - mean_p. Median/MAD: z = (p - m_p) / S_p, e = z - (d - m_d) / S_d.
    The loss passes and the backward share it, so both see the same e.
    """
    if ALIGN == 0:  # f1 mean_p, f4 scale, f5 shift
        e = f4 * p + f5 - d
        z = p - f1
    else:  # f1 median_p, f2 median_d, f4 S_p, f5 S_d
        z = (p - f1) / f4
        e = z - (d - f2) / f5
    return e, z


@jit_helper
def _load_fields(img):
    """Fields 1, 2, 4, 5 of an image (what `_aligned_residual` needs), as the first loss pass stored them."""
    return tl.load(img + 1), tl.load(img + 2), tl.load(img + 4), tl.load(img + 5)


@jit_helper
def _penalty(e, L1: tl.constexpr):
    """The per-pixel loss phi(e) and its derivative g: |e| and sgn(e) (l1), or e^2 and 2 e (mse)."""
    if L1:
        loss = tl.abs(e)
        g = sign(e)
    else:
        loss = e * e
        g = 2.0 * e
    return loss, g


@triton.jit
def _lsq_stats_kernel(pred_ptr, target_ptr, valid_ptr, part_ptr, HW, C, BLOCK: tl.constexpr):
    """Per chunk: count, means and centered second moments -> part[b, c, 0:5]."""
    b, c, offs, inb, base = chunk(HW, BLOCK)
    v, p, d = load_maps(pred_ptr, target_ptr, valid_ptr, base, offs, inb)
    n = tl.sum(v.to(tl.float32), axis=0)
    n_safe = tl.maximum(n, 1.0)
    mean_p = tl.sum(p, axis=0) / n_safe
    mean_d = tl.sum(d, axis=0) / n_safe
    pc = tl.where(v, p - mean_p, 0.0)
    dc = tl.where(v, d - mean_d, 0.0)
    out = part_ptr + (b * C + c) * LSQ_PARTS
    tl.store(out + 0, n)
    tl.store(out + 1, mean_p)
    tl.store(out + 2, mean_d)
    tl.store(out + 3, tl.sum(pc * pc, axis=0))
    tl.store(out + 4, tl.sum(pc * dc, axis=0))


@jit_helper
def _lsq_fields(part_ptr, b, C, rel_eps, BLOCK_C: tl.constexpr):
    """Image b's least-squares fields (IMG_FIELDS order) from the stats pass's chunks: the chunks combined exactly
    (parallel-variance formula), then the 2x2 system solved. Every program of the first loss pass computes them."""
    cs = tl.arange(0, BLOCK_C)
    m = cs < C
    src = part_ptr + (b * C + cs) * LSQ_PARTS
    n_c = tl.load(src + 0, mask=m, other=0.0)
    mp_c = tl.load(src + 1, mask=m, other=0.0)
    md_c = tl.load(src + 2, mask=m, other=0.0)
    var_c = tl.load(src + 3, mask=m, other=0.0)
    cov_c = tl.load(src + 4, mask=m, other=0.0)
    n = tl.sum(n_c, axis=0)
    n_safe = tl.maximum(n, 1.0)
    mean_p = tl.sum(n_c * mp_c, axis=0) / n_safe
    mean_d = tl.sum(n_c * md_c, axis=0) / n_safe
    var_p = tl.sum(var_c + n_c * (mp_c - mean_p) * (mp_c - mean_p), axis=0)
    cov = tl.sum(cov_c + n_c * (mp_c - mean_p) * (md_c - mean_d), axis=0)
    singular = (n < 2.0) | (var_p <= rel_eps * (var_p + n * mean_p * mean_p))
    scale = tl.where(singular, 0.0, cov / tl.where(singular, 1.0, var_p))
    shift = mean_d - scale * mean_p
    return n, mean_p, mean_d, var_p, scale, shift, singular.to(tl.float32), 0.0 * n


@triton.jit
def _median_mad_kernel(pred_ptr, target_ptr, valid_ptr, median_ptr, part_ptr, HW, C, num_images, BLOCK: tl.constexpr):
    """Per chunk: sum |p - m_p|, sum |d - m_d|, sum sgn(p - m_p), #(p == m_p) -> part[b, c, 0:4]."""
    b, c, offs, inb, base = chunk(HW, BLOCK)
    v, p, d = load_maps(pred_ptr, target_ptr, valid_ptr, base, offs, inb)
    med_p = tl.load(median_ptr + b)
    med_d = tl.load(median_ptr + num_images + b)
    dp = p - med_p
    out = part_ptr + (b * C + c) * MAD_PARTS
    tl.store(out + 0, tl.sum(tl.where(v, tl.abs(dp), 0.0), axis=0))
    tl.store(out + 1, tl.sum(tl.where(v, tl.abs(d - med_d), 0.0), axis=0))
    tl.store(out + 2, tl.sum(tl.where(v, sign(dp), 0.0), axis=0))
    tl.store(out + 3, tl.sum(tl.where(v & (p == med_p), 1.0, 0.0), axis=0))


@jit_helper
def _median_fields(part_ptr, median_ptr, num_valid_ptr, b, C, num_images, eps, BLOCK_C: tl.constexpr):
    """Image b's median/MAD fields (IMG_FIELDS order) from the MAD pass's chunks: the mean absolute deviations
    (floored at eps) and what the backward needs. Every program of the first loss pass computes them."""
    cs = tl.arange(0, BLOCK_C)
    m = cs < C
    src = part_ptr + (b * C + cs) * MAD_PARTS
    abs_p = tl.sum(tl.load(src + 0, mask=m, other=0.0), axis=0)
    abs_d = tl.sum(tl.load(src + 1, mask=m, other=0.0), axis=0)
    sum_sgn = tl.sum(tl.load(src + 2, mask=m, other=0.0), axis=0)
    num_tied = tl.sum(tl.load(src + 3, mask=m, other=0.0), axis=0)
    n = tl.load(num_valid_ptr + b).to(tl.float32)
    n_safe = tl.maximum(n, 1.0)
    mad_p = abs_p / n_safe
    mad_d = abs_d / n_safe
    unfloored = mad_p > eps
    s_p = tl.where(unfloored, mad_p, eps)
    s_d = tl.where(mad_d > eps, mad_d, eps)
    med_p = tl.load(median_ptr + b)
    med_d = tl.load(median_ptr + num_images + b)
    return n, med_p, med_d, unfloored.to(tl.float32), s_p, s_d, sum_sgn, num_tied


@triton.jit
def _ssi_pixel_kernel(
    pred_ptr,
    target_ptr,
    valid_ptr,
    stats_ptr,
    median_ptr,
    num_valid_ptr,
    img_ptr,
    out_a_ptr,
    out_b_ptr,
    part_ptr,
    lossmap_ptr,
    HW,
    C,
    num_images,
    param,
    ALIGN: tl.constexpr,
    L1: tl.constexpr,
    WRITE_MAP: tl.constexpr,
    IMG_FIELDS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The first loss pass. The image's alignment comes from the stats pass's chunks (`param`: rel_eps or eps);
    chunk 0 stores it (img, and scale / shift / num_valid or pred_scale / target_scale). Then the aligned residual
    e and per-pixel loss l: untrimmed, part[b, c] = (sum l, sum g, sum g z); trimmed, the loss map."""
    b, c, offs, inb, base = chunk(HW, BLOCK)
    if ALIGN == 0:
        f0, f1, f2, f3, f4, f5, f6, f7 = _lsq_fields(stats_ptr, b, C, param, BLOCK_C)
    else:
        f0, f1, f2, f3, f4, f5, f6, f7 = _median_fields(
            stats_ptr, median_ptr, num_valid_ptr, b, C, num_images, param, BLOCK_C
        )
    if c == 0:
        img = img_ptr + b * IMG_FIELDS
        tl.store(img + 0, f0)
        tl.store(img + 1, f1)
        tl.store(img + 2, f2)
        tl.store(img + 3, f3)
        tl.store(img + 4, f4)
        tl.store(img + 5, f5)
        tl.store(img + 6, f6)
        tl.store(img + 7, f7)
        if ALIGN == 0:
            tl.store(out_a_ptr + b, f4)  # scale
            tl.store(out_b_ptr + b, f5)  # shift
            tl.store(num_valid_ptr + b, f0.to(tl.int32))
        else:
            tl.store(out_a_ptr + b, 1.0 / f4)  # pred_scale = 1 / S_p
            tl.store(out_b_ptr + b, 1.0 / f5)  # target_scale = 1 / S_d
    v, p, d = load_maps(pred_ptr, target_ptr, valid_ptr, base, offs, inb)
    e, z = _aligned_residual(p, d, f1, f2, f4, f5, ALIGN)
    loss, g = _penalty(e, L1)
    # `where`, never a product with the mask: an invalid or padding lane's residual may overflow (inf * 0 is NaN).
    loss = tl.where(v, loss, 0.0)
    if WRITE_MAP:
        tl.store(lossmap_ptr + base + offs, loss, mask=inb)
    else:
        out = part_ptr + (b * C + c) * LOSS_PARTS
        tl.store(out + 0, tl.sum(loss, axis=0))
        tl.store(out + 1, tl.sum(tl.where(v, g, 0.0), axis=0))
        tl.store(out + 2, tl.sum(tl.where(v, g * z, 0.0), axis=0))


@triton.jit
def _ssi_trimmed_kernel(
    pred_ptr,
    target_ptr,
    valid_ptr,
    img_ptr,
    lossmap_ptr,
    threshold_ptr,
    part_ptr,
    HW,
    C,
    ALIGN: tl.constexpr,
    L1: tl.constexpr,
    IMG_FIELDS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Sums below / at the trim threshold -> part[b, c, 0:7] (see `_ssi_finalize_kernel`)."""
    b, c, offs, inb, base = chunk(HW, BLOCK)
    v, p, d = load_maps(pred_ptr, target_ptr, valid_ptr, base, offs, inb)
    loss = tl.load(lossmap_ptr + base + offs, mask=inb, other=0.0)
    threshold = tl.load(threshold_ptr + b)
    f1, f2, f4, f5 = _load_fields(img_ptr + b * IMG_FIELDS)
    e, z = _aligned_residual(p, d, f1, f2, f4, f5, ALIGN)
    _, g = _penalty(e, L1)
    # Masks, used through `where`: a dropped lane's values may be inf. A NaN loss is kept (never trimmed away), so a
    # broken label shows in its image's loss, as in the reference.
    below = v & ((loss < threshold) | (loss != loss))
    tied = v & (loss == threshold)
    out = part_ptr + (b * C + c) * TRIM_PARTS
    tl.store(out + 0, tl.sum(tl.where(below, loss, 0.0), axis=0))
    tl.store(out + 1, tl.sum(below.to(tl.float32), axis=0))
    tl.store(out + 2, tl.sum(tied.to(tl.float32), axis=0))
    tl.store(out + 3, tl.sum(tl.where(below, g, 0.0), axis=0))
    tl.store(out + 4, tl.sum(tl.where(below, g * z, 0.0), axis=0))
    tl.store(out + 5, tl.sum(tl.where(tied, g, 0.0), axis=0))
    tl.store(out + 6, tl.sum(tl.where(tied, g * z, 0.0), axis=0))


@triton.jit
def _ssi_finalize_kernel(
    part_ptr,
    img_ptr,
    threshold_ptr,
    aux_ptr,
    loss_ptr,
    C,
    trim,
    TRIMMED: tl.constexpr,
    IMG_FIELDS: tl.constexpr,
    AUX_FIELDS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per image: the loss (mean of the kept per-pixel losses) and G, Z for the backward."""
    b = tl.program_id(0)
    cs = tl.arange(0, BLOCK_C)
    m = cs < C
    n = tl.load(img_ptr + b * IMG_FIELDS)
    if TRIMMED:
        src = part_ptr + (b * C + cs) * TRIM_PARTS
        sum_below = tl.sum(tl.load(src + 0, mask=m, other=0.0), axis=0)
        num_below = tl.sum(tl.load(src + 1, mask=m, other=0.0), axis=0)
        num_tied = tl.sum(tl.load(src + 2, mask=m, other=0.0), axis=0)
        g_below = tl.sum(tl.load(src + 3, mask=m, other=0.0), axis=0)
        z_below = tl.sum(tl.load(src + 4, mask=m, other=0.0), axis=0)
        g_tied = tl.sum(tl.load(src + 5, mask=m, other=0.0), axis=0)
        z_tied = tl.sum(tl.load(src + 6, mask=m, other=0.0), axis=0)
        num_keep = tl.maximum(n - tl.floor(n * trim), tl.minimum(n, 1.0))  # at least one, like `num_kept`
        frac = (num_keep - num_below) / tl.maximum(num_tied, 1.0)
        total = sum_below + frac * num_tied * tl.load(threshold_ptr + b)
        big_g = g_below + frac * g_tied
        big_z = z_below + frac * z_tied
    else:
        src = part_ptr + (b * C + cs) * LOSS_PARTS
        total = tl.sum(tl.load(src + 0, mask=m, other=0.0), axis=0)
        big_g = tl.sum(tl.load(src + 1, mask=m, other=0.0), axis=0)
        big_z = tl.sum(tl.load(src + 2, mask=m, other=0.0), axis=0)
        num_keep = n
        frac = n * 0.0 + 1.0
    tl.store(loss_ptr + b, total / tl.maximum(num_keep, 1.0))
    out = aux_ptr + b * AUX_FIELDS
    tl.store(out + 0, num_keep)
    tl.store(out + 1, big_g)
    tl.store(out + 2, big_z)
    tl.store(out + 3, frac)


@triton.jit
def _ssi_backward_kernel(
    pred_ptr,
    target_ptr,
    valid_ptr,
    img_ptr,
    aux_ptr,
    lossmap_ptr,
    threshold_ptr,
    grad_loss_ptr,
    grad_a_ptr,
    grad_b_ptr,
    grad_pred_ptr,
    HW,
    ALIGN: tl.constexpr,
    L1: tl.constexpr,
    TRIMMED: tl.constexpr,
    GRAD_LOSS_STRIDE: tl.constexpr,
    GRAD_A_STRIDE: tl.constexpr,
    GRAD_B_STRIDE: tl.constexpr,
    HAS_GRAD_LOSS: tl.constexpr,
    HAS_GRAD_A: tl.constexpr,
    HAS_GRAD_B: tl.constexpr,
    IMG_FIELDS: tl.constexpr,
    AUX_FIELDS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """d(loss_B, alignment outputs)/d pred in one elementwise pass (formulas in the module docstring).

    An upstream gradient that is absent (HAS_GRAD_* false: its output was not used) counts as zero."""
    b, c, offs, inb, base = chunk(HW, BLOCK)
    v, p, d = load_maps(pred_ptr, target_ptr, valid_ptr, base, offs, inb)
    img = img_ptr + b * IMG_FIELDS
    aux = aux_ptr + b * AUX_FIELDS
    n = tl.load(img + 0)
    n_safe = tl.maximum(n, 1.0)
    grad_loss = 0.0
    if HAS_GRAD_LOSS:
        grad_loss = tl.load(grad_loss_ptr + b * GRAD_LOSS_STRIDE)
    grad_a = 0.0
    if HAS_GRAD_A:
        grad_a = tl.load(grad_a_ptr + b * GRAD_A_STRIDE)
    grad_b = 0.0
    if HAS_GRAD_B:
        grad_b = tl.load(grad_b_ptr + b * GRAD_B_STRIDE)
    c_loss = grad_loss / tl.maximum(tl.load(aux + 0), 1.0)
    big_g = c_loss * tl.load(aux + 1)
    big_z = c_loss * tl.load(aux + 2)
    f1, f2, f4, f5 = _load_fields(img)
    e, z = _aligned_residual(p, d, f1, f2, f4, f5, ALIGN)
    _, g = _penalty(e, L1)
    if TRIMMED:
        loss = tl.load(lossmap_ptr + base + offs, mask=inb, other=0.0)
        threshold = tl.load(threshold_ptr + b)
        w = tl.where((loss < threshold) | (loss != loss), 1.0, tl.where(loss == threshold, tl.load(aux + 3), 0.0))
        q = c_loss * w * g
    else:
        q = c_loss * g
    if ALIGN == 0:  # z = p - mean_p
        mean_p = tl.load(img + 1)
        mean_d = tl.load(img + 2)
        var_p = tl.load(img + 3)
        scale = tl.load(img + 4)
        solved = 1.0 - tl.load(img + 6)
        k_scale = solved * (big_z + grad_a - mean_p * grad_b) / tl.where(solved > 0, var_p, 1.0)
        k_shift = solved * (scale / n_safe) * (big_g + grad_b)
        grad = q * scale + ((d - mean_d) - 2.0 * scale * z) * k_scale - k_shift
    else:
        med_p = tl.load(img + 1)
        unfloored = tl.load(img + 3)
        s_p = tl.load(img + 4)
        sum_sgn = tl.load(img + 6)
        num_tied = tl.maximum(tl.load(img + 7), 1.0)
        k_s = (-big_z / s_p - grad_a / (s_p * s_p)) * unfloored
        k_m = (-big_g / s_p - k_s * sum_sgn / n_safe) / num_tied
        grad = q / s_p + k_s * sign(p - med_p) / n_safe + tl.where(p == med_p, k_m, 0.0)
    grad = tl.where(v, grad, 0.0)  # invalid pixels get 0, even when this image's values overflowed
    tl.store(grad_pred_ptr + base + offs, grad.to(grad_pred_ptr.dtype.element_ty), mask=inb)


class _Alignment(NamedTuple):
    """What the first loss pass needs to align an image and where it stores the alignment (see `_ssi_pixel_kernel`)."""

    align: int
    stats: torch.Tensor  # B x C x (LSQ_PARTS | MAD_PARTS) chunk partials of the stats / MAD pass
    medians: torch.Tensor  # 2B medians (median/MAD), any fp32 tensor (least squares)
    num_valid: torch.Tensor  # B int32: written (least squares) or read (median/MAD)
    img: torch.Tensor  # B x IMG_FIELDS, written
    out_a: torch.Tensor  # B: scale | pred_scale, written
    out_b: torch.Tensor  # B: shift | target_scale, written
    param: float  # rel_eps | eps


def _loss_passes(p_BM, d_BM, v_BM, al: _Alignment, *, l1: bool, trim: float):
    """The loss pass(es), the first one aligning each image: returns (loss_B, aux_BA, lossmap_BM or None,
    threshold_B or None)."""
    num_images, hw = p_BM.shape
    num_chunks = triton.cdiv(hw, BLOCK)
    grid = (num_images, num_chunks)
    device = p_BM.device
    loss_B = torch.empty(num_images, dtype=torch.float32, device=device)
    aux_BA = torch.empty((num_images, AUX_FIELDS), dtype=torch.float32, device=device)
    trimmed = trim > 0
    if trimmed:
        lossmap_BM = torch.empty((num_images, hw), dtype=torch.float32, device=device)
        part = torch.empty((num_images, num_chunks, TRIM_PARTS), dtype=torch.float32, device=device)
    else:
        lossmap_BM = None
        part = torch.empty((num_images, num_chunks, LOSS_PARTS), dtype=torch.float32, device=device)
    resolve(_ssi_pixel_kernel)[grid](
        p_BM, d_BM, v_BM, al.stats, al.medians, al.num_valid, al.img, al.out_a, al.out_b, part,
        lossmap_BM if trimmed else part, hw, num_chunks, num_images, al.param,
        ALIGN=al.align, L1=l1, WRITE_MAP=trimmed, IMG_FIELDS=IMG_FIELDS, BLOCK=BLOCK,
        BLOCK_C=_reduce_block(num_chunks), num_warps=8,
    )  # fmt: skip
    threshold_B = None
    if trimmed:
        threshold_B, _ = radix_select([lossmap_BM], v_BM, mode=MODE_KEEP, trim=trim)
        resolve(_ssi_trimmed_kernel)[grid](
            p_BM, d_BM, v_BM, al.img, lossmap_BM, threshold_B, part, hw, num_chunks,
            ALIGN=al.align, L1=l1, IMG_FIELDS=IMG_FIELDS, BLOCK=BLOCK, num_warps=8,
        )  # fmt: skip
    resolve(_ssi_finalize_kernel)[(num_images,)](
        part, al.img, threshold_B if trimmed else loss_B, aux_BA, loss_B, num_chunks, float(trim),
        TRIMMED=trimmed, IMG_FIELDS=IMG_FIELDS, AUX_FIELDS=AUX_FIELDS, BLOCK_C=_reduce_block(num_chunks),
    )  # fmt: skip
    return loss_B, aux_BA, lossmap_BM, threshold_B


def _aligned_loss(ctx, p_BM, d_BM, v_BM, al: _Alignment, *, metric: str, trim: float, shape) -> torch.Tensor:
    """Both ops' forward after their statistics: the loss passes, and what `_backward` needs kept in `ctx`."""
    l1 = metric == "l1"
    loss_B, aux_BA, lossmap_BM, threshold_B = _loss_passes(p_BM, d_BM, v_BM, al, l1=l1, trim=trim)
    ctx.save_for_backward(p_BM, d_BM, v_BM, al.img, aux_BA, lossmap_BM, threshold_B)
    ctx.align, ctx.l1, ctx.trim, ctx.shape = al.align, l1, trim, shape
    ctx.set_materialize_grads(False)
    return loss_B


def _backward(ctx, grad_loss_B, grad_a_B, grad_b_B):
    p_BM, d_BM, v_BM, img_BF, aux_BA, lossmap_BM, threshold_B = ctx.saved_tensors
    num_images, hw = p_BM.shape
    grad_pred_BM = torch.empty_like(p_BM)
    trimmed = ctx.trim > 0
    grad_loss_B, loss_stride, has_loss = upstream_grad(grad_loss_B, img_BF)
    grad_a_B, a_stride, has_a = upstream_grad(grad_a_B, img_BF)
    grad_b_B, b_stride, has_b = upstream_grad(grad_b_B, img_BF)
    resolve(_ssi_backward_kernel)[(num_images, triton.cdiv(hw, BLOCK))](
        p_BM, d_BM, v_BM, img_BF, aux_BA,
        lossmap_BM if trimmed else p_BM, threshold_B if trimmed else img_BF,
        grad_loss_B, grad_a_B, grad_b_B, grad_pred_BM, hw,
        ALIGN=ctx.align, L1=ctx.l1, TRIMMED=trimmed,
        GRAD_LOSS_STRIDE=loss_stride, GRAD_A_STRIDE=a_stride, GRAD_B_STRIDE=b_stride,
        HAS_GRAD_LOSS=has_loss, HAS_GRAD_A=has_a, HAS_GRAD_B=has_b,
        IMG_FIELDS=IMG_FIELDS, AUX_FIELDS=AUX_FIELDS, BLOCK=BLOCK, num_warps=8,
    )  # fmt: skip
    return grad_pred_BM.view(ctx.shape)


class SSILsqFunction(torch.autograd.Function):
    """Least-squares SSI loss, fused. Outputs (loss_B, scale_B, shift_B, num_valid_B); the first three carry
    gradients to `pred`, the target and the mask get none."""

    @staticmethod
    def forward(ctx, pred_BHW, target_BHW, valid_BHW, metric, trim):
        p_BM, d_BM, v_BM = flat_contiguous(pred_BHW), flat_contiguous(target_BHW), valid_bytes(valid_BHW)
        num_images, hw = p_BM.shape
        num_chunks = triton.cdiv(hw, BLOCK)
        device = p_BM.device
        part = torch.empty((num_images, num_chunks, LSQ_PARTS), dtype=torch.float32, device=device)
        resolve(_lsq_stats_kernel)[(num_images, num_chunks)](
            p_BM, d_BM, v_BM, part, hw, num_chunks, BLOCK=BLOCK, num_warps=8
        )
        img_BF = torch.empty((num_images, IMG_FIELDS), dtype=torch.float32, device=device)
        scale_B = torch.empty(num_images, dtype=torch.float32, device=device)
        shift_B = torch.empty(num_images, dtype=torch.float32, device=device)
        num_valid_B = torch.empty(num_images, dtype=torch.int32, device=device)
        alignment = _Alignment(ALIGN_LSQ, part, img_BF, num_valid_B, img_BF, scale_B, shift_B, reference.LSQ_REL_EPS)
        loss_B = _aligned_loss(ctx, p_BM, d_BM, v_BM, alignment, metric=metric, trim=trim, shape=pred_BHW.shape)
        ctx.mark_non_differentiable(num_valid_B)
        return loss_B, scale_B, shift_B, num_valid_B

    @staticmethod
    @first_order
    def backward(ctx, grad_loss_B, grad_scale_B, grad_shift_B, _grad_num_valid):
        return _backward(ctx, grad_loss_B, grad_scale_B, grad_shift_B), None, None, None, None


class SSIMedianFunction(torch.autograd.Function):
    """Median/MAD SSI loss, fused. Outputs (loss_B, pred_scale_B, target_scale_B, pred_median_B,
    target_median_B, num_valid_B); only loss_B and pred_scale_B (= 1 / MAD(pred)) carry gradients."""

    @staticmethod
    def forward(ctx, pred_BHW, target_BHW, valid_BHW, metric, trim, eps):
        p_BM, d_BM, v_BM = flat_contiguous(pred_BHW), flat_contiguous(target_BHW), valid_bytes(valid_BHW)
        num_images, hw = p_BM.shape
        num_chunks = triton.cdiv(hw, BLOCK)
        device = p_BM.device
        medians_R, num_valid_B = radix_select([p_BM, d_BM], v_BM, mode=MODE_MEDIAN)
        part = torch.empty((num_images, num_chunks, MAD_PARTS), dtype=torch.float32, device=device)
        resolve(_median_mad_kernel)[(num_images, num_chunks)](
            p_BM, d_BM, v_BM, medians_R, part, hw, num_chunks, num_images, BLOCK=BLOCK, num_warps=8
        )
        img_BF = torch.empty((num_images, IMG_FIELDS), dtype=torch.float32, device=device)
        pred_scale_B = torch.empty(num_images, dtype=torch.float32, device=device)
        target_scale_B = torch.empty(num_images, dtype=torch.float32, device=device)
        alignment = _Alignment(ALIGN_MEDIAN, part, medians_R, num_valid_B, img_BF, pred_scale_B, target_scale_B, eps)
        loss_B = _aligned_loss(ctx, p_BM, d_BM, v_BM, alignment, metric=metric, trim=trim, shape=pred_BHW.shape)
        pred_median_B, target_median_B = medians_R[:num_images], medians_R[num_images:]
        ctx.mark_non_differentiable(target_scale_B, pred_median_B, target_median_B, num_valid_B)
        return loss_B, pred_scale_B, target_scale_B, pred_median_B, target_median_B, num_valid_B

    @staticmethod
    @first_order
    def backward(ctx, grad_loss_B, grad_pred_scale_B, *_non_differentiable):
        return _backward(ctx, grad_loss_B, grad_pred_scale_B, None), None, None, None, None, None


class LsqSSIOutput(NamedTuple):
    """Per-image results of `ssi_lsq` (fp32, except the int32 count)."""

    loss_B: torch.Tensor
    scale_B: torch.Tensor
    shift_B: torch.Tensor
    num_valid_B: torch.Tensor


class MedianSSIOutput(NamedTuple):
    """Per-image results of `ssi_median` (fp32, except the int32 count). Only loss_B and pred_scale_B have
    gradients; the normalized residual is pred_scale * (pred - pred_median) - target_scale * (target - ...)."""

    loss_B: torch.Tensor
    pred_scale_B: torch.Tensor
    target_scale_B: torch.Tensor
    pred_median_B: torch.Tensor
    target_median_B: torch.Tensor
    num_valid_B: torch.Tensor


def _check_options(op: str, metric: str, trim: float) -> None:
    if metric not in ("mse", "l1"):
        raise ValueError(f"{op}: metric={metric!r} is not 'mse' or 'l1'")
    if not reference.trim_in_range(trim):
        raise ValueError(f"{op}: trim={trim} must be in [0, 1) (also in fp32)")


def ssi_lsq(
    pred_BHW: torch.Tensor,
    target_BHW: torch.Tensor,
    valid_BHW: torch.Tensor,
    *,
    metric: str = "mse",
    trim: float = 0.0,
    impl: str = "auto",
) -> LsqSSIOutput:
    """Least-squares scale-and-shift-invariant loss per image; spec: `reference.ssi_lsq_reference`.

    Args:
        pred_BHW: prediction (fp32/bf16/fp16).
        target_BHW: target in the same space (no gradient).
        valid_BHW: bool mask.
        metric: "mse" (mean of r^2) or "l1" (mean of |r|).
        trim: fraction of the largest per-pixel losses dropped per image (0 keeps all).
        impl: "auto" | "triton" | "torch".
    """
    check_maps("ssi_lsq", pred_BHW, target_BHW, valid_BHW)
    _check_options("ssi_lsq", metric, trim)
    if use_triton("ssi_lsq", impl, pred_BHW, target_BHW, valid_BHW):
        outputs = SSILsqFunction.apply(pred_BHW, target_BHW.detach(), valid_BHW, metric, float(trim))
        return LsqSSIOutput(*outputs)
    loss_B, scale_B, shift_B = reference.ssi_lsq_reference(pred_BHW, target_BHW, valid_BHW, metric=metric, trim=trim)
    return LsqSSIOutput(loss_B, scale_B, shift_B, valid_BHW.sum(dim=(1, 2)).to(torch.int32))


def ssi_median(
    pred_BHW: torch.Tensor,
    target_BHW: torch.Tensor,
    valid_BHW: torch.Tensor,
    *,
    metric: str = "l1",
    trim: float = 0.0,
    eps: float = reference.MAD_EPS,
    impl: str = "auto",
) -> MedianSSIOutput:
    """Median/MAD scale-and-shift-invariant loss per image; spec: `reference.ssi_median_reference`.

    Args:
        pred_BHW: prediction (fp32/bf16/fp16).
        target_BHW: target in the same space (no gradient).
        valid_BHW: bool mask.
        metric: "l1" (Depth Anything) or "mse".
        trim: fraction of the largest per-pixel losses dropped per image (Depth Anything V2 uses 0.1 on
            pseudo-labels).
        eps: floor of the mean absolute deviation.
        impl: "auto" | "triton" | "torch".
    """
    check_maps("ssi_median", pred_BHW, target_BHW, valid_BHW)
    _check_options("ssi_median", metric, trim)
    if not 0 < eps < float("inf"):  # NaN too
        raise ValueError(f"ssi_median: eps={eps} must be > 0 and finite")
    if use_triton("ssi_median", impl, pred_BHW, target_BHW, valid_BHW):
        outputs = SSIMedianFunction.apply(pred_BHW, target_BHW.detach(), valid_BHW, metric, float(trim), float(eps))
        return MedianSSIOutput(*outputs)
    outputs = reference.ssi_median_reference(pred_BHW, target_BHW, valid_BHW, metric=metric, trim=trim, eps=eps)
    return MedianSSIOutput(*outputs, valid_BHW.sum(dim=(1, 2)).to(torch.int32))
