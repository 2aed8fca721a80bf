"""Colour maps of depth and disparity maps, for `depthkit predict`, the training panels and the demo."""

from __future__ import annotations

import numpy as np


def robust_range(values_HW: np.ndarray, valid_HW: np.ndarray) -> tuple[float, float]:
    """The 2nd and 98th percentiles of a map's valid, finite pixels ((0, 1) without any)."""
    valid = valid_HW & np.isfinite(values_HW)
    return tuple(float(v) for v in np.percentile(values_HW[valid], [2, 98])) if valid.any() else (0.0, 1.0)


def colorize(
    values_HW: np.ndarray,
    valid_HW: np.ndarray | None = None,
    cmap: str = "Spectral_r",
    limits: tuple[float, float] | None = None,
) -> np.ndarray:
    """uint8 RGB `H x W x 3`: matplotlib's `cmap` over `limits` (default: the 2nd-98th percentiles of the valid
    pixels); invalid and non-finite pixels black. A constant map takes the colour map's low end."""
    from matplotlib import colormaps

    valid = np.isfinite(values_HW) if valid_HW is None else (valid_HW & np.isfinite(values_HW))
    lo, hi = limits if limits is not None else robust_range(values_HW, valid)
    norm = np.clip((values_HW.astype(np.float64) - lo) / max(hi - lo, 1e-12), 0, 1)
    rgb = np.ascontiguousarray(colormaps[cmap](norm, bytes=True)[..., :3])
    rgb[~valid] = 0
    return rgb
