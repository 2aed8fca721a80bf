"""Per-sample transforms run in DataLoader workers (numpy + OpenCV + albumentations, CPU).

Geometry follows Depth Anything's training pipeline: resize keeping the aspect ratio so both sides reach the
crop size, rounded up to a multiple of the patch size (14), then a random crop (518 by default) and a horizontal
flip. Images are resized bilinearly (area averaging when shrinking more than 2x, bicubic when enlarging); targets
and masks with nearest neighbour, so an invalid pixel never blends into a valid one.

Strong augmentation (unlabeled images only, on CPU workers with albumentations): colour jitter (p=0.8),
greyscale (p=0.2), Gaussian blur (p=0.5). The Depth Anything V1 paper names colour jittering and Gaussian blurring
without values; these are UniMatch's (`ColorJitter(0.5, 0.5, 0.5, 0.25)`, sigma in [0.1, 2]), an assumption.
CutMix is per batch, see `depthkit.data.cutmix`.

The official metric fine-tuning resizes images bicubically at any scale; the bilinear / area choice here is
depthkit's (aliasing-free shrinking); depth and masks match (nearest).

Randomness comes from a generator seeded per sample by `(seed, key, draw)`, where the draw (`__draw__`, set by
`ShardStream`: epoch, global worker, position) differs each time a sample is read again, in a new epoch or a new
draw of a resampled stream, and is the same in a resumed run: it augments each sample exactly as the uninterrupted
run would.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import cv2
import numpy as np

from depthkit.data.shards import png16_target

cv2.setNumThreads(1)  # workers are the parallelism; OpenCV's own threads would oversubscribe the cores


@dataclass(frozen=True, kw_only=True)
class TransformConfig:
    """Geometry and augmentation of training samples.

    Attributes:
        crop_size: Output height and width (multiples of `patch_size`); Depth Anything trains at 518.
        patch_size: Sizes are rounded up to multiples of this.
        random_crop: Random crop for training; False takes the centre crop (validation).
        hflip: Flip horizontally with probability 0.5.
        strong: Also produce `image_strong`, the student's input (unlabeled student data; CutMix mixes it).
        photometric: With `strong`: colour jitter, greyscale and blur make `image_strong`; False leaves it the plain
            crop (CutMix alone).
    """

    crop_size: tuple[int, int] | int = 518
    patch_size: int = 14
    random_crop: bool = True
    hflip: bool = True
    strong: bool = False
    photometric: bool = True

    def __post_init__(self):
        crop = (self.crop_size, self.crop_size) if isinstance(self.crop_size, int) else tuple(self.crop_size)
        object.__setattr__(self, "crop_size", crop)
        if len(crop) != 2 or any(c <= 0 or c % self.patch_size for c in crop):
            raise ValueError(f"crop_size {self.crop_size} must be positive multiples of patch_size {self.patch_size}")


def sample_rng(seed: int, key: str, draw: str = "") -> np.random.Generator:
    """A generator that depends only on `(seed, key, draw)`: augmentation survives resumption unchanged."""
    digest = hashlib.blake2b(f"{seed}/{draw}/{key}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def lower_bound_size(height: int, width: int, min_height: int, min_width: int, multiple: int) -> tuple[int, int]:
    """Size keeping the aspect ratio with both sides >= the minimum, each rounded up to `multiple`."""
    scale = max(min_height / height, min_width / width)
    new_h = max(multiple, math.ceil(height * scale / multiple) * multiple)
    new_w = max(multiple, math.ceil(width * scale / multiple) * multiple)
    return new_h, new_w


def resize_image(image_HW3: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear, or area averaging when shrinking by more than 2x (aliasing); bicubic when enlarging."""
    factor = min(height / image_HW3.shape[0], width / image_HW3.shape[1])
    interpolation = cv2.INTER_CUBIC if factor > 1 else (cv2.INTER_LINEAR if factor >= 0.5 else cv2.INTER_AREA)
    return cv2.resize(image_HW3, (width, height), interpolation=interpolation)


def resize_nearest(map_HW: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize (pixel centres aligned) for targets and masks: no blending of invalid pixels."""
    if map_HW.shape == (height, width):
        return map_HW
    if map_HW.dtype == bool:
        return resize_nearest(map_HW.view(np.uint8), height, width).view(bool)
    return cv2.resize(map_HW, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)


class StrongAugment:
    """Colour jitter, greyscale and blur for unlabeled images (albumentations, uint8 in and out)."""

    def __init__(self):
        import albumentations as A

        self.compose = A.Compose(
            [
                A.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25, p=0.8),
                A.ToGray(p=0.2),
                A.GaussianBlur(sigma_limit=(0.1, 2.0), blur_limit=0, p=0.5),
            ]
        )

    def __call__(self, image_HW3: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        self.compose.set_random_seed(int(rng.integers(2**31)))
        return self.compose(image=image_HW3)["image"]


class SampleTransform:
    """Resize, crop, flip (and strong augmentation) of one decoded sample.

    Input and output are sample dicts (see `depthkit.data.shards.decode_sample`); `image` stays uint8 `H×W×3`,
    `target` float32 and `valid` bool `H×W`. `image_strong` is added when the config asks for it. An input with
    `target_steps` (png16 steps) is converted to `target` and `valid` after the crop, on the crop's pixels only.
    """

    takes_target_steps = True  # so ShardStream decodes png16 targets with `target_steps=True`

    def __init__(self, config: TransformConfig, *, seed: int = 0):
        self.config, self.seed = config, seed
        self._strong = StrongAugment() if config.strong and config.photometric else None

    def __call__(self, sample: dict) -> dict:
        cfg = self.config
        rng = sample_rng(self.seed, sample["__key__"], sample.get("__draw__", ""))
        crop_h, crop_w = cfg.crop_size
        image_HW3 = sample["image"]
        h, w = lower_bound_size(*image_HW3.shape[:2], crop_h, crop_w, cfg.patch_size)
        if cfg.random_crop:
            top, left = int(rng.integers(h - crop_h + 1)), int(rng.integers(w - crop_w + 1))
        else:
            top, left = (h - crop_h) // 2, (w - crop_w) // 2
        flip = cfg.hflip and bool(rng.random() < 0.5)
        window = (slice(top, top + crop_h), slice(left, left + crop_w, None))

        def geometry(map_HW):
            out = resize_nearest(map_HW, h, w)[window]
            return out[:, ::-1] if flip else out  # a view: collate's np.stack (or png16_target) makes the one copy

        out = dict(sample)
        crop_HW3 = resize_image(image_HW3, h, w)[window]
        # cv2.flip copies whole pixels; np.stack on a flipped H×W×3 view would copy byte by byte, ~20x slower
        out["image"] = cv2.flip(crop_HW3, 1) if flip else crop_HW3
        for name in ("target", "valid", "target_steps", "sky"):
            if name in sample:
                out[name] = geometry(sample[name])
        if "target_steps" in out:
            out["target"], out["valid"] = png16_target(out.pop("target_steps"), sample["meta"]["target_scale"])
        if self._strong is not None:
            out["image_strong"] = self._strong(out["image"], rng)
        elif cfg.strong:
            out["image_strong"] = out["image"]  # collate stacks it apart; CutMix then mixes it alone
        return out
