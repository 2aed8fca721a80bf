"""Scale-invariant log loss (Eigen et al. 2014) for metric-depth fine-tuning (Depth Anything V2 metric_depth)."""

from __future__ import annotations

import torch
from torch import nn

from depthkit_kernels import IMPLS, check_maps

from .reduction import with_reduction

VAR_FLOOR = 1e-12
"""Floor under the square root, so a perfect prediction has a finite (zero) gradient instead of NaN."""


def silog_loss(
    pred_depth_BHW: torch.Tensor,
    target_depth_BHW: torch.Tensor,
    valid_BHW: torch.Tensor,
    *,
    lambd: float = 0.5,
    eps: float = 1e-6,
    impl: str = "auto",
) -> dict[str, torch.Tensor]:
    """SiLog on metric depth: per image, sqrt(mean(g^2) - lambd * mean(g)^2) with g = log(target) - log(pred).

    Differences from Depth Anything V2's `SiLogLoss`: the statistics are per image and then averaged over images
    with valid pixels (theirs pools all valid pixels of the batch); pixels with target <= 0 are treated as
    invalid; predictions are clamped to at least `eps` before the log; the variance is floored at `VAR_FLOOR`
    inside the square root. Inputs are metric depths (`depthkit.spaces.METRIC_DEPTH`), not disparities.

    Args:
        pred_depth_BHW: predicted metric depth.
        target_depth_BHW: target metric depth (no gradient).
        valid_BHW: bool mask.
        lambd: variance focus; 0.5 in Depth Anything V2 / ZoeDepth.
        eps: minimum predicted depth.
        impl: "auto" or "torch" (there is no Triton kernel: this is one elementwise pass plus sums).
    """
    if impl not in IMPLS:
        raise ValueError(f"silog_loss: impl={impl!r} is not one of {IMPLS}")
    if impl == "triton":
        raise ValueError("silog_loss has no Triton kernel; use impl='auto' or 'torch'")
    check_maps("silog_loss", pred_depth_BHW, target_depth_BHW, valid_BHW)  # the checks every dense loss makes
    target_BHW = target_depth_BHW.detach().float()
    if not 0 < eps < float("inf"):
        raise ValueError(f"silog_loss: eps must be positive and finite, got {eps}")
    if not 0 <= lambd <= 1:
        raise ValueError(f"silog_loss: lambd must be in [0, 1], got {lambd}")
    valid_BHW = valid_BHW & ~(target_BHW <= 0)  # a NaN target at a valid pixel stays and shows in the loss
    pred_BHW = torch.where(valid_BHW, pred_depth_BHW.float(), 1.0).clamp_min(eps)
    target_BHW = torch.where(valid_BHW, target_BHW, 1.0)
    g_BHW = torch.where(valid_BHW, torch.log(target_BHW) - torch.log(pred_BHW), 0.0)
    num_valid_B = valid_BHW.sum(dim=(1, 2))
    n_B = num_valid_B.clamp_min(1).float()
    mean_B = g_BHW.sum(dim=(1, 2)) / n_B
    # mean(g^2) - lambd mean(g)^2 as var(g) + (1 - lambd) mean(g)^2, the variance from centered values: the
    # one-pass form cancels catastrophically in fp32 when lambd = 1 (a prediction k x the target scored > 0).
    centered_BHW = torch.where(valid_BHW, g_BHW - mean_B[:, None, None], 0.0)
    var_B = (centered_BHW * centered_BHW).sum(dim=(1, 2)) / n_B + (1 - lambd) * mean_B * mean_B
    loss_B = var_B.clamp_min(VAR_FLOOR).sqrt()  # clamp keeps NaN / inf: a diverged image must show, not read as 0
    loss_B = torch.where(num_valid_B > 0, loss_B, 0.0)
    return with_reduction(loss_B, num_valid_B)


class SiLogLoss(nn.Module):
    """Thin module around `silog_loss`."""

    def __init__(self, lambd: float = 0.5):
        super().__init__()
        self.lambd = lambd

    def forward(
        self, pred_depth_BHW: torch.Tensor, target_depth_BHW: torch.Tensor, valid_BHW: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return silog_loss(pred_depth_BHW, target_depth_BHW, valid_BHW, lambd=self.lambd)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}"
