"""Per-image alignment of a prediction to ground truth, before metrics.

Relative models predict depth only up to an unknown transform, so each prediction is fitted to its ground truth
over the pixels that are scored, then turned into metric depth. Which fit applies depends on the prediction's
output space and the benchmark (`depthkit.eval.benchmarks.PROTOCOLS`); `resolve_alignment` makes that choice
and says why, so it can be printed with the results and stored in the JSON.

- `lsq_disparity`: least squares `s * pred + t ≈ 1 / gt`, then depth = `1 / max(s * pred + t, 1 / cap)`.
  Accepts every space (metric depth is inverted first). The affine-invariant protocol of MiDaS (Ranftl et al.,
  TPAMI 2020; its NYU/KITTI evaluation gists, `BadPixelMetric`), which Depth Anything V1/V2 follow.
- `lsq_depth`: least squares `s * depth + t ≈ gt`. Metric depth or disparity. Marigold `src/util/alignment.py`
  (`least_square`), for affine-invariant depth.
- `median`: `depth * median(gt) / median(depth)`. Metric depth or disparity. The scale-only protocol of
  self-supervised KITTI work (Zhou et al. 2017; Monodepth2).
- `none`: the prediction is metric already. Metric depth or disparity. BTS / ZoeDepth / Depth Anything metric
  evaluation.

Every alignment ends in depth clamped to `[min_depth, cap]` (non-finite values become the nearest bound), as
BTS's `eval_with_pngs.py` does for all predictions; `cap` is the benchmark's maximum depth, or `FAR_DEPTH_CAP`
where the benchmark has none. Disparity predictions (`disparity` space) become depth as `1 / disparity` for the
depth-space alignments.

Legend: `pred_HW` prediction in its output space, `target_HW` ground-truth depth (m), `mask_HW` bool, pixels
that are fitted and scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from depthkit.eval.metrics import check_scored
from depthkit.spaces import AFFINE_DISPARITY, DISPARITY, METRIC_DEPTH, check_space

ALIGNMENTS = ("lsq_disparity", "lsq_depth", "median", "none")

# Output spaces each alignment can turn into metric depth.
ACCEPTS: dict[str, tuple[str, ...]] = {
    "lsq_disparity": (AFFINE_DISPARITY, DISPARITY, METRIC_DEPTH),
    "lsq_depth": (DISPARITY, METRIC_DEPTH),
    "median": (DISPARITY, METRIC_DEPTH),
    "none": (DISPARITY, METRIC_DEPTH),
}

# Depth cap where a benchmark has no maximum depth: Marigold clips aligned disparity at 1e-3 before inverting it
# (script/depth/eval.py), i.e. predictions no farther than 1000 m.
FAR_DEPTH_CAP = 1000.0


@dataclass(frozen=True)
class AlignmentFit:
    """What one alignment did to one image.

    Attributes:
        scale: Fitted scale (1 for `none`).
        shift: Fitted shift, in the fit's space (0 for `none` and `median`).
        degenerate: True when the prediction was constant over the mask, so only a shift could be fitted, or had
            no finite value there to fit (`NO_FIT`: it scores as ZoeDepth scores NaN, at `min_depth`).
    """

    scale: float
    shift: float
    degenerate: bool = False


NO_FIT = AlignmentFit(scale=0.0, shift=0.0, degenerate=True)
"""The fit of a prediction with no finite (for depth alignments: positive) value on the scored pixels. Such an image
is scored, not skipped: skipping would reward a model for failing on it."""


def resolve_alignment(requested: str | None, *, output_space: str, default_relative: str) -> tuple[str, str]:
    """Choose the alignment for a prediction space and benchmark, and say why.

    Args:
        requested: An entry of `ALIGNMENTS`, or None / "auto" to use the benchmark's protocol.
        output_space: The predictions' space (`depthkit.spaces`).
        default_relative: The benchmark's alignment for relative (affine-invariant) predictions.

    Returns:
        `(alignment, reason)`; the reason is a sentence for reports.

    Raises:
        ValueError: an unknown alignment, or one that cannot turn this output space into depth.
    """
    check_space(output_space)
    if requested in (None, "auto"):
        if output_space == METRIC_DEPTH:
            return "none", "default for metric_depth predictions: scored as predicted, no fit"
        if output_space == AFFINE_DISPARITY:
            return default_relative, f"benchmark protocol for {AFFINE_DISPARITY} predictions"
        return default_relative, f"benchmark protocol for {DISPARITY} predictions (scale unknown, so fitted)"
    if requested not in ALIGNMENTS:
        raise ValueError(f"alignment={requested!r}; expected 'auto' or one of {', '.join(ALIGNMENTS)}")
    if output_space not in ACCEPTS[requested]:
        raise ValueError(
            f"alignment {requested!r} cannot turn {output_space} predictions into depth (an unknown shift in "
            f"disparity has no depth-space equivalent); use lsq_disparity"
        )
    return requested, "requested"


def fit_scale_shift(x_N: np.ndarray, y_N: np.ndarray) -> AlignmentFit:
    """Least-squares `s, t` minimizing `sum((s * x + t - y) ** 2)`, from float64 normal equations.

    The 2x2 system needs O(1) memory, so full-resolution ETH3D images (24 M pixels) fit cheaply. A constant `x`
    gives `s = 0, t = mean(y)`, flagged as degenerate.
    """
    if x_N.shape != y_N.shape or x_N.ndim != 1:
        raise ValueError(f"fit_scale_shift: expected two 1-D arrays of one length, got {x_N.shape} and {y_N.shape}")
    if x_N.size == 0:
        raise ValueError("cannot fit an alignment on zero pixels")
    x = x_N.astype(np.float64)
    y = y_N.astype(np.float64)
    mean_x, mean_y = x.mean(), y.mean()
    dx = x - mean_x  # centred sums stay exact where raw sums of squares would cancel
    var_x = float(np.dot(dx, dx))
    if var_x <= 1e-12 * float(np.dot(x, x)):
        return AlignmentFit(scale=0.0, shift=float(mean_y), degenerate=True)
    scale = float(np.dot(dx, y - mean_y)) / var_x
    shift = float(mean_y - scale * mean_x)
    if not (np.isfinite(scale) and np.isfinite(shift)):
        raise ValueError(f"fit_scale_shift: non-finite fit (scale {scale}, shift {shift}): NaN or inf in the input?")
    return AlignmentFit(scale=scale, shift=shift)


def _inverse(values_HW: np.ndarray) -> np.ndarray:
    """1 / values where positive, +inf elsewhere (a non-positive disparity or depth has no inverse)."""
    values = values_HW.astype(np.float64)
    out = np.full(values.shape, np.inf)
    np.divide(1.0, values, out=out, where=values > 0)
    return out


def clamp_depth(depth_HW: np.ndarray, min_depth: float, cap: float) -> np.ndarray:
    """Clamp to `[min_depth, cap]`; NaN becomes `min_depth`, +inf `cap`, as ZoeDepth's `compute_metrics` does."""
    depth = np.nan_to_num(depth_HW.astype(np.float64), nan=min_depth, posinf=cap, neginf=min_depth)
    return np.clip(depth, min_depth, cap)


