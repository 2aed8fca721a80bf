"""One image scored the way `depthkit eval` scores it: the protocol's mask, the alignment, the metrics.

Shared by the evaluation runner and by training's validation (`depthkit.train.module.aligned_image_metrics`), so a
validation curve and a benchmark number never follow two copies of the protocol.

Legend: `pred_HW` prediction at ground-truth size, `target_HW` depth (m), `mask_HW` scored pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from depthkit.eval.alignment import AlignmentFit, align_to_depth
from depthkit.eval.metrics import depth_metrics, evaluation_mask

MIN_SCORED_PIXELS = 10
"""Images with fewer scored pixels are skipped, not scored (Depth Anything V2 `metric_depth/train.py` skips those
below 10)."""
METRIC_SPACES = ("depth", "disparity")


@dataclass(frozen=True)
class ImageScore:
    """An image's scored pixels and, when there are at least `MIN_SCORED_PIXELS`, its aligned depth and metrics."""

    mask_HW: np.ndarray
    depth_HW: np.ndarray | None = None
    fit: AlignmentFit | None = None
    metrics: dict[str, float] | None = None

    @property
    def num_pixels(self) -> int:
        return int(self.mask_HW.sum())


def score_image(
    pred_HW: np.ndarray,
    target_HW: np.ndarray,
    valid_HW: np.ndarray,
    *,
    alignment: str,
    output_space: str,
    min_depth: float,
    max_depth: float,
    crop: str | None = None,
    metric_space: str = "depth",
) -> ImageScore:
    """Mask (valid, `min_depth < gt < max_depth`, inside `crop`), align the prediction to depth over the mask
    (`align_to_depth`: clamped to the range), and score it in `metric_space` ("disparity": the metrics of 1/depth).

    Args:
        pred_HW: Prediction at ground-truth size, in `output_space`.
        target_HW: Ground-truth depth in metres; `valid_HW` its valid pixels.
        alignment: One of `depthkit.eval.alignment.ALIGNMENTS`.
    """
    if metric_space not in METRIC_SPACES:
        raise ValueError(f"metric_space={metric_space!r}; expected one of {', '.join(METRIC_SPACES)}")
    mask_HW = evaluation_mask(target_HW, valid_HW, min_depth=min_depth, max_depth=max_depth, crop=crop)
    if mask_HW.sum() < MIN_SCORED_PIXELS:
        return ImageScore(mask_HW)
    depth_HW, fit = align_to_depth(
        pred_HW,
        target_HW,
        mask_HW,
        alignment=alignment,
        output_space=output_space,
        min_depth=min_depth,
        max_depth=max_depth,
    )
    if metric_space == "depth":
        metrics = depth_metrics(depth_HW, target_HW, mask_HW)
    else:
        target_disparity_HW = np.where(mask_HW, 1.0 / np.where(mask_HW, target_HW, 1.0), 0.0)
        metrics = depth_metrics(1.0 / depth_HW, target_disparity_HW, mask_HW)
    return ImageScore(mask_HW, depth_HW, fit, metrics)
