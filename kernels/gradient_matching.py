"""Fused multi-scale gradient matching (MiDaS eq. 11; Depth Anything V2 uses it with weight 2).

Three layers, Liger style: Triton kernels (`_gm_forward_kernel`, `_gm_finalize_kernel`, `_gm_backward_kernel`),
`GradientMatchingFunction`, and the dispatch function `gradient_matching`. Spec:
`reference.gradient_matching_reference`.

All scales in one pass over 2D tiles: each program takes a TILE x TILE square of one image. Scale k works on the
tile's pixels whose y and x are multiples of 2**k, loaded directly as a compact (TILE >> k)-square block (strided
rows and columns, so no lane idles and no index is divided); each pixel's right / lower neighbour at distance
2**k is loaded at an offset (mostly cache hits). Scales coarser than the tile see only the tile's origin, on their
grid or not. Per tile it writes (sum of |differences|, number of valid subsampled pixels) per scale; a per-image
kernel combines them. The residual is r = a * pred - c * target with optional per-image scales a (differentiable)
and c (constant), so an SSI alignment can be applied on the fly without writing the aligned prediction; shifts
cancel in differences and are not inputs.

Backward, one pass: dL/dr_j = sum_k gL / M_k * [j on the grid of scale k] * sum over its four neighbours at
distance 2**k that are valid of sgn(r_j - r_neighbour); dL/dpred_j = a * dL/dr_j and dL/da = sum_j dL/dr_j * pred_j
(per-tile partial sums). The scales run coarsest first: each one's block of dL/dr is spread onto the next finer
block (every other row and column; zeros between) and added there, so the full-resolution tile is stored once.

Shapes: B images, H x W pixels (`_BM` = B x H*W flattened), C tiles per image, K scales. Non-contiguous inputs
are copied.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import reference
from ._common import (
    check_maps,
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

TILE = 32  # 32 x 32 pixels per program: rows of 128 bytes (fp32); scale 3 is still a 4 x 4 block
MAX_SCALES = 8


@jit_helper
def _factor(scale_ptr, b, HAS_SCALE: tl.constexpr):
    """The image's factor on pred or target (a or c in the module docstring), 1 when not given."""
    s = 1.0
    if HAS_SCALE:
        s = tl.load(scale_ptr + b)
    return s


@jit_helper
def _neighbour(pred_ptr, target_ptr, valid_ptr, base, offs, delta, mask, a, cd):
    """The pixels at offs + delta where `mask`: whether each is valid, and its residual a * pred - c * target."""
    # all three loads masked by `mask` only (no load waits on another); garbage at invalid pixels is dropped by
    # the callers' `where(v_n, ...)`
    v_n = (tl.load(valid_ptr + base + offs + delta, mask=mask, other=0) != 0) & mask
    p_n = tl.load(pred_ptr + base + offs + delta, mask=mask, other=0.0).to(tl.float32)
    d_n = tl.load(target_ptr + base + offs + delta, mask=mask, other=0.0).to(tl.float32)
    return v_n, a * p_n - cd * d_n


