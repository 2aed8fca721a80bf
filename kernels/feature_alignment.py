"""Fused feature alignment loss (Depth Anything): 1 - cosine similarity per patch, with a tolerance.

Three layers, Liger style: Triton kernels, `FeatureAlignmentFunction`, and the dispatch function
`feature_alignment`. Spec: `reference.feature_alignment_reference`.

Forward: one pass over the B*N rows of D channels (dot product and both squared norms per row, fp32), then a
per-image kernel that averages 1 - cos over the patches with cos <= tolerance (or NaN). Backward: one pass,
d(1 - cos)/ds = -(t / (|s| |t|) - cos * s / |s|^2) times gL / num_included for included patches (the norm floors
`eps` cut the |s| term, as in the reference).

Shapes: B images, N patches, D channels, R = B*N rows. Non-contiguous inputs are copied.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import reference
from ._common import FLOAT_DTYPES, first_order, jit_helper, resolve, upstream_grad, use_triton

BLOCK_ROWS = 16  # x 128 channels per step, 8 warps: no register spills on sm_90 (32 rows spill; ptxas -v)


@jit_helper
def _load_tile(student_ptr, target_ptr, base, row_ok, d0, D, BLOCK_D: tl.constexpr):
    """Channels d0 .. d0 + BLOCK_D of the rows at `base`: their columns, mask, and student / target in fp32."""
    cols = d0 + tl.arange(0, BLOCK_D)
    m = row_ok[:, None] & (cols < D)[None, :]
    s = tl.load(student_ptr + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
    return cols, m, s, t


@jit_helper
def _floored_norm(sq, eps2):
    """|x| from |x|^2, floored at eps (eps2 = eps^2), as in the reference."""
    return tl.sqrt(tl.where(sq > eps2, sq, eps2))


@triton.jit
def _fa_rows_kernel(
    student_ptr, target_ptr, cos_ptr, ss_ptr, tt_ptr, R, D, eps2, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < R
    base = rows.to(tl.int64)[:, None] * D
    dot = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    ss = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    tt = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols, m, s, t = _load_tile(student_ptr, target_ptr, base, row_ok, d0, D, BLOCK_D)
        dot += tl.sum(s * t, axis=1)
        ss += tl.sum(s * s, axis=1)
        tt += tl.sum(t * t, axis=1)
    norm_s = _floored_norm(ss, eps2)
    norm_t = _floored_norm(tt, eps2)
    tl.store(cos_ptr + rows, dot / (norm_s * norm_t), mask=row_ok)
    tl.store(ss_ptr + rows, ss, mask=row_ok)
    tl.store(tt_ptr + rows, tt, mask=row_ok)


@triton.jit
def _fa_image_kernel(cos_ptr, loss_ptr, count_ptr, N, tolerance, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    total = 0.0
    count = 0.0
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        m = ns < N
        cos = tl.load(cos_ptr + b.to(tl.int64) * N + ns, mask=m, other=2.0)
        inc = m & ((cos <= tolerance) | (cos != cos))  # NaN included, as in the reference
        total += tl.sum(tl.where(inc, 1.0 - cos, 0.0), axis=0)
        count += tl.sum(inc.to(tl.float32), axis=0)
    tl.store(loss_ptr + b, total / tl.maximum(count, 1.0))
    tl.store(count_ptr + b, count.to(tl.int32))


@triton.jit
def _fa_backward_kernel(
    student_ptr,
    target_ptr,
    cos_ptr,
    ss_ptr,
    tt_ptr,
    count_ptr,
    grad_loss_ptr,
    grad_ptr,
    R,
    N,
    D,
    tolerance,
    eps2,
    GRAD_LOSS_STRIDE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < R
    img = rows // N
    cos = tl.load(cos_ptr + rows, mask=row_ok, other=2.0)
    ss = tl.load(ss_ptr + rows, mask=row_ok, other=1.0)
    tt = tl.load(tt_ptr + rows, mask=row_ok, other=1.0)
    count = tl.load(count_ptr + img, mask=row_ok, other=1).to(tl.float32)
    grad_loss = tl.load(grad_loss_ptr + img * GRAD_LOSS_STRIDE, mask=row_ok, other=0.0)  # stride 0: a sum's
    g = tl.where(row_ok & ((cos <= tolerance) | (cos != cos)), grad_loss / tl.maximum(count, 1.0), 0.0)
    norm_s = _floored_norm(ss, eps2)
    norm_t = _floored_norm(tt, eps2)
    coef_t = -g / (norm_s * norm_t)
    coef_s = tl.where(ss > eps2, g * cos / (norm_s * norm_s), 0.0)
    base = rows.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        cols, m, s, t = _load_tile(student_ptr, target_ptr, base, row_ok, d0, D, BLOCK_D)
        grad = coef_t[:, None] * t + coef_s[:, None] * s
        tl.store(grad_ptr + base + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=m)


def _block_d(dim: int) -> int:
    return min(128, triton.next_power_of_2(dim))


class FeatureAlignmentFunction(torch.autograd.Function):
    """Feature alignment, fused. Outputs (loss_B, num_included_B); gradient to the student only."""

    @staticmethod
    def forward(ctx, student_BND, target_BND, tolerance, eps):
        num_images, num_patches, dim = student_BND.shape
        s_RD = student_BND.contiguous().view(-1, dim)  # B*N x D
        t_RD = target_BND.contiguous().view(-1, dim)  # B*N x D
        num_rows = s_RD.shape[0]
        device = s_RD.device
        cos_R = torch.empty(num_rows, dtype=torch.float32, device=device)
        ss_R = torch.empty_like(cos_R)
        tt_R = torch.empty_like(cos_R)
        eps2 = float(eps) ** 2
        resolve(_fa_rows_kernel)[(triton.cdiv(num_rows, BLOCK_ROWS),)](
            s_RD,
            t_RD,
            cos_R,
            ss_R,
            tt_R,
            num_rows,
            dim,
            eps2,
            BLOCK_ROWS=BLOCK_ROWS,
            BLOCK_D=_block_d(dim),
            num_warps=8,
        )
        loss_B = torch.empty(num_images, dtype=torch.float32, device=device)
        count_B = torch.empty(num_images, dtype=torch.int32, device=device)
        block_n = min(1024, max(16, triton.next_power_of_2(num_patches)))
        resolve(_fa_image_kernel)[(num_images,)](cos_R, loss_B, count_B, num_patches, float(tolerance), BLOCK_N=block_n)
        ctx.save_for_backward(s_RD, t_RD, cos_R, ss_R, tt_R, count_B)
        ctx.shape, ctx.tolerance, ctx.eps2 = student_BND.shape, float(tolerance), eps2
        ctx.mark_non_differentiable(count_B)
        ctx.set_materialize_grads(False)
        return loss_B, count_B

    @staticmethod
    @first_order
    def backward(ctx, grad_loss_B, _grad_count):
        if grad_loss_B is None:
            return None, None, None, None
        s_RD, t_RD, cos_R, ss_R, tt_R, count_B = ctx.saved_tensors
        num_images, num_patches, dim = ctx.shape
        num_rows = s_RD.shape[0]
        grad_RD = torch.empty_like(s_RD)
        grad_loss_B, grad_loss_stride, _ = upstream_grad(grad_loss_B, cos_R)
        resolve(_fa_backward_kernel)[(triton.cdiv(num_rows, BLOCK_ROWS),)](
            s_RD, t_RD, cos_R, ss_R, tt_R, count_B, grad_loss_B, grad_RD,
            num_rows, num_patches, dim, ctx.tolerance, ctx.eps2,
            GRAD_LOSS_STRIDE=grad_loss_stride, BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=_block_d(dim), num_warps=8,
        )  # fmt: skip
        return grad_RD.view(ctx.shape), None, None, None


class FeatureAlignmentOutput(NamedTuple):
    """Per-image results of `feature_alignment`: fp32 loss and the int32 count of included patches."""

    loss_B: torch.Tensor
    num_included_B: torch.Tensor


def feature_alignment(
    student_BND: torch.Tensor,
    target_BND: torch.Tensor,
    *,
    tolerance: float = 0.85,
    eps: float = reference.NORM_EPS,
    impl: str = "auto",
) -> FeatureAlignmentOutput:
    """Feature alignment per image; spec: `reference.feature_alignment_reference`.

    Args:
        student_BND: the student's patch features (fp32/bf16/fp16), already projected to the target's width.
        target_BND: the frozen teacher's (e.g. DINOv2) patch features (no gradient).
        tolerance: patches with cosine similarity above this are ignored (Depth Anything: 0.85).
        eps: floor of each feature norm.
        impl: "auto" | "triton" | "torch".
    """
    if student_BND.dim() != 3 or target_BND.shape != student_BND.shape:
        raise ValueError(
            f"feature_alignment: expected two B x N x D tensors of the same shape, got "
            f"{tuple(student_BND.shape)} and {tuple(target_BND.shape)}"
        )
    if student_BND.dtype not in FLOAT_DTYPES or target_BND.dtype not in FLOAT_DTYPES:
        raise ValueError(f"feature_alignment: float inputs expected, got {student_BND.dtype}, {target_BND.dtype}")
    if student_BND.device != target_BND.device:
        raise ValueError("feature_alignment: tensors are on different devices")
    if student_BND.numel() == 0:
        raise ValueError(f"feature_alignment: empty input of shape {tuple(student_BND.shape)}")
    if tolerance != tolerance:  # NaN: the two impls would disagree on which patches it keeps
        raise ValueError("feature_alignment: tolerance is NaN")
    if not 0 < eps < float("inf"):
        raise ValueError(f"feature_alignment: eps must be positive and finite, got {eps}")
    if use_triton("feature_alignment", impl, student_BND, target_BND):
        return FeatureAlignmentOutput(*FeatureAlignmentFunction.apply(student_BND, target_BND.detach(), tolerance, eps))
    loss_B, count_B = reference.feature_alignment_reference(student_BND, target_BND, tolerance=tolerance, eps=eps)
    return FeatureAlignmentOutput(loss_B, count_B.to(torch.int32))
