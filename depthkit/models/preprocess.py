"""Image preprocessing for inference, the official Depth Anything way, in torch.

The official `image2tensor` resizes with `Resize(width=S, height=S, keep_aspect_ratio=True, ensure_multiple_of=14,
resize_method="lower_bound", image_interpolation_method=cv2.INTER_CUBIC)` on float images in [0, 1], then applies
the ImageNet normalization. `official_resize_hw` reproduces its size rule exactly (including numpy's round-half-to-
even); `resize_image` uses torch's bicubic (a = -0.75, half-pixel centres, no antialiasing, no clamping), which is
OpenCV's INTER_CUBIC kernel.

Shape legend: C channels, H/W original size, h/w resized size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from depthkit.models.sizing import official_resize_hw  # noqa: F401 (re-exported)


def to_float_chw(image) -> torch.Tensor:
    """One image as a float32 `C x H x W` RGB tensor in [0, 1] (on the CPU unless a tensor came in elsewhere).

    Accepts a uint8 (or float in [0, 1]) numpy array `H x W`, `H x W x 1`, `H x W x 3` or `H x W x 4` (alpha is
    dropped), a PIL image (converted to RGB), or a torch tensor `C x H x W` (uint8, or float in [0, 1]; C 1 or 3).
    Pixels are taken as given: EXIF orientation is not applied here (`depthkit predict` applies it when reading).

    Raises:
        ValueError: an unsupported type, shape or dtype, an empty image, or a float image outside [0, 1] (or NaN).
    """
    if isinstance(image, torch.Tensor):
        tensor_CHW = image
        if tensor_CHW.ndim == 2:
            tensor_CHW = tensor_CHW.unsqueeze(0)
        if tensor_CHW.ndim != 3 or tensor_CHW.shape[0] not in (1, 3):
            raise ValueError(f"a tensor image must be C x H x W with C 1 or 3, got shape {tuple(image.shape)}")
    else:
        if not isinstance(image, np.ndarray):
            try:
                from PIL import Image
            except ImportError:  # pragma: no cover - pillow is a dependency
                Image = None
            if Image is not None and isinstance(image, Image.Image):
                from depthkit.models.predict import pil_to_rgb

                image = pil_to_rgb(image)
            else:
                raise ValueError(f"unsupported image type {type(image).__name__}; pass numpy, PIL or torch")
        array = image
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ValueError(f"a numpy image must be H x W x C with C 1, 3 or 4, got shape {image.shape}")
        tensor_CHW = torch.from_numpy(np.array(array[:, :, :3])).permute(2, 0, 1)  # copy: PIL arrays are read-only
    if tensor_CHW.dtype == torch.uint8:
        tensor_CHW = tensor_CHW.float() / 255.0
    elif tensor_CHW.is_floating_point():
        tensor_CHW = tensor_CHW.float()
        if tensor_CHW.numel():
            from depthkit.models.predict import check_unit_range

            low, high = tensor_CHW.aminmax()
            check_unit_range(float(low), float(high))
    else:
        raise ValueError(f"image dtype {tensor_CHW.dtype} is not uint8 or float")
    if tensor_CHW.shape[0] == 1:
        tensor_CHW = tensor_CHW.expand(3, -1, -1)
    if 0 in tensor_CHW.shape[1:]:
        raise ValueError(f"empty image of shape {tuple(tensor_CHW.shape)}")
    return tensor_CHW


def resize_image(image_CHW: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize (OpenCV INTER_CUBIC semantics; values may overshoot [0, 1] as in the official pipeline)."""
    if tuple(image_CHW.shape[-2:]) == tuple(size_hw):
        return image_CHW
    return F.interpolate(image_CHW[None], size=size_hw, mode="bicubic", align_corners=False, antialias=False)[0]
