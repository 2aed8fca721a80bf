"""The official Depth Anything network-input size rule, in plain Python (no torch).

Shared by the torch preprocessing (`depthkit.models.preprocess`) and the torch-free ONNX Runtime path
(`depthkit.export.runtime`), so both resize every image to the same size.
"""

from __future__ import annotations

import numpy as np


class UnsupportedImage(ValueError):
    """An image the model cannot take as it is (too elongated, a float image beyond [0, 1], empty): commands that
    run over many images skip and name it; any other error stops them."""


MAX_ASPECT_RATIO = 16
"""Images longer than this many times their width (or wider than this many times their height) are refused: the
short side goes to the input size, so a 4 x 400 strip would become a 518 x 51800 network input (137,000 tokens),
which no device holds."""


def _constrain_to_multiple(x: float, multiple: int, min_val: int) -> int:
    y = int(np.round(x / multiple) * multiple)
    if y < min_val:
        y = int(np.ceil(x / multiple) * multiple)
    return y


def official_resize_hw(height: int, width: int, input_size: int = 518, multiple: int = 14) -> tuple[int, int]:
    """Network input size for an image: keep aspect, short side to about `input_size`, multiples of `multiple`.

    The official `Resize(keep_aspect_ratio=True, ensure_multiple_of=14, resize_method="lower_bound")`, including
    numpy's round-half-to-even.

    Args:
        height: Original height.
        width: Original width.
        input_size: Target of the short side (the official `--input-size`, 518 by default).
        multiple: Patch size.

    Returns:
        (h, w), both multiples of `multiple` and at least `input_size` (rounded up to a multiple).

    Raises:
        ValueError: an empty image, or one whose aspect ratio is beyond `MAX_ASPECT_RATIO`.
    """
    if height <= 0 or width <= 0:
        raise UnsupportedImage(f"image size must be positive, got {height}x{width}")
    if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        raise UnsupportedImage(
            f"a {height}x{width} image is too elongated (beyond {MAX_ASPECT_RATIO}:1): its short side at the input "
            "size would make a network input too large for any device; crop it"
        )
    if input_size <= 0:
        raise ValueError(f"input_size must be positive, got {input_size}")
    scale_height = input_size / height
    scale_width = input_size / width
    if scale_width > scale_height:  # "lower_bound": the side that needs the larger scale decides
        scale_height = scale_width
    else:
        scale_width = scale_height
    new_height = _constrain_to_multiple(scale_height * height, multiple, input_size)
    new_width = _constrain_to_multiple(scale_width * width, multiple, input_size)
    return new_height, new_width
