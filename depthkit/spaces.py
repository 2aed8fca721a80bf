"""Output spaces of depth maps, shared by data, models, losses, eval and export.

A map's space is part of its metadata everywhere in depthkit; depth, disparity and affine-invariant
maps never share a name or a code path without saying which one they are.
"""

from __future__ import annotations

METRIC_DEPTH = "metric_depth"  # metres, larger = farther
DISPARITY = "disparity"  # inverse depth up to a known or unknown scale (1/m for metric sources)
AFFINE_DISPARITY = "affine_disparity"  # inverse depth up to an unknown scale and shift (relative models)

OUTPUT_SPACES = (METRIC_DEPTH, DISPARITY, AFFINE_DISPARITY)


def check_space(space: str, *, what: str = "output_space") -> str:
    """Return `space` if it is a known output space, else raise a `ValueError` naming `what`."""
    if space not in OUTPUT_SPACES:
        raise ValueError(f"{what}={space!r} is not an output space; expected one of {', '.join(OUTPUT_SPACES)}")
    return space
