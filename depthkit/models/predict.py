"""`depthkit predict`: run a model over image files and write colorized PNG / 16-bit PNG / .npy outputs.

Outputs, per input image `<name>` (the path relative to the folder it was found in, or the file stem):

- `<name>_color.png`: 8-bit RGB, the prediction through a perceptual colormap (matplotlib "inferno" by default),
  min-max normalized per image; near is bright (metric depth is inverted first).
- `<name>_16bit.png`: 16-bit greyscale. Relative models: min-max normalized per image to 0..65535 (near = high),
  with the min and max stored in the PNG text chunk `depthkit` (JSON), so values = min + png / 65535 * (max - min).
  Metric models: metres * 256, rounded and clipped to 0..65535 (the KITTI convention; up to 255.99 m).
- `<name>.npy`: the float32 prediction itself, in the model's output space.

Files are written under a temporary name and renamed, so an interrupted run never leaves half a file.
Bad images (unreadable, not an image, or not for the model: too elongated, a float image beyond [0, 1]) are reported
by name and skipped.
"""

from __future__ import annotations

import glob
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from depthkit._files import replacing
from depthkit.colors import colorize
from depthkit.models.sizing import UnsupportedImage
from depthkit.spaces import METRIC_DEPTH

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".gif")
SAVE_KINDS = ("color", "png16", "npy")
METRIC_PNG16_SCALE = 256.0
PNG_COMPRESS_LEVEL = 3  # zlib level: about twice as fast as PIL's default 6, files about 10-30% larger


@dataclass(frozen=True)
class InputImage:
    """An image file and the output name stem (relative, no suffix) its outputs get."""

    path: Path
    name: str


def collect_inputs(inputs: Sequence[str]) -> list[InputImage]:
    """Expand files, folders (recursive, by image suffix) and glob patterns into a de-duplicated, ordered list.

    Raises:
        FileNotFoundError: An input that is neither a file, a folder nor a glob that matches something.
    """
    found: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            found += [(p, p.relative_to(path).with_suffix("").as_posix()) for p in files]
        elif path.is_file():
            found.append((path, path.stem))
        elif glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(item), recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                raise FileNotFoundError(f"no files match {item!r}")
            found += [(m, m.stem) for m in files]
        else:
            raise FileNotFoundError(f"input not found: {item}")
    seen: set[Path] = set()
    unique = []
    for path, name in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((path, name))
    # Two inputs with the same output name (a.jpg + a.png, or x/a.jpg + y/a.jpg given as files): keep them apart.
    counts: dict[str, int] = {}
    for _, name in unique:
        counts[name] = counts.get(name, 0) + 1
    result, used = [], set()
    for path, name in unique:
        if counts[name] > 1:
            name = f"{name}_{path.suffix.lstrip('.').lower()}"
        base, k = name, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        result.append(InputImage(path, name))
    return result


