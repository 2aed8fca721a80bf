"""The teacher: loading it (once, in one function), hashing its weights, and the batched labeling forward.

`load_teacher` is the only place a checkpoint becomes a teacher; a training-checkpoint format (which will carry its
own model name) plugs in there. `label_batch` runs the official Depth Anything preprocessing on a bucket of images
that share one network input size: uint8 images go to the device as they are, are scaled to [0, 1], resized with
the models package's `resize_image` (bicubic, the official `image2tensor`), normalized with the model's metadata,
run under `torch.inference_mode` (optionally in bf16 autocast, optionally with a horizontal-flip pass), and the
predictions are resized back to each image's own size (bilinear, align_corners=True, as the official `infer_image`),
or, with `size="network"`, kept at the network's output size for images larger than it (`label_size`).
`launch_batch` does the same without waiting: on CUDA it queues the work and the copy to the host and returns a
`PendingLabels`, so a caller (the job) launches the next batch before collecting this one.

Confidence (optional, needs the flip pass): with `a` the plain prediction and `b` the un-flipped prediction of the
flipped image, at the network resolution,

    confidence = exp(-|a - b| / s),   s = mean(|m - median(m)|) over the image,   m = (a + b) / 2

so it is 1 where the two passes agree and falls towards 0 where they disagree by more than the image's typical
deviation `s` (the scale the scale-and-shift-invariant loss divides by). It is unitless and invariant to the
scale of the prediction, then resized like the prediction (to its label size, `label_size`).

Shape legend: B batch, H/W an image's original size, h/w the network input size.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from depthkit.models.preprocess import official_resize_hw, resize_image

TTA_MODES = ("none", "hflip")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Teacher:
    """A loaded teacher and where its weights came from."""

    model: torch.nn.Module
    """The `DepthModel`, in eval mode with gradients off (on the CPU until the job moves it)."""
    name: str
    """Registry name."""
    weights_path: str
    """The file that was hashed (a transformers folder's `model.safetensors`)."""
    sha256: str
    """sha256 of `weights_path`: the teacher's identity in provenance and in the index."""


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 16 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def load_teacher(
    model: str | None,
    *,
    checkpoint: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    sha256: str | None = None,
) -> Teacher:
    """Build the teacher and load its weights, or fail with a clear error before any work.

    Args:
        model: Registered model name (`depthkit.models.list_models()`). Optional with a `depthkit fit` checkpoint,
            which names the model it trained (and is then built as trained: `depthkit.models.load_model`).
        checkpoint: A teacher checkpoint: a `depthkit fit` `.ckpt`, official `.pth`, depthkit `.pth`/`.safetensors`
            or a transformers folder; all but the first need `model`.
        weights: Weights for `model` (same formats). Without `checkpoint` and `weights`, the official weights of
            `model` are taken from the local checkpoint folder (never downloaded).
        sha256: The weights' hash when already known (spawned ranks get it from the launcher, so a multi-GB file
            is hashed once per job, not once per process).

    Raises:
        ValueError: No model name where one is needed, both sources given, or weights that do not load.
        FileNotFoundError: A weights path that does not exist, or no local official weights.
    """
    from depthkit.models import load_model
    from depthkit.models.checkpoint import HF_WEIGHTS_NAME, find_pretrained
    from depthkit.models.registry import checkpoint_filename

    if checkpoint is not None and weights is not None:
        raise ValueError("give the teacher as --checkpoint PATH or as --model NAME --weights PATH, not both")
    path = checkpoint if checkpoint is not None else weights
    if path is None:
        if not model:
            raise ValueError("name the teacher with --model NAME (e.g. dav2_vitl) or give its --checkpoint PATH")
        filename = checkpoint_filename(model)  # ValueError for an unknown name
        if filename is None:
            raise FileNotFoundError(f"{model} has no official weights; pass --weights PATH or --checkpoint PATH")
        path = find_pretrained(filename, model)
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"teacher checkpoint not found: {path}")
    net = load_model(model or None, path).requires_grad_(False)  # an unreadable file: a ValueError naming it
    hashed = path / HF_WEIGHTS_NAME if path.is_dir() else path
    return Teacher(model=net, name=net.meta.name, weights_path=str(hashed), sha256=sha256 or file_sha256(hashed))


def network_size(height: int, width: int, resolution: int, patch_size: int) -> tuple[int, int]:
    """The network input size of an image (the official rule: keep aspect, short side to `resolution`)."""
    return official_resize_hw(height, width, resolution, patch_size)


LABEL_SIZES = ("network", "image")


def label_size(image_hw: tuple[int, int], network_hw: tuple[int, int], mode: str = "image") -> tuple[int, int]:
    """The size a label is stored at. "image": the image's own (the official `infer_image` output). "network": the
    network's output for an image larger than it (an SA-1B photo's 1500 x 2250 label is a bilinear upsample of a
    518 x 770 prediction: 8x the pixels to encode, store and decode, no information more), else the image's own.
    The student's transform resizes a label with its image either way."""
    if mode not in LABEL_SIZES:
        raise ValueError(f"label size {mode!r}; expected one of {', '.join(LABEL_SIZES)}")
    if mode == "network" and image_hw[0] * image_hw[1] > network_hw[0] * network_hw[1]:
        return tuple(network_hw)
    return tuple(image_hw)


