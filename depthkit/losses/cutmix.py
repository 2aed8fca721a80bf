"""CutMix-aware loss wrapper: a loss per mixed region, averaged by area (Depth Anything's unlabeled branch)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .reduction import mean_over_images

PER_IMAGE = "_per_image"


def cutmix_loss(
    loss_fn: Callable[..., dict[str, torch.Tensor]],
    pred_BHW: torch.Tensor,
    target_BHW: torch.Tensor,
    valid_BHW: torch.Tensor,
    cutmix_mask_BHW: torch.Tensor,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """Apply `loss_fn` separately to the two regions of CutMix-ed images and average them by area.

    A CutMix-ed image holds two scenes, so an affine-invariant loss must align each region on its own: one
    scale and shift (or median and MAD) per region per image. With m the valid pixels of the image's own region
    (`~cutmix_mask_BHW`) and m' those of the partner's region (`cutmix_mask_BHW`), each image's value is
    (m * L_own + m' * L_partner) / (m + m'); then the usual mean over images with valid pixels. Neighbour pairs
    across the region boundary never count (for gradient matching), since each call sees only its region.
    `target_BHW` is the target mixed the same way (e.g. `depthkit.data.cutmix.mix_like`).

    Args:
        loss_fn: a depthkit loss function (or `DepthLoss`) returning "loss_per_image" and "num_valid".
        pred_BHW: prediction on the mixed image.
        target_BHW: mixed target.
        valid_BHW: bool mask.
        cutmix_mask_BHW: bool, True where the pixel comes from the partner image.
        **kwargs: passed to `loss_fn`.

    Returns:
        For every "<term>_per_image" of `loss_fn` (including "loss_per_image"): the area-weighted combination
        and its batch mean "<term>"; "num_valid" (m + m'); "loss_own", "loss_partner" (each region's batch mean:
        "loss_partner" is 0 when no image is mixed); "mixed_fraction" (the share of valid pixels in partner regions).
    """
    if cutmix_mask_BHW.dtype != torch.bool or cutmix_mask_BHW.shape != valid_BHW.shape:
        raise ValueError(
            f"cutmix_loss: cutmix_mask must be a bool tensor of shape {tuple(valid_BHW.shape)}, "
            f"got {cutmix_mask_BHW.dtype} {tuple(cutmix_mask_BHW.shape)}"
        )
    own = loss_fn(pred_BHW, target_BHW, valid_BHW & ~cutmix_mask_BHW, **kwargs)
    partner = loss_fn(pred_BHW, target_BHW, valid_BHW & cutmix_mask_BHW, **kwargs)
    num_own_B, num_partner_B = own["num_valid"].float(), partner["num_valid"].float()
    num_valid_B = own["num_valid"] + partner["num_valid"]
    total_B = (num_own_B + num_partner_B).clamp_min(1)
    result: dict[str, torch.Tensor] = {}
    for key, own_B in own.items():
        if not key.endswith(PER_IMAGE) or key not in partner:
            continue
        combined_B = (own_B * num_own_B + partner[key] * num_partner_B) / total_B
        result[key[: -len(PER_IMAGE)]] = mean_over_images(combined_B, num_valid_B)
        result[key] = combined_B
    result["num_valid"] = num_valid_B
    result["loss_own"] = own["loss"]
    result["loss_partner"] = partner["loss"]
    result["mixed_fraction"] = num_partner_B.sum() / num_valid_B.sum().clamp_min(1)
    return result
