"""Plain-torch references: the spec of every op in `depthkit_kernels`.

The Triton kernels are tested against these functions (outputs and gradients). They are written to be read:
batched masked sums, no Python loops over images, fp32 math (bf16/fp16 inputs are upcast).

Shape legend: B images, H x W pixels, HW = H*W, N patches, D feature channels.

Conventions shared by all ops:
- `valid_BHW` is a bool mask. `n` is the number of valid pixels of an image. Values at invalid pixels are never
  read into a result (they may be inf/NaN, e.g. disparity where depth is 0).
- Targets are labels: they never receive a gradient (the references detach them, the kernels return None).
- Per-image outputs are exactly 0 for images without valid pixels (never NaN), so a masked mean stays finite.
- Medians are *lower* medians: the element of rank (n - 1) // 2 among the n valid values (0-based, ascending),
  the same value `torch.median` returns. The gradient of a median goes to the valid elements equal to it, split
  evenly among ties (a symmetric subgradient; with distinct values it is the usual one-hot).
- Trimming (`trim` > 0) keeps the n - floor(trim * n) smallest per-pixel losses of each image (at least one) and
  averages over that count. Losses tied at the threshold are kept fractionally (each with weight
  (num_keep - num_below) / num_tied), which makes the value independent of tie order; trim weights carry no
  gradient.
"""

from __future__ import annotations

import struct

import torch

LSQ_REL_EPS = 1e-10
"""An image's least-squares system is singular when var(pred) <= LSQ_REL_EPS * mean(pred**2) (or n < 2): a
prediction whose spread is under 1e-5 of its magnitude (about 100 fp32 ulps, where rounding in the sums is a few)
is taken for constant. Once 1e-6, which broke shift invariance: a prediction of spread 1 around 1100 was
"constant", scored as such, and got no gradient."""
MAD_EPS = 1e-6
"""Floor of the mean absolute deviation used to normalize in the median/MAD SSI loss."""
NORM_EPS = 1e-8
"""Floor of each feature norm in the cosine similarity."""


def _sum_hw(x_BHW: torch.Tensor) -> torch.Tensor:
    return x_BHW.sum(dim=(1, 2))  # B


def _clean(x_BHW: torch.Tensor, valid_BHW: torch.Tensor) -> torch.Tensor:
    """fp32 copy with invalid pixels set to 0, so that garbage there (inf/NaN disparity) never reaches a sum."""
    return torch.where(valid_BHW, x_BHW.float(), 0.0)


def masked_lower_median(x_BHW: torch.Tensor, valid_BHW: torch.Tensor) -> torch.Tensor:
    """Lower median of the valid values of each image (0 where none); gradient split evenly among ties.

    Args:
        x_BHW: values.
        valid_BHW: bool mask.

    Returns:
        B medians, fp32.
    """
    x_BHW = x_BHW.float()
    num_valid_B = _sum_hw(valid_BHW)
    rank_B = (num_valid_B - 1).clamp_min(0) // 2
    sorted_BM = torch.where(valid_BHW, x_BHW.detach(), float("inf")).flatten(1).sort(dim=1).values  # B x HW
    median_B = sorted_BM.gather(1, rank_B[:, None]).squeeze(1)
    median_B = torch.where(num_valid_B > 0, median_B, torch.zeros_like(median_B))
    # Exact value, gradient spread over the tied valid elements: (x - median) is exactly 0 where they are equal.
    tied_BHW = valid_BHW & (x_BHW.detach() == median_B[:, None, None])
    num_tied_B = _sum_hw(tied_BHW).clamp_min(1)
    # `where`, not a product with the mask: inf or NaN at an untied pixel must not reach the sum (inf * 0 is NaN).
    return median_B + _sum_hw(torch.where(tied_BHW, x_BHW - median_B[:, None, None], 0.0)) / num_tied_B


def masked_kth_smallest(x_BHW: torch.Tensor, valid_BHW: torch.Tensor, rank_B: torch.Tensor) -> torch.Tensor:
    """The value of 0-based rank `rank_B` among the valid values of each image (0 where rank < 0). No gradient."""
    sorted_BM = torch.where(valid_BHW, x_BHW.detach().float(), float("inf")).flatten(1).sort(dim=1).values
    kth_B = sorted_BM.gather(1, rank_B.clamp_min(0).long()[:, None]).squeeze(1)
    return torch.where(rank_B >= 0, kth_B, torch.zeros_like(kth_B))


