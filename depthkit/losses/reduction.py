"""Batch reduction shared by every loss: per image first, then the mean over images that have valid pixels."""

from __future__ import annotations

import torch


def mean_over_images(per_image_B: torch.Tensor, num_valid_B: torch.Tensor) -> torch.Tensor:
    """Mean of `per_image_B` over the images with `num_valid_B > 0`.

    An all-invalid batch gives a fp32 zero that is still connected to the graph (backward works and yields zero
    gradients), never a Python int and never NaN.

    Args:
        per_image_B: per-image losses (0 for images without valid pixels).
        num_valid_B: per-image counts of valid pixels (or patches).
    """
    has_B = num_valid_B > 0
    per_image_B = torch.where(has_B, per_image_B.float(), torch.zeros_like(per_image_B, dtype=torch.float32))
    return per_image_B.sum() / has_B.sum().clamp_min(1)


def with_reduction(per_image_B: torch.Tensor, num_valid_B: torch.Tensor, **terms: torch.Tensor) -> dict:
    """The standard result dict: "loss", "loss_per_image", "num_valid" plus `terms`."""
    return {
        "loss": mean_over_images(per_image_B, num_valid_B),
        "loss_per_image": per_image_B,
        "num_valid": num_valid_B,
        **terms,
    }
