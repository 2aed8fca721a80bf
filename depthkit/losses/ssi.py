"""Scale-and-shift-invariant (affine-invariant) losses on disparity maps.

Relative depth models (MiDaS, Depth Anything) predict disparity (inverse depth) up to an unknown scale and
shift, and are trained in that space: `pred_BHW` and `target_BHW` here are both disparity-like maps
(`depthkit.spaces.AFFINE_DISPARITY` / `DISPARITY`), never metric depth. The per-image alignment removes the
unknown scale and shift before comparing.

Results are dicts (see `depthkit.losses`): "loss", "loss_per_image", "num_valid" and alignment terms. The math
is specified by `depthkit_kernels.reference`; `impl` picks the fused Triton kernels or that reference.
"""

from __future__ import annotations

import torch

import depthkit_kernels

from .reduction import with_reduction


def ssi_lsq_loss(
    pred_BHW: torch.Tensor,
    target_BHW: torch.Tensor,
    valid_BHW: torch.Tensor,
    *,
    metric: str = "mse",
    trim: float = 0.0,
    impl: str = "auto",
) -> dict[str, torch.Tensor]:
    """SSI loss with least-squares alignment (MiDaS): per image, the scale s and shift t minimizing
    sum_valid (s * pred + t - target)^2, then the mean of r^2 ("mse") or |r| ("l1") of r = s * pred + t - target.

    Note: "mse" is the plain mean of r^2; MiDaS's code divides by 2n instead of n (a constant factor).

    Args:
        pred_BHW: predicted disparity (fp32/bf16).
        target_BHW: target disparity (no gradient).
        valid_BHW: bool mask of pixels with a target.
        metric: "mse" or "l1".
        trim: fraction of the largest per-pixel losses dropped per image (0 keeps all; see `ssi_trimmed_loss`).
        impl: "auto" | "triton" | "torch".

    Returns:
        "loss", "loss_per_image", "num_valid", and per-image "scale", "shift" (differentiable, so an extra term
        on the aligned prediction, like gradient matching, back-propagates through the alignment).
    """
    out = depthkit_kernels.ssi_lsq(pred_BHW, target_BHW, valid_BHW, metric=metric, trim=trim, impl=impl)
    return with_reduction(out.loss_B, out.num_valid_B, scale=out.scale_B, shift=out.shift_B)


def ssi_median_loss(
    pred_BHW: torch.Tensor,
    target_BHW: torch.Tensor,
    valid_BHW: torch.Tensor,
    *,
    metric: str = "l1",
    trim: float = 0.0,
    eps: float = depthkit_kernels.reference.MAD_EPS,
    impl: str = "auto",
) -> dict[str, torch.Tensor]:
    """SSI loss with median/MAD normalization (Depth Anything V1): per image, x_hat = (x - median) / MAD over the
    valid pixels of each map, then the mean of |pred_hat - target_hat| ("l1") or its square ("mse").

    The median is the *lower* median (rank (n - 1) // 2, as `torch.median`), computed exactly; MAD is the mean
    absolute deviation from it, floored at `eps`.

    Args:
        pred_BHW: predicted disparity (fp32/bf16).
        target_BHW: target disparity (no gradient).
        valid_BHW: bool mask of pixels with a target.
        metric: "l1" (the paper's) or "mse".
        trim: fraction of the largest per-pixel losses dropped per image (0 keeps all; see `ssi_trimmed_loss`).
        eps: MAD floor.
        impl: "auto" | "triton" | "torch".

    Returns:
        "loss", "loss_per_image", "num_valid", and per image "pred_scale" = 1 / MAD(pred) (differentiable),
        "target_scale" = 1 / MAD(target), "pred_median", "target_median" (detached).
    """
    out = depthkit_kernels.ssi_median(pred_BHW, target_BHW, valid_BHW, metric=metric, trim=trim, eps=eps, impl=impl)
    return with_reduction(
        out.loss_B,
        out.num_valid_B,
        pred_scale=out.pred_scale_B,
        target_scale=out.target_scale_B,
        pred_median=out.pred_median_B,
        target_median=out.target_median_B,
    )


def ssi_trimmed_loss(
    pred_BHW: torch.Tensor,
    target_BHW: torch.Tensor,
    valid_BHW: torch.Tensor,
    *,
    trim: float = 0.1,
    alignment: str = "median",
    metric: str = "l1",
    impl: str = "auto",
) -> dict[str, torch.Tensor]:
    """Trimmed SSI loss (Depth Anything V2 on pseudo-labels): the SSI loss of `alignment` where each image keeps
    only its n - floor(trim * n) smallest per-pixel losses and averages over that count.

    The alignment (scale/shift or median/MAD) still uses all valid pixels; only the loss is trimmed. Ties at the
    threshold are kept fractionally so the value does not depend on their order. Same as calling
    `ssi_median_loss` / `ssi_lsq_loss` with `trim=`.
    """
    if alignment == "median":
        return ssi_median_loss(pred_BHW, target_BHW, valid_BHW, metric=metric, trim=trim, impl=impl)
    if alignment == "lsq":
        return ssi_lsq_loss(pred_BHW, target_BHW, valid_BHW, metric=metric, trim=trim, impl=impl)
    raise ValueError(f"ssi_trimmed_loss: alignment={alignment!r} is not 'median' or 'lsq'")