def read_image(path: Path) -> np.ndarray:
    """RGB `H x W x 3` (see `pil_to_rgb`), EXIF orientation applied."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return pil_to_rgb(ImageOps.exif_transpose(image))


def pil_to_rgb(image) -> np.ndarray:
    """A PIL image as an RGB numpy `H x W x 3`: uint8, except float32 for a float image (mode F, whose values the
    models take in [0, 1]). Greyscale, palette and RGBA images become RGB; 16- and 32-bit integer greyscale is
    scaled to 8 bits by its maximum, never clipped (PIL's own conversion clips it to white, or a float to black)."""
    from PIL import Image

    if image.mode == "F":
        return np.repeat(np.asarray(image, dtype=np.float32)[:, :, None], 3, axis=2)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        array = array / max(array.max(), 1.0) * 255.0
        image = Image.fromarray(array.clip(0, 255).round().astype(np.uint8))
    return np.asarray(image.convert("RGB"))


def check_unit_range(low: float, high: float) -> None:
    """An `UnsupportedImage` (a `ValueError`) unless a float image's values (its minimum and maximum) lie in [0, 1];
    NaN fails too. The torch and the ONNX `infer` share it: a 0-255 float image would otherwise give a silent wrong
    prediction."""
    if not (low >= -1e-3 and high <= 1 + 1e-3):
        raise UnsupportedImage(
            f"a float image must hold values in [0, 1], this one spans [{low:g}, {high:g}]"
            + (" (a 0-255 image? pass it as uint8, or divide by 255)" if high > 1.5 else "")
        )


def colorize_nearness(values: np.ndarray, output_space: str, cmap: str = "inferno") -> np.ndarray:
    """uint8 RGB `H x W x 3`: per-image min-max, near bright (metric depth inverted), through `cmap`."""
    nearness = -values if output_space == METRIC_DEPTH else values
    finite = nearness[np.isfinite(nearness)]  # one NaN or inf would spoil the limits of the whole picture
    limits = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    return colorize(nearness, cmap=cmap, limits=limits)


def to_png16(values: np.ndarray, output_space: str) -> tuple[np.ndarray, dict]:
    """uint16 `H x W` and the metadata that says how to read it back (see the module docstring)."""
    if output_space == METRIC_DEPTH:
        encoded = np.clip(np.round(values.astype(np.float64) * METRIC_PNG16_SCALE), 0, 65535).astype(np.uint16)
        return encoded, {"output_space": output_space, "scale": METRIC_PNG16_SCALE, "meaning": "metres = png / scale"}
    lo, hi = float(np.min(values)), float(np.max(values))
    scaled = (values.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(values.shape)
    encoded = np.round(scaled * 65535).astype(np.uint16)
    return encoded, {
        "output_space": output_space,
        "min": lo,
        "max": hi,
        "meaning": "values = min + png / 65535 * (max - min)",
    }


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as handle:
        write(handle)


def write_outputs(
    values: np.ndarray, output_space: str, out_dir: Path, name: str, save: Iterable[str], cmap: str = "inferno"
) -> list[Path]:
    """Write the requested outputs of one prediction; returns the paths written."""
    from PIL import Image, PngImagePlugin

    written = []
    for kind in save:
        if kind == "color":
            path = out_dir / f"{name}_color.png"
            image = Image.fromarray(colorize_nearness(values, output_space, cmap))
            _atomic_write(path, lambda f, im=image: im.save(f, format="PNG", compress_level=PNG_COMPRESS_LEVEL))
        elif kind == "png16":
            path = out_dir / f"{name}_16bit.png"
            encoded, info = to_png16(values, output_space)
            png_info = PngImagePlugin.PngInfo()
            png_info.add_text("depthkit", json.dumps(info))
            image = Image.fromarray(encoded)
            _atomic_write(
                path,
                lambda f, im=image, pi=png_info: im.save(
                    f, format="PNG", pnginfo=pi, compress_level=PNG_COMPRESS_LEVEL
                ),
            )
        elif kind == "npy":
            path = out_dir / f"{name}.npy"
            _atomic_write(path, lambda f: np.save(f, values.astype(np.float32, copy=False)))
        else:
            raise ValueError(f"unknown output kind {kind!r}; expected some of {', '.join(SAVE_KINDS)}")
        written.append(path)
    return written


def parse_save(text: str) -> list[str]:
    """Parse "color,png16,npy" into ["color", "png16", "npy"], with a `ValueError` for unknown kinds."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in SAVE_KINDS]
    if bad or not kinds:
        raise ValueError(f"--save {text!r}: expected a comma-separated subset of {', '.join(SAVE_KINDS)}")
    return list(dict.fromkeys(kinds))


def run_predict(
    predict: Callable[[list[np.ndarray]], list],
    inputs: list[InputImage],
    out_dir: Path,
    save: Sequence[str],
    chunk_size: int,
    cmap: str = "inferno",
    progress: bool = True,
) -> tuple[int, list[str]]:
    """Read, predict and write in chunks. `predict` maps a list of uint8 RGB images to `Prediction`s.

    Returns:
        (number of images written, messages about the skipped ones).
    """
    from tqdm import tqdm

    skipped: list[str] = []
    num_written = 0
    bar = tqdm(total=len(inputs), unit="img", desc="predict", disable=not progress, file=sys.stderr)

    def skip(item: InputImage, err: Exception) -> None:
        skipped.append(f"{item.path}: {type(err).__name__}: {err}")
        bar.write(f"skipped {skipped[-1]}", file=sys.stderr)
        bar.update(1)

    try:
        for start in range(0, len(inputs), chunk_size):
            chunk = inputs[start : start + chunk_size]
            images, good = [], []
            for item in chunk:
                try:
                    images.append(read_image(item.path))
                    good.append(item)
                except Exception as err:  # noqa: BLE001 - any unreadable file is reported and skipped
                    skip(item, err)
            if not images:
                continue
            try:
                predicted = list(zip(good, predict(images), strict=True))
            except UnsupportedImage:  # an image the model cannot take (too elongated, a float image beyond [0, 1])
                predicted = []
                for item, image in zip(good, images, strict=True):
                    try:
                        predicted.append((item, predict([image])[0]))
                    except UnsupportedImage as err:
                        skip(item, err)
            for item, prediction in predicted:
                write_outputs(prediction.values, prediction.output_space, out_dir, item.name, save, cmap)
                num_written += 1
                bar.update(1)
    finally:
        bar.close()
    return num_written, skipped
