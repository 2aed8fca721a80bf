"""Depth metrics, evaluation masks and crops, relative-depth pair accuracy.

Metrics follow BTS's `compute_errors` (`utils/eval_with_pngs.py`), which ZoeDepth, AdaBins and DPT report
(`gt` and `pred` are the scored pixels of one image, both positive):

| metric | definition |
| --- | --- |
| `abs_rel` | `mean(|gt - pred| / gt)` |
| `sq_rel` | `mean((gt - pred)^2 / gt)` |
| `rmse` | `sqrt(mean((gt - pred)^2))` |
| `rmse_log` | `sqrt(mean((log gt - log pred)^2))` |
| `log10` | `mean(|log10 gt - log10 pred|)` |
| `silog` | `100 * sqrt(mean(e^2) - mean(e)^2)`, `e = log pred - log gt` (Eigen et al. 2014, lambda = 1) |
| `delta1/2/3` | fraction with `max(gt / pred, pred / gt) < 1.25, 1.25^2, 1.25^3` |

Depth Anything V2's `metric_depth/util/metric.py` reports `silog` with lambda = 0.5 and without the factor 100;
ours is BTS's. Every sum is float64. A benchmark's number is the mean over images of these per-image values.

Legend: `H, W` ground-truth size; `pred_HW`, `target_HW` depth (or both disparity), `mask_HW` bool.
"""

from __future__ import annotations

import numpy as np

DEPTH_METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "delta1", "delta2", "delta3")

# Crops, as the fraction (or the pixel box) of the ground-truth image that is scored.
# eigen_nyu: rows 45:471, cols 41:601 of the 480x640 NYU frame (Eigen et al. 2014; BTS `--eigen_crop`, Marigold).
# garg: Garg et al. ECCV 2016 KITTI crop; eigen_kitti: Eigen et al. NIPS 2014 KITTI crop, both as fractions of the
# full frame (BTS eval_with_pngs.py). kb_garg / kb_eigen: first the KITTI-benchmark crop (the bottom 352 rows and the
# centred 1216 columns), then garg / eigen_kitti as fractions of that 352x1216 box: ZoeDepth (`do_kb_crop`, so Depth
# Anything V1's metric KITTI numbers) and Marigold (`kitti_bm_crop`). At 375x1242 kb_garg scores 7.5% fewer pixels.
CROPS = ("none", "eigen_nyu", "garg", "eigen_kitti", "kb_garg", "kb_eigen")
KB_CROP_HW = (352, 1216)
KB_CROPS = ("kb_garg", "kb_eigen")  # the crops inside the KITTI-benchmark box, which the model is shown alone
_FRACTION_CROPS = {
    "garg": (0.40810811, 0.99189189, 0.03594771, 0.96405229),
    "eigen_kitti": (0.3324324, 0.91351351, 0.0359477, 0.96405229),
}


def crop_mask(shape: tuple[int, int], crop: str | None) -> np.ndarray:
    """The bool `H×W` mask of a named crop (all True for "none")."""
    height, width = shape
    mask_HW = np.zeros((height, width), dtype=bool)
    if crop in (None, "none"):
        mask_HW[:] = True
    elif crop == "eigen_nyu":
        if (height, width) != (480, 640):
            raise ValueError(f"the eigen_nyu crop is defined on 480x640 (HxW) NYU frames, not on {height}x{width}")
        mask_HW[45:471, 41:601] = True
    elif crop in _FRACTION_CROPS:
        top, bottom, left, right = _FRACTION_CROPS[crop]
        mask_HW[int(top * height) : int(bottom * height), int(left * width) : int(right * width)] = True
    elif crop in KB_CROPS:
        rows, cols = kb_box(shape)
        mask_HW[rows, cols] = crop_mask(KB_CROP_HW, "garg" if crop == "kb_garg" else "eigen_kitti")
    else:
        raise ValueError(f"crop={crop!r}; expected one of {', '.join(CROPS)}")
    return mask_HW


def kb_box(shape: tuple[int, int]) -> tuple[slice, slice]:
    """The KITTI-benchmark crop box of a frame (`KB_CROP_HW`: the bottom 352 rows, the centred 1216 columns), as
    (rows, columns) slices."""
    height, width = shape
    kb_height, kb_width = KB_CROP_HW
    if height < kb_height or width < kb_width:
        raise ValueError(f"the KITTI-benchmark crop needs a frame of at least 1216x352; this one is {width}x{height}")
    row, col = height - kb_height, (width - kb_width) // 2
    return slice(row, row + kb_height), slice(col, col + kb_width)


def input_crop(sample: dict, crop: str | None) -> dict:
    """The sample as the model sees it under `crop`: the KB crops (`kb_garg`, `kb_eigen`) cut the image and its
    ground truth to the KB box before inference, as ZoeDepth (`do_kb_crop` in its eval loader) and Marigold
    (`kitti_benchmark_crop` on the RGB too) do; the other crops only mask the scored pixels."""
    if crop not in KB_CROPS:
        return sample
    rows, cols = kb_box(sample["target"].shape)
    cropped = {**sample, "uncropped_hw": sample["target"].shape}
    for name in ("image", "target", "valid"):
        cropped[name] = sample[name][rows, cols]
    return cropped