def num_kept(num_valid_B: torch.Tensor, trim: float) -> torch.Tensor:
    """How many per-pixel losses an image keeps: n - floor(trim * n), computed in fp32 like the kernels, and at
    least one (fp32 may round trim * n up to n)."""
    num_valid_B = num_valid_B.to(torch.int32)
    num_drop_B = torch.floor(num_valid_B.to(torch.float32) * trim).to(torch.int32)
    return torch.maximum(num_valid_B - num_drop_B, num_valid_B.clamp(max=1))


def trim_in_range(trim: float) -> bool:
    """0 <= trim < 1, in fp32 too (the kernels' precision): 1 - 1e-9 is 1.0 there and would trim every pixel."""
    return 0.0 <= trim < 1.0 and struct.unpack("f", struct.pack("f", trim))[0] < 1.0  # no tensor on every call


def trim_weights(loss_BHW: torch.Tensor, valid_BHW: torch.Tensor, trim: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel weights that keep the smallest n - floor(trim * n) losses of each image (detached).

    Returns:
        (weight_BHW, num_keep_B): weights in [0, 1] (fractional only for ties at the threshold) and the kept count.
    """
    loss_BHW = loss_BHW.detach()
    num_keep_B = num_kept(_sum_hw(valid_BHW), trim)
    threshold_B = masked_kth_smallest(loss_BHW, valid_BHW, num_keep_B - 1)[:, None, None]
    below_BHW = valid_BHW & (loss_BHW < threshold_B)
    tied_BHW = valid_BHW & (loss_BHW == threshold_B)
    num_below_B, num_tied_B = _sum_hw(below_BHW), _sum_hw(tied_BHW)
    frac_B = (num_keep_B - num_below_B).float() / num_tied_B.clamp_min(1).float()
    weight_BHW = below_BHW.float() + tied_BHW.float() * frac_B[:, None, None]
    return weight_BHW, num_keep_B


def _pixel_loss(residual_BHW: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "mse":
        return residual_BHW * residual_BHW
    if metric == "l1":
        return residual_BHW.abs()
    raise ValueError(f"metric={metric!r} is not 'mse' or 'l1'")


def _reduce_pixels(loss_BHW: torch.Tensor, valid_BHW: torch.Tensor, trim: float) -> torch.Tensor:
    """Mean of the (kept) per-pixel losses of each image; 0 for images without valid pixels."""
    if trim > 0:
        weight_BHW, num_keep_B = trim_weights(loss_BHW, valid_BHW, trim)
        # A NaN compares false with the threshold, so trimming would drop it: keep it, as the kernels do, so that
        # a NaN label or prediction shows in the loss instead of passing as a perfect image.
        weight_BHW = torch.where(valid_BHW & loss_BHW.detach().isnan(), 1.0, weight_BHW)
    else:
        weight_BHW, num_keep_B = valid_BHW.float(), _sum_hw(valid_BHW)
    # torch.where, not a product: a masked-out pixel's loss may be inf/NaN from garbage in invalid regions.
    weighted_BHW = torch.where(weight_BHW > 0, loss_BHW * weight_BHW, torch.zeros_like(loss_BHW))
    return _sum_hw(weighted_BHW) / num_keep_B.clamp_min(1).float()


def ssi_lsq_reference(
    pred_BHW: torch.Tensor,
    target_BHW: torch.Tensor,
    valid_BHW: torch.Tensor,
    *,
    metric: str = "mse",
    trim: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale-and-shift-invariant loss with least-squares alignment (MiDaS), per image.

    Solves min_{s,t} sum_valid (s * pred + t - target)^2 per image with centered fp64 sums (two passes: means,
    then centered moments), so s = cov(pred, target) / var(pred) and t = mean(target) - s * mean(pred). When the
    system is singular (n < 2, or var(pred) <= LSQ_REL_EPS * mean(pred^2), e.g. a constant prediction) the
    alignment falls back to s = 0, t = mean(target), which carries no gradient. The loss of an image is the mean
    over its valid (kept) pixels of r^2 ("mse") or |r| ("l1"), r = s * pred + t - target. Gradients flow through
    s and t, like the MiDaS reference code.

    Returns:
        (loss_B, scale_B, shift_B), all fp32 and differentiable w.r.t. pred.
    """
    p_BHW, d_BHW = _clean(pred_BHW, valid_BHW), _clean(target_BHW.detach(), valid_BHW)
    # The solve runs in fp64: its backward divides by var(pred)^2, which underflows fp32 once |pred| < ~1e-14 (the
    # kernels' hand-written backward does not form it).
    p64_BHW, d64_BHW, m_BHW = p_BHW.double(), d_BHW.double(), valid_BHW.double()
    n_B = m_BHW.sum(dim=(1, 2))
    n_safe_B = n_B.clamp_min(1)
    mean_p_B = _sum_hw(p64_BHW * m_BHW) / n_safe_B
    mean_d_B = _sum_hw(d64_BHW * m_BHW) / n_safe_B
    pc_BHW = (p64_BHW - mean_p_B[:, None, None]) * m_BHW
    dc_BHW = (d64_BHW - mean_d_B[:, None, None]) * m_BHW
    var_p_B = _sum_hw(pc_BHW * pc_BHW)  # n * var(pred)
    cov_B = _sum_hw(pc_BHW * dc_BHW)  # n * cov(pred, target)
    singular_B = (n_B < 2) | (var_p_B <= LSQ_REL_EPS * (var_p_B + n_B * mean_p_B * mean_p_B))
    scale_B = torch.where(singular_B, torch.zeros_like(cov_B), cov_B / torch.where(singular_B, 1.0, var_p_B))
    shift_B = (mean_d_B - scale_B * mean_p_B).float()
    scale_B = scale_B.float()
    residual_BHW = scale_B[:, None, None] * p_BHW + shift_B[:, None, None] - d_BHW
    loss_B = _reduce_pixels(_pixel_loss(residual_BHW, metric), valid_BHW, trim)
    return loss_B, scale_B, shift_B


def ssi_median_reference(
    pred_BHW: torch.Tensor,
    target_BHW: torch.Tensor,
    valid_BHW: torch.Tensor,
    *,
    metric: str = "l1",
    trim: float = 0.0,
    eps: float = MAD_EPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale-and-shift-invariant loss with median / mean-absolute-deviation normalization (Depth Anything V1).

    Each map is normalized per image over its valid pixels: x_hat = (x - median(x)) / S(x) with the lower median
    and S(x) = mean |x - median(x)|, floored at `eps` (the floor carries no gradient). The loss of an image is the
    mean over valid (kept) pixels of |pred_hat - target_hat| ("l1", the paper's) or its square ("mse").
    Gradients flow through the prediction's median and MAD.

    Returns:
        (loss_B, pred_scale_B, target_scale_B, pred_median_B, target_median_B): `pred_scale_B` = 1 / S(pred) is
        differentiable; the target's scale 1 / S(target) and both medians are detached. The normalized residual
        is pred_scale * (pred - pred_median) - target_scale * (target - target_median).
    """
    p_BHW, d_BHW = _clean(pred_BHW, valid_BHW), _clean(target_BHW.detach(), valid_BHW)
    m_BHW = valid_BHW.float()
    n_safe_B = m_BHW.sum(dim=(1, 2)).clamp_min(1)
    med_p_B = masked_lower_median(p_BHW, valid_BHW)
    med_d_B = masked_lower_median(d_BHW, valid_BHW)
    mad_p_B = _sum_hw((p_BHW - med_p_B[:, None, None]).abs() * m_BHW) / n_safe_B
    mad_d_B = _sum_hw((d_BHW - med_d_B[:, None, None]).abs() * m_BHW) / n_safe_B
    mad_p_B = torch.where(mad_p_B > eps, mad_p_B, torch.full_like(mad_p_B, eps))
    mad_d_B = torch.where(mad_d_B > eps, mad_d_B, torch.full_like(mad_d_B, eps))
    p_hat_BHW = (p_BHW - med_p_B[:, None, None]) / mad_p_B[:, None, None]
    d_hat_BHW = (d_BHW - med_d_B[:, None, None]) / mad_d_B[:, None, None]
    loss_B = _reduce_pixels(_pixel_loss(p_hat_BHW - d_hat_BHW, metric), valid_BHW, trim)
    return loss_B, 1.0 / mad_p_B, (1.0 / mad_d_B).detach(), med_p_B.detach(), med_d_B.detach()


def gradient_matching_reference(
    pred_BHW: torch.Tensor,
    target_BHW: torch.Tensor,
    valid_BHW: torch.Tensor,
    *,
    num_scales: int = 4,
    pred_scale_B: torch.Tensor | None = None,
    target_scale_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-scale gradient matching (MiDaS eq. 11), per image.

    On the residual r = pred_scale * pred - target_scale * target (scales default to 1; per-image shifts cancel in
    the differences, so they are not inputs), for each scale k < num_scales the maps are subsampled with stride
    2**k (`x[:, ::2**k, ::2**k]`) and the image's term is sum |r_right - r| + sum |r_below - r| over neighbour
    pairs that are both valid, divided by the number of valid subsampled pixels. The per-image loss is the sum
    over scales (a scale without valid pixels adds 0).

    Returns:
        loss_B (fp32), differentiable w.r.t. pred and pred_scale_B.
    """
    r_BHW = _clean(pred_BHW, valid_BHW)
    if pred_scale_B is not None:
        r_BHW = pred_scale_B.float()[:, None, None] * r_BHW
    d_BHW = _clean(target_BHW.detach(), valid_BHW)
    if target_scale_B is not None:
        d_BHW = target_scale_B.detach().float()[:, None, None] * d_BHW
    r_BHW = r_BHW - d_BHW
    loss_B = torch.zeros(pred_BHW.shape[0], device=pred_BHW.device)
    for k in range(num_scales):
        step = 2**k
        r_bhw = r_BHW[:, ::step, ::step]  # B x ceil(H/step) x ceil(W/step)
        m_bhw = valid_BHW[:, ::step, ::step]
        pair_x_bhw = m_bhw[:, :, 1:] & m_bhw[:, :, :-1]
        pair_y_bhw = m_bhw[:, 1:, :] & m_bhw[:, :-1, :]
        grad_x_bhw = torch.where(pair_x_bhw, (r_bhw[:, :, 1:] - r_bhw[:, :, :-1]).abs(), 0.0)
        grad_y_bhw = torch.where(pair_y_bhw, (r_bhw[:, 1:, :] - r_bhw[:, :-1, :]).abs(), 0.0)
        count_B = _sum_hw(m_bhw)
        total_B = _sum_hw(grad_x_bhw) + _sum_hw(grad_y_bhw)
        loss_B = loss_B + torch.where(count_B > 0, total_B / count_B.clamp_min(1), 0.0)
    return loss_B


def feature_alignment_reference(
    student_BND: torch.Tensor,
    target_BND: torch.Tensor,
    *,
    tolerance: float = 0.85,
    eps: float = NORM_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature alignment (Depth Anything): 1 - cosine similarity per patch, ignoring well-aligned patches.

    cos = <s, t> / (max(|s|, eps) * max(|t|, eps)) per patch (floors carry no gradient). Patches with
    cos > tolerance are ignored; the loss of an image is the mean of 1 - cos over the remaining patches (0 if none).
    A NaN cosine (a diverged student) is not "above the tolerance": it enters the mean, so the loss shows it.

    Returns:
        (loss_B, num_included_B): fp32 loss differentiable w.r.t. the student, and the int64 count of patches
        that entered the mean.
    """
    s_BND = student_BND.float()
    t_BND = target_BND.detach().float()
    dot_BN = (s_BND * t_BND).sum(-1)
    ss_BN = (s_BND * s_BND).sum(-1)
    tt_BN = (t_BND * t_BND).sum(-1)
    eps2 = eps * eps
    norm_s_BN = torch.where(ss_BN > eps2, ss_BN, torch.full_like(ss_BN, eps2)).sqrt()
    norm_t_BN = torch.where(tt_BN > eps2, tt_BN, torch.full_like(tt_BN, eps2)).sqrt()
    cos_BN = dot_BN / (norm_s_BN * norm_t_BN)
    included_BN = ~(cos_BN.detach() > tolerance)  # NaN included
    num_included_B = included_BN.sum(-1)
    loss_B = torch.where(included_BN, 1.0 - cos_BN, 0.0).sum(-1) / num_included_B.clamp_min(1)
    return loss_B, num_included_B
