"""CutMix for unlabeled batches, as Depth Anything V1 uses it (after UniMatch).

With probability `p` per sample, a random box of the sample's strongly augmented image is replaced by the same
box of a partner image of the batch. The mask and the partner index are returned, not applied to targets:
`mix_like` mixes a pseudo-label or a teacher output the same way, and the loss is computed per region
(`depthkit.losses.cutmix_loss`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class CutMix(NamedTuple):
    """A batch's CutMix draw: `mask_BHW` (bool, True where the pixel comes from the partner), `index_B` (long, the
    partner; the sample itself where it is not mixed), and the boxes as `(sample, top, left, height, width)`."""

    mask_BHW: torch.Tensor
    index_B: torch.Tensor
    boxes: list[tuple[int, int, int, int, int]]


def cutmix_boxes(
    batch_size: int,
    height: int,
    width: int,
    *,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    generator: torch.Generator | None = None,
) -> CutMix:
    """Draw CutMix boxes and partners.

    Args:
        batch_size: Number of samples B.
        height: Image height H.
        width: Image width W.
        p: Probability that a sample is mixed.
        area: Range of the box area as a fraction of the image.
        aspect: Range of the box aspect ratio (height / width), drawn log-uniformly so that tall and wide boxes
            are equally likely. UniMatch's `obtain_cutmix_box` draws it uniformly (about 3 of 4 boxes taller than
            wide) and redraws until the box fits; depthkit takes the symmetric draw and clips the box instead.
        generator: Source of randomness.

    Returns:
        The mask, the partners and the boxes (`CutMix`).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"cutmix p must be in [0, 1], got {p}")
    mask_BHW = torch.zeros(batch_size, height, width, dtype=torch.bool)
    index_B = torch.arange(batch_size)
    boxes: list[tuple[int, int, int, int, int]] = []
    if batch_size < 2:
        return CutMix(mask_BHW, index_B, boxes)
    order_B = torch.randperm(batch_size, generator=generator)
    partner_of_B = torch.empty_like(order_B)
    partner_of_B[order_B] = torch.roll(order_B, 1)  # a random cycle: nobody is their own partner
    draws = torch.rand(batch_size, 4, generator=generator, dtype=torch.float64)
    for b in range(batch_size):
        if draws[b, 0] >= p:
            continue
        box_area = (area[0] + (area[1] - area[0]) * float(draws[b, 1])) * height * width
        ratio = math.exp(math.log(aspect[0]) + (math.log(aspect[1]) - math.log(aspect[0])) * float(draws[b, 2]))
        box_h = max(1, min(height, round(math.sqrt(box_area * ratio))))
        box_w = max(1, min(width, round(math.sqrt(box_area / ratio))))
        pos = torch.rand(2, generator=generator, dtype=torch.float64)
        top = int(pos[0] * (height - box_h + 1))
        left = int(pos[1] * (width - box_w + 1))
        mask_BHW[b, top : top + box_h, left : left + box_w] = True
        index_B[b] = partner_of_B[b]
        boxes.append((b, top, left, box_h, box_w))
    return CutMix(mask_BHW, index_B, boxes)


def paste_boxes(images_BCHW: torch.Tensor, cutmix: CutMix) -> torch.Tensor:
    """`images_BCHW` mixed in place: each sample's box filled with the same box of its partner as it was before any
    pasting (so `mix_like(images, mask, index)`, at the cost of the boxes' pixels, not the whole batch's)."""
    patches = [
        images_BCHW[int(cutmix.index_B[b]), :, top : top + h, left : left + w].clone()
        for b, top, left, h, w in cutmix.boxes
    ]
    for (b, top, left, h, w), patch_CHW in zip(cutmix.boxes, patches, strict=True):
        images_BCHW[b, :, top : top + h, left : left + w] = patch_CHW
    return images_BCHW


def mix_like(x: torch.Tensor, cutmix_mask_BHW: torch.Tensor, cutmix_index_B: torch.Tensor) -> torch.Tensor:
    """Mix `x` (`B×H×W` or `B×C×H×W`) with its partners where the mask is set."""
    mask = cutmix_mask_BHW.to(x.device)
    if x.dim() == 4:
        mask = mask[:, None]  # B×1×H×W, broadcast over channels
    return torch.where(mask, x[cutmix_index_B.to(x.device)], x)