def evaluation_mask(
    target_HW: np.ndarray, valid_HW: np.ndarray, *, min_depth: float, max_depth: float, crop: str | None
) -> np.ndarray:
    """Pixels that are scored: valid, `min_depth < gt < max_depth` (strict, as BTS), and inside the crop."""
    if target_HW.shape != valid_HW.shape:
        raise ValueError(f"shapes differ: target {target_HW.shape}, valid {valid_HW.shape}")
    with np.errstate(invalid="ignore"):
        in_range_HW = (target_HW > min_depth) & (target_HW < max_depth)
    return valid_HW.astype(bool) & in_range_HW & crop_mask(target_HW.shape, crop)


def check_scored(pred_HW: np.ndarray, target_HW: np.ndarray, mask_HW: np.ndarray) -> None:
    """A `ValueError` unless prediction, target and a bool mask have one shape (an int mask would index rows)."""
    if not (pred_HW.shape == target_HW.shape == mask_HW.shape):
        raise ValueError(f"shapes differ: pred {pred_HW.shape}, target {target_HW.shape}, mask {mask_HW.shape}")
    if mask_HW.dtype != np.bool_:
        raise ValueError(f"the mask must be bool, got {mask_HW.dtype}")


def depth_metrics(pred_HW: np.ndarray, target_HW: np.ndarray, mask_HW: np.ndarray) -> dict[str, float]:
    """The metrics of `DEPTH_METRICS` for one image, over `mask_HW`, in float64.

    Raises:
        ValueError: no pixel is scored, or a scored prediction or target is not positive and finite.
    """
    check_scored(pred_HW, target_HW, mask_HW)
    pred = pred_HW[mask_HW].astype(np.float64)
    gt = target_HW[mask_HW].astype(np.float64)
    if gt.size == 0:
        raise ValueError("no pixel to score")
    if not (np.all(np.isfinite(pred)) and np.all(pred > 0) and np.all(np.isfinite(gt)) and np.all(gt > 0)):
        raise ValueError("scored predictions and targets must be positive and finite (align and clamp first)")
    diff = gt - pred
    log_err = np.log(pred) - np.log(gt)
    ratio = np.maximum(gt / pred, pred / gt)
    return {
        "abs_rel": float(np.mean(np.abs(diff) / gt)),
        "sq_rel": float(np.mean(diff**2 / gt)),
        "rmse": float(np.sqrt(np.mean(diff**2))),
        "rmse_log": float(np.sqrt(np.mean(log_err**2))),
        "log10": float(np.mean(np.abs(np.log10(pred) - np.log10(gt)))),
        # max(0, .) guards the rounding of a zero variance
        "silog": float(100.0 * np.sqrt(max(np.mean(log_err**2) - np.mean(log_err) ** 2, 0.0))),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25**2)),
        "delta3": float(np.mean(ratio < 1.25**3)),
    }


def mean_over_images(rows: list[dict], keys: tuple[str, ...] = DEPTH_METRICS) -> dict[str, float]:
    """Mean of each metric over per-image rows (float64); NaN for a metric no row has."""
    out = {}
    for key in keys:
        values = np.array([row[key] for row in rows if row.get(key) is not None], dtype=np.float64)
        out[key] = float(values.mean()) if values.size else float("nan")
    return out


def resize_bilinear(values_hw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a prediction to ground-truth size, bilinear with `align_corners=True`.

    That is what Depth Anything V2 (`metric_depth/train.py`) and ZoeDepth use to bring predictions to ground-truth
    resolution. Returns float32; a map already at `shape` is returned unchanged.
    """
    if values_hw.shape == tuple(shape):
        return values_hw.astype(np.float32, copy=False)
    import torch
    import torch.nn.functional as F

    values_11hw = torch.from_numpy(np.ascontiguousarray(values_hw, dtype=np.float32))[None, None]
    resized_11HW = F.interpolate(values_11hw, size=tuple(shape), mode="bilinear", align_corners=True)
    return resized_11HW[0, 0].numpy()


def pair_accuracy(pred_HW: np.ndarray, pairs: list[tuple], *, larger_is_closer: bool) -> tuple[int, int]:
    """Relative-depth pair accuracy (DA-2K): how many pairs the prediction orders right.

    Args:
        pred_HW: Prediction at the annotated image's resolution.
        pairs: `((row1, col1), (row2, col2))` pixel pairs with the first point the closer one.
        larger_is_closer: True for disparity-like spaces, False for depth.

    Returns:
        `(num_correct, num_pairs)`. A tie, or a non-finite value at either point, counts as wrong.
    """
    height, width = pred_HW.shape
    num_correct = 0
    for (r1, c1), (r2, c2) in pairs:
        for r, c in ((r1, c1), (r2, c2)):
            if not (0 <= r < height and 0 <= c < width):
                raise ValueError(f"pair point ({r}, {c}) lies outside the {width}x{height} image")
        closer, farther = float(pred_HW[r1, c1]), float(pred_HW[r2, c2])
        if np.isfinite(closer) and np.isfinite(farther):
            num_correct += int(closer > farther if larger_is_closer else closer < farther)
    return num_correct, len(pairs)