class PendingLabels:
    """The predictions of one `launch_batch`, on their way to the host; `result()` waits for them.

    On CUDA the device-to-host copy is queued (into pinned memory) behind the forward and `launch_batch` returns at
    once, so the caller can prepare and launch the next batch while this one runs: the GPU is never left waiting for
    the host between batches. On the CPU everything is already done.
    """

    def __init__(self, host: torch.Tensor, shapes: list[torch.Size], event, with_confidence: bool):
        self._host, self._shapes, self._event, self._with_confidence = host, shapes, event, with_confidence

    def done(self) -> bool:
        """Whether the predictions are on the host (`result()` would not wait)."""
        return self._event is None or self._event.query()

    def result(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """One `(prediction_HW, confidence_HW or None)` pair of float32 numpy arrays per image, at its label size.

        The arrays are views of one host buffer per batch (one copy per batch, not one per image)."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        flat = self._host.numpy()
        maps, start = [], 0
        for shape in self._shapes:
            size = shape.numel()
            maps.append(flat[start : start + size].reshape(shape))
            start += size
        if not self._with_confidence:
            return [(pred_HW, None) for pred_HW in maps]
        return list(zip(maps[0::2], maps[1::2], strict=True))


@torch.inference_mode()
def launch_batch(
    model: torch.nn.Module,
    images: list[torch.Tensor],
    size_hw: tuple[int, int],
    *,
    tta: str = "none",
    confidence: bool = False,
    bf16: bool = False,
    size: str = "image",
) -> PendingLabels:
    """Queue the prediction of a bucket of images that share one network input size; see `label_batch`.

    Returns at once on CUDA (the work is queued on the current stream); `PendingLabels.result()` waits for it.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta={tta!r}; expected one of {TTA_MODES}")
    if confidence and tta != "hflip":
        raise ValueError("confidence comes from the flip pass: it needs tta='hflip'")
    if not images:
        raise ValueError("no images to label")
    for i, image in enumerate(images):
        if not (
            isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[2] == 3
        ):
            got = f"{image.dtype} {tuple(image.shape)}" if hasattr(image, "shape") else type(image).__name__
            raise ValueError(f"image {i}: expected a uint8 torch tensor H x W x 3 (as the job decodes), got {got}")
    device = next(model.parameters()).device
    image01_BCHW = torch.stack(
        [
            resize_image(image_HW3.to(device, non_blocking=True).permute(2, 0, 1).float() / 255.0, size_hw)
            for image_HW3 in images
        ]
    )  # B x 3 x h x w, values may overshoot [0, 1] as in the official bicubic resize
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        input_BCHW = model.normalize(image01_BCHW)
        pred_Bhw = model(input_BCHW).float()
        conf_Bhw = None
        if tta == "hflip":
            flipped_Bhw = model(input_BCHW.flip(-1)).float().flip(-1)
            if confidence:
                conf_Bhw = flip_confidence(pred_Bhw, flipped_Bhw)
            pred_Bhw = (pred_Bhw + flipped_Bhw) / 2
    maps = []  # each image's prediction (and confidence) at its label size (`size`), still on the device
    for i, image_HW3 in enumerate(images):
        stored_hw = label_size(tuple(image_HW3.shape[:2]), size_hw, size)
        maps.append(_resize_back(pred_Bhw[i], stored_hw))
        if conf_Bhw is not None:
            maps.append(_resize_back(conf_Bhw[i], stored_hw).clamp_(0, 1))
    flat = torch.cat([m.reshape(-1) for m in maps]).float()
    event = None
    if flat.is_cuda:
        # Pinned memory comes from torch's caching host allocator: freed when the last numpy view of it dies.
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    else:
        host = flat
    return PendingLabels(host, [m.shape for m in maps], event, conf_Bhw is not None)


def label_batch(
    model: torch.nn.Module,
    images: list[torch.Tensor],
    size_hw: tuple[int, int],
    *,
    tta: str = "none",
    confidence: bool = False,
    bf16: bool = False,
    size: str = "image",
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Predict a bucket of images that share one network input size.

    Args:
        model: A `DepthModel` in eval mode, on its device.
        images: uint8 `H x W x 3` tensors (sizes may differ; each maps to `size_hw`), on any device.
        size_hw: The network input size (multiples of the patch size), from `network_size`.
        tta: "none" or "hflip" (average with the un-flipped prediction of the flipped image).
        confidence: Also return the per-pixel confidence (needs tta="hflip"; see the module docstring).
        bf16: Run the model under bf16 autocast (predictions come back float32).
        size: The labels' size (`label_size`): "image" (each image's own) or "network".

    Returns:
        One `(prediction_HW, confidence_HW or None)` pair of float32 numpy arrays per image, at its label size.
    """
    return launch_batch(model, images, size_hw, tta=tta, confidence=confidence, bf16=bf16, size=size).result()


def flip_confidence(pred_Bhw: torch.Tensor, flipped_Bhw: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`exp(-|a - b| / s)` per pixel, `s` the mean absolute deviation of `(a + b) / 2` from its median per image."""
    mean_BN = ((pred_Bhw + flipped_Bhw) / 2).flatten(1)  # B x (h*w)
    median_B1 = mean_BN.median(dim=1, keepdim=True).values
    scale_B11 = (mean_BN - median_B1).abs().mean(dim=1).clamp_min(eps)[:, None, None]
    return torch.exp(-(pred_Bhw - flipped_Bhw).abs() / scale_B11)


def _resize_back(map_hw: torch.Tensor, stored_hw: tuple[int, int]) -> torch.Tensor:
    if tuple(map_hw.shape) == tuple(stored_hw):
        return map_hw
    return F.interpolate(map_hw[None, None], size=stored_hw, mode="bilinear", align_corners=True)[0, 0]