def align_to_depth(
    pred_HW: np.ndarray,
    target_HW: np.ndarray,
    mask_HW: np.ndarray,
    *,
    alignment: str,
    output_space: str,
    min_depth: float,
    max_depth: float,
) -> tuple[np.ndarray, AlignmentFit]:
    """Align a prediction to ground truth over `mask_HW` and return float64 depth clamped to the benchmark range.

    Args:
        pred_HW: Prediction at ground-truth resolution, in `output_space`.
        target_HW: Ground-truth depth in metres.
        mask_HW: Pixels to fit (and later score): valid, inside the depth range and crop.
        alignment: One of `ALIGNMENTS` (see `resolve_alignment`).
        output_space: The prediction's space.
        min_depth: The benchmark's minimum depth; the lower clamp.
        max_depth: The benchmark's maximum depth; the upper clamp (`FAR_DEPTH_CAP` when infinite).

    Returns:
        `(depth_HW, fit)`: float64 depth, finite and inside `[min_depth, cap]` everywhere.
    """
    if alignment not in ACCEPTS:
        raise ValueError(f"alignment={alignment!r}; expected one of {', '.join(ALIGNMENTS)}")
    if output_space not in ACCEPTS[alignment]:
        raise ValueError(f"alignment {alignment!r} does not accept {output_space} predictions")
    check_scored(pred_HW, target_HW, mask_HW)
    if not 0 < min_depth < max_depth:  # max_depth may be inf
        raise ValueError(f"depth range [{min_depth}, {max_depth}]: expected 0 < min_depth < max_depth")
    cap = max_depth if np.isfinite(max_depth) else FAR_DEPTH_CAP
    if not mask_HW.any():
        raise ValueError("cannot align a prediction with no valid ground-truth pixels")

    if alignment == "lsq_disparity":
        disparity_HW = _inverse(pred_HW) if output_space == METRIC_DEPTH else pred_HW.astype(np.float64)
        fit_mask_HW = mask_HW & np.isfinite(disparity_HW)
        if not fit_mask_HW.any():  # nothing to fit (NaN, or a metric depth of 0 everywhere): scored as NaN is
            return np.full(pred_HW.shape, float(min_depth)), NO_FIT  # (`clamp_depth`)
        fit = fit_scale_shift(disparity_HW[fit_mask_HW], 1.0 / target_HW[fit_mask_HW].astype(np.float64))
        # MiDaS: disparity below 1/cap (including negative) is raised to 1/cap, so depth stays finite. Non-finite
        # predictions stay so up to `clamp_depth`: NaN becomes min_depth, as in the other alignments.
        with np.errstate(invalid="ignore", over="ignore"):
            depth_HW = 1.0 / np.maximum(fit.scale * disparity_HW + fit.shift, 1.0 / cap)
        return clamp_depth(depth_HW, min_depth, cap), fit

    depth_HW = _inverse(pred_HW) if output_space == DISPARITY else pred_HW.astype(np.float64)
    if alignment == "none":
        return clamp_depth(depth_HW, min_depth, cap), AlignmentFit(scale=1.0, shift=0.0)
    fit_mask_HW = mask_HW & np.isfinite(depth_HW) & (depth_HW > 0)
    if not fit_mask_HW.any():  # nothing to fit: the prediction as it is, clamped (NaN and 0 to min_depth)
        return clamp_depth(depth_HW, min_depth, cap), NO_FIT
    if alignment == "median":
        median_pred = float(np.median(depth_HW[fit_mask_HW]))
        scale = float(np.median(target_HW[fit_mask_HW])) / median_pred
        return clamp_depth(depth_HW * scale, min_depth, cap), AlignmentFit(scale=scale, shift=0.0)
    fit = fit_scale_shift(depth_HW[fit_mask_HW], target_HW[fit_mask_HW])  # lsq_depth
    return clamp_depth(fit.scale * depth_HW + fit.shift, min_depth, cap), fit
