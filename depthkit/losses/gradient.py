"""Multi-scale gradient matching loss (MiDaS eq. 11; Depth Anything V2 weights it 2)."""

from __future__ import annotations

import torch

import depthkit_kernels

from .reduction import with_reduction


def gradient_matching_loss(
    pred_BHW: torch.Tensor,
    target_BHW: torch.Tensor,
    valid_BHW: torch.Tensor,
    *,
    num_scales: int = 4,
    pred_scale_B: torch.Tensor | None = None,
    target_scale_B: torch.Tensor | None = None,
    impl: str = "auto",
) -> dict[str, torch.Tensor]:
    """Gradient matching on the residual r = pred_scale * pred - target_scale * target (MiDaS style).

    For each scale k < num_scales the maps are subsampled with stride 2**k; an image's term is the sum of
    |r_right - r| and |r_below - r| over neighbour pairs that are both valid, divided by the number of valid
    subsampled pixels; the image's loss is the sum over scales. MiDaS applies it to the SSI-aligned prediction:
    pass the aligned prediction, or the raw prediction with the alignment's scales (`pred_scale_B` from
    `ssi_lsq_loss(...)["scale"]`; or `pred_scale` / `target_scale` from `ssi_median_loss`), which avoids
    materializing the aligned map. Shifts cancel in the differences.

    Args:
        pred_BHW: prediction (fp32/bf16).
        target_BHW: target (no gradient).
        valid_BHW: bool mask.
        num_scales: number of scales (MiDaS: 4).
        pred_scale_B: optional per-image factor on the prediction (differentiable).
        target_scale_B: optional per-image factor on the target (no gradient).
        impl: "auto" | "triton" | "torch".

    Returns:
        "loss", "loss_per_image", "num_valid".
    """
    out = depthkit_kernels.gradient_matching(
        pred_BHW,
        target_BHW,
        valid_BHW,
        num_scales=num_scales,
        pred_scale_B=pred_scale_B,
        target_scale_B=target_scale_B,
        impl=impl,
    )
    return with_reduction(out.loss_B, out.num_valid_B)
