"""Feature alignment loss (Depth Anything): keep the student's encoder features close to a frozen DINOv2's."""

from __future__ import annotations

import torch
from torch import nn

import depthkit_kernels

from .reduction import with_reduction


def feature_alignment_loss(
    student_BND: torch.Tensor,
    target_BND: torch.Tensor,
    *,
    tolerance: float = 0.85,
    impl: str = "auto",
) -> dict[str, torch.Tensor]:
    """1 - cosine similarity per patch, ignoring patches whose similarity already exceeds `tolerance`.

    Per image, the mean of 1 - cos over the patches with cos <= tolerance; then the mean over images with at
    least one such patch (an image whose patches all exceed the tolerance contributes nothing). The tolerance is a
    cosine: Depth Anything V1's margin alpha = 0.15 is on 1 - cos (a patch with 1 - cos < alpha is left out,
    LiheYoung/Depth-Anything#80), so its tolerance is 0.85. The per-image mean over the patches still included
    (not over all of them) is depthkit's reading: the paper writes 1/HW over all pixels but leaves the excluded
    ones out, without saying which count divides.

    Args:
        student_BND: the student's patch tokens (projected to the teacher's width if they differ).
        target_BND: the frozen teacher's patch tokens (no gradient).
        tolerance: Cosine similarity above which a patch is ignored; Depth Anything: 0.85 (alpha = 0.15).
        impl: "auto" | "triton" | "torch".

    Returns:
        "loss", "loss_per_image", "num_valid" (patches that entered the mean, per image).
    """
    if not -1.0 <= tolerance <= 1.0:  # NaN fails too; above 1 no patch is ignored, below -1 every patch is
        raise ValueError(f"feature_alignment_loss: tolerance={tolerance} is not a cosine similarity in [-1, 1]")
    out = depthkit_kernels.feature_alignment(student_BND, target_BND, tolerance=tolerance, impl=impl)
    return with_reduction(out.loss_B, out.num_included_B)


class FeatureAlignmentLoss(nn.Module):
    """Thin module around `feature_alignment_loss`."""

    def __init__(self, tolerance: float = 0.85, impl: str = "auto"):
        super().__init__()
        self.tolerance = tolerance
        self.impl = impl

    def forward(self, student_BND: torch.Tensor, target_BND: torch.Tensor) -> dict[str, torch.Tensor]:
        return feature_alignment_loss(student_BND, target_BND, tolerance=self.tolerance, impl=self.impl)

    def extra_repr(self) -> str:
        return f"tolerance={self.tolerance}, impl={self.impl!r}"