@jit_helper
def _scale_block(b, t, H, W, TILES_W, K: tl.constexpr, TILE: tl.constexpr):
    """Scale 2**K's pixels in tile t of image b: a SIDE x SIDE block (SIDE = TILE >> K, at least 1) of rows ys and
    columns xs 2**K apart, their offsets in the image, whether each is in the image and on the scale's grid, and
    the image's start in the B x HW maps."""
    STEP: tl.constexpr = 1 << K
    SIDE: tl.constexpr = TILE >> K if (TILE >> K) > 0 else 1
    y0 = (t // TILES_W) * TILE
    x0 = (t % TILES_W) * TILE
    ys = y0 + tl.arange(0, SIDE) * STEP
    xs = x0 + tl.arange(0, SIDE) * STEP
    on_grid = ((y0 % STEP) == 0) & ((x0 % STEP) == 0)  # always, unless the scale is coarser than the tile
    inb = (ys[:, None] < H) & (xs[None, :] < W) & on_grid
    offs = ys[:, None] * W + xs[None, :]
    base = b.to(tl.int64) * H * W
    return ys, xs, offs, inb, base


@jit_helper
def _onto_finer(g, K: tl.constexpr, TILE: tl.constexpr):
    """Scale 2**(K+1)'s block of values as scale 2**K's: on its even rows and columns, zeros elsewhere. When both
    scales are coarser than the tile, both blocks are the tile's origin alone: the same pixel, unchanged."""
    SIDE: tl.constexpr = TILE >> (K + 1) if (TILE >> (K + 1)) > 0 else 1
    if (TILE >> K) >= 2:
        cols = tl.reshape(tl.join(g, tl.zeros_like(g)), (SIDE, 2 * SIDE))  # g00 0 g01 0 ... per row
        rows = tl.permute(tl.join(cols, tl.zeros_like(cols)), (0, 2, 1))  # SIDE x 2 x 2 SIDE: a row, then zeros
        g = tl.reshape(rows, (2 * SIDE, 2 * SIDE))
    return g


@triton.jit
def _gm_forward_kernel(
    pred_ptr,
    target_ptr,
    valid_ptr,
    pred_scale_ptr,
    target_scale_ptr,
    part_ptr,
    H,
    W,
    C,
    TILES_W,
    HAS_PRED_SCALE: tl.constexpr,
    HAS_TARGET_SCALE: tl.constexpr,
    NUM_SCALES: tl.constexpr,
    TILE: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.program_id(1)
    a = _factor(pred_scale_ptr, b, HAS_PRED_SCALE)
    cd = _factor(target_scale_ptr, b, HAS_TARGET_SCALE)
    out = part_ptr + (b * C + t) * (2 * NUM_SCALES)
    for k in tl.static_range(NUM_SCALES):
        STEP = 1 << k
        ys, xs, offs, inb, base = _scale_block(b, t, H, W, TILES_W, k, TILE)
        v, p, d = load_maps(pred_ptr, target_ptr, valid_ptr, base, offs, inb)
        r = a * p - cd * d
        # right neighbour (y, x + step), lower neighbour (y + step, x)
        v_r, r_r = _neighbour(pred_ptr, target_ptr, valid_ptr, base, offs, STEP, inb & (xs[None, :] + STEP < W), a, cd)
        v_r = v_r & v
        v_d, r_d = _neighbour(
            pred_ptr, target_ptr, valid_ptr, base, offs, STEP * W, inb & (ys[:, None] + STEP < H), a, cd
        )
        v_d = v_d & v
        diff = tl.where(v_r, tl.abs(r_r - r), 0.0) + tl.where(v_d, tl.abs(r_d - r), 0.0)
        tl.store(out + 2 * k, tl.sum(tl.sum(diff, axis=1), axis=0))
        tl.store(out + 2 * k + 1, tl.sum(tl.sum(v.to(tl.float32), axis=1), axis=0))


@triton.jit
def _gm_finalize_kernel(
    part_ptr, loss_ptr, inv_count_ptr, num_valid_ptr, C, NUM_SCALES: tl.constexpr, BLOCK_C: tl.constexpr
):
    b = tl.program_id(0)
    cs = tl.arange(0, BLOCK_C)
    m = cs < C
    src = part_ptr + (b * C + cs) * (2 * NUM_SCALES)
    loss = 0.0
    for k in tl.static_range(NUM_SCALES):
        total = tl.sum(tl.load(src + 2 * k, mask=m, other=0.0), axis=0)
        count = tl.sum(tl.load(src + 2 * k + 1, mask=m, other=0.0), axis=0)
        inv = tl.where(count > 0, 1.0 / tl.maximum(count, 1.0), 0.0)
        loss += total * inv
        tl.store(inv_count_ptr + b * NUM_SCALES + k, inv)
        if k == 0:
            tl.store(num_valid_ptr + b, count.to(tl.int32))
    tl.store(loss_ptr + b, loss)


@triton.jit
def _gm_backward_kernel(
    pred_ptr,
    target_ptr,
    valid_ptr,
    pred_scale_ptr,
    target_scale_ptr,
    inv_count_ptr,
    grad_loss_ptr,
    grad_pred_ptr,
    grad_scale_part_ptr,
    H,
    W,
    C,
    TILES_W,
    HAS_PRED_SCALE: tl.constexpr,
    HAS_TARGET_SCALE: tl.constexpr,
    NUM_SCALES: tl.constexpr,
    TILE: tl.constexpr,
    GRAD_LOSS_STRIDE: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.program_id(1)
    a = _factor(pred_scale_ptr, b, HAS_PRED_SCALE)
    cd = _factor(target_scale_ptr, b, HAS_TARGET_SCALE)
    grad_loss = tl.load(grad_loss_ptr + b * GRAD_LOSS_STRIDE)  # stride 0: a .sum()'s gradient, not materialized
    grad_a = 0.0
    SIDE_C: tl.constexpr = TILE >> (NUM_SCALES - 1) if (TILE >> (NUM_SCALES - 1)) > 0 else 1
    grad_r = tl.zeros([SIDE_C, SIDE_C], dtype=tl.float32)  # dL/dr of the scales done so far, on this block
    for k in tl.static_range(NUM_SCALES - 1, -1, -1):  # coarsest first
        STEP = 1 << k
        if k < NUM_SCALES - 1:
            grad_r = _onto_finer(grad_r, k, TILE)
        ys, xs, offs, inb, base = _scale_block(b, t, H, W, TILES_W, k, TILE)
        v, p, d = load_maps(pred_ptr, target_ptr, valid_ptr, base, offs, inb)
        r = a * p - cd * d
        acc = tl.zeros_like(r)
        for nb in tl.static_range(4):
            # neighbours: 0 right, 1 left, 2 below, 3 above
            if nb == 0:
                m_n = inb & (xs[None, :] + STEP < W)
                delta = STEP
            elif nb == 1:
                m_n = inb & (xs[None, :] >= STEP)
                delta = -STEP
            elif nb == 2:
                m_n = inb & (ys[:, None] + STEP < H)
                delta = STEP * W
            else:
                m_n = inb & (ys[:, None] >= STEP)
                delta = -STEP * W
            v_n, r_n = _neighbour(pred_ptr, target_ptr, valid_ptr, base, offs, delta, m_n, a, cd)
            acc += tl.where(v_n & v, sign(r - r_n), 0.0)
        grad_k = grad_loss * tl.load(inv_count_ptr + b * NUM_SCALES + k) * acc
        grad_r += grad_k
        if HAS_PRED_SCALE:  # dL/da = sum_j dL/dr_j * pred_j, taken scale by scale on its own pixels
            grad_a += tl.sum(tl.sum(grad_k * p, axis=1), axis=0)
    # The last scale was scale 0: grad_r, offs and inb are the full-resolution tile's
    tl.store(grad_pred_ptr + base + offs, (a * grad_r).to(grad_pred_ptr.dtype.element_ty), mask=inb)
    if HAS_PRED_SCALE:
        tl.store(grad_scale_part_ptr + b * C + t, grad_a)


class GradientMatchingFunction(torch.autograd.Function):
    """Multi-scale gradient matching, fused. Outputs (loss_B, num_valid_B); gradients to pred and pred_scale_B."""

    @staticmethod
    def forward(ctx, pred_BHW, target_BHW, valid_BHW, pred_scale_B, target_scale_B, num_scales):
        num_images, height, width = pred_BHW.shape
        p_BM, d_BM, v_BM = flat_contiguous(pred_BHW), flat_contiguous(target_BHW), valid_bytes(valid_BHW)
        tiles_w = triton.cdiv(width, TILE)
        num_chunks = triton.cdiv(height, TILE) * tiles_w
        device = p_BM.device
        has_a, has_c = pred_scale_B is not None, target_scale_B is not None
        a_B = pred_scale_B.detach().float().contiguous() if has_a else p_BM
        c_B = target_scale_B.detach().float().contiguous() if has_c else p_BM
        part = torch.empty((num_images, num_chunks, 2 * num_scales), dtype=torch.float32, device=device)
        resolve(_gm_forward_kernel)[(num_images, num_chunks)](
            p_BM, d_BM, v_BM, a_B, c_B, part, height, width, num_chunks, tiles_w,
            HAS_PRED_SCALE=has_a, HAS_TARGET_SCALE=has_c, NUM_SCALES=num_scales, TILE=TILE, num_warps=4,
        )  # fmt: skip
        loss_B = torch.empty(num_images, dtype=torch.float32, device=device)
        inv_count_BK = torch.empty((num_images, num_scales), dtype=torch.float32, device=device)
        num_valid_B = torch.empty(num_images, dtype=torch.int32, device=device)
        resolve(_gm_finalize_kernel)[(num_images,)](
            part, loss_B, inv_count_BK, num_valid_B, num_chunks,
            NUM_SCALES=num_scales, BLOCK_C=max(16, triton.next_power_of_2(num_chunks)),
        )  # fmt: skip
        ctx.save_for_backward(p_BM, d_BM, v_BM, a_B if has_a else None, c_B if has_c else None, inv_count_BK)
        ctx.shape, ctx.num_scales = pred_BHW.shape, num_scales
        ctx.mark_non_differentiable(num_valid_B)
        ctx.set_materialize_grads(False)
        return loss_B, num_valid_B

    @staticmethod
    @first_order
    def backward(ctx, grad_loss_B, _grad_num_valid):
        p_BM, d_BM, v_BM, a_B, c_B, inv_count_BK = ctx.saved_tensors
        if grad_loss_B is None:
            return None, None, None, None, None, None
        num_images, height, width = ctx.shape
        tiles_w = triton.cdiv(width, TILE)
        num_chunks = triton.cdiv(height, TILE) * tiles_w
        has_a, has_c = a_B is not None, c_B is not None
        grad_pred_BM = torch.empty_like(p_BM)
        grad_part = torch.empty((num_images, num_chunks), dtype=torch.float32, device=p_BM.device) if has_a else None
        grad_loss_B, loss_stride, _ = upstream_grad(grad_loss_B, inv_count_BK)
        resolve(_gm_backward_kernel)[(num_images, num_chunks)](
            p_BM, d_BM, v_BM, a_B if has_a else p_BM, c_B if has_c else p_BM, inv_count_BK,
            grad_loss_B, grad_pred_BM, grad_part if has_a else p_BM, height, width, num_chunks,
            tiles_w, HAS_PRED_SCALE=has_a, HAS_TARGET_SCALE=has_c, NUM_SCALES=ctx.num_scales, TILE=TILE,
            GRAD_LOSS_STRIDE=loss_stride, num_warps=4,
        )  # fmt: skip
        grad_scale_B = grad_part.sum(dim=1) if has_a and ctx.needs_input_grad[3] else None
        return grad_pred_BM.view(ctx.shape), None, None, grad_scale_B, None, None


class GradientMatchingOutput(NamedTuple):
    """Per-image results of `gradient_matching`: fp32 loss and the int32 count of valid full-res pixels."""

    loss_B: torch.Tensor
    num_valid_B: torch.Tensor


def _detached(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach()


def gradient_matching(
    pred_BHW: torch.Tensor,
    target_BHW: torch.Tensor,
    valid_BHW: torch.Tensor,
    *,
    num_scales: int = 4,
    pred_scale_B: torch.Tensor | None = None,
    target_scale_B: torch.Tensor | None = None,
    impl: str = "auto",
) -> GradientMatchingOutput:
    """Multi-scale gradient matching per image; spec: `reference.gradient_matching_reference`.

    Args:
        pred_BHW: prediction (fp32/bf16/fp16); aligned already, or aligned on the fly with `pred_scale_B`.
        target_BHW: target (no gradient).
        valid_BHW: bool mask.
        num_scales: number of scales (strides 1, 2, 4, ...), 1 to 8.
        pred_scale_B: optional per-image factor on pred (differentiable), e.g. the SSI scale.
        target_scale_B: optional per-image factor on target (no gradient), e.g. 1 / MAD(target).
        impl: "auto" | "triton" | "torch".
    """
    check_maps("gradient_matching", pred_BHW, target_BHW, valid_BHW)
    if isinstance(num_scales, bool) or not isinstance(num_scales, int) or not 1 <= num_scales <= MAX_SCALES:
        raise ValueError(f"gradient_matching: num_scales={num_scales!r} must be an integer in [1, {MAX_SCALES}]")
    for name, s in (("pred_scale_B", pred_scale_B), ("target_scale_B", target_scale_B)):
        if s is not None and s.shape != (pred_BHW.shape[0],):
            raise ValueError(f"gradient_matching: {name} must have shape ({pred_BHW.shape[0]},), got {tuple(s.shape)}")
    if use_triton("gradient_matching", impl, pred_BHW, target_BHW, valid_BHW):
        loss_B, num_valid_B = GradientMatchingFunction.apply(
            pred_BHW, target_BHW.detach(), valid_BHW, pred_scale_B, _detached(target_scale_B), num_scales
        )
        return GradientMatchingOutput(loss_B, num_valid_B)
    loss_B = reference.gradient_matching_reference(
        pred_BHW, target_BHW, valid_BHW, num_scales=num_scales, pred_scale_B=pred_scale_B, target_scale_B=target_scale_B
    )
    return GradientMatchingOutput(loss_B, valid_BHW.sum(dim=(1, 2)).to(torch.int32))
