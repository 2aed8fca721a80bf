"""Decoders for images and the zoo of real depth encodings.

Every decoder returns `(target_HW float32, valid_HW bool, output_space)`. Metric sources decode to metres.
Invalid pixels hold 0 in `target` and False in `valid`; callers never see NaN or inf.

Supported `depth_format` names (the manifest's column, see `docs/data.md`):

| name | file | decoding |
| --- | --- | --- |
| `uint16_png` | 16-bit PNG | `value * scale` metres (mm: 0.001, KITTI: 1/256, TUM: 1/5000) |
| `uint16_png_sun_bitrotated` | 16-bit PNG | SUN RGB-D: `v = (v >> 3) | (v << 13)` in uint16, then `* scale` |
| `nyu_raw_kinect_disparity_pgm` | PGM, little-endian samples | `351.3 / (1092.5 - raw)` metres, raw >= 2047 invalid |
| `npz_float32_disparity_px` | .npz (first array) | disparity in px; metric with `B*f/(disp+doffs)` |
| `pfm_disparity_px` | .pfm | as above, Middlebury's own float format |
| `npy_float32` / `npz_float32` | .npy / .npz | `value * scale` (scale 1 for metres) |
| `tiff_float32` / `exr_float32` | .tif(f) / .exr | `value * scale`; EXR needs OpenCV built with OpenEXR |
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from depthkit.spaces import DISPARITY, METRIC_DEPTH

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".webp", ".tif", ".tiff")


def image_from_bytes(data: bytes, *, name: str = "<bytes>", rotated: bool = True) -> np.ndarray:
    """Decode an 8-bit image to RGB uint8 `H×W×3`, honouring EXIF orientation.

    Greyscale becomes three equal channels; alpha is dropped (composited on black would change pixels that
    a depth label refers to, so we keep the colour values as they are). `rotated=False` refuses an image whose EXIF
    orientation asks for a rotation or flip: the half of an RGB-D pair whose depth map carries no such tag.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                raise ValueError(f"{name}: image mode {img.mode} is not an 8-bit colour image")
            if (orientation := img.getexif().get(0x0112, 1)) != 1:
                if not rotated:
                    raise ValueError(
                        f"{name}: its EXIF orientation ({orientation}) rotates or flips it for display, and whether "
                        "its depth map follows is unknown; save the pair with the rotation applied to both, or "
                        "without the tag"
                    )
                img = ImageOps.exif_transpose(img)
            # the common case (plain RGB, no rotation) decodes straight into the array, without PIL copies
            rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except (OSError, Image.DecompressionBombError, SyntaxError) as err:
        detail = "not an image format PIL reads" if isinstance(err, UnidentifiedImageError) else err
        raise ValueError(f"{name}: cannot decode image ({detail})") from err
    return np.ascontiguousarray(rgb)


def load_image(path: str | Path, *, rotated: bool = True) -> np.ndarray:
    """Read an image file as RGB uint8 `H×W×3` (`rotated`: see `image_from_bytes`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return image_from_bytes(path.read_bytes(), name=str(path), rotated=rotated)


def load_mask(path: str | Path) -> np.ndarray:
    """Read a mask image as bool `H×W`: True where a pixel is not zero (1-bit, greyscale, 16-bit, palette by colour,
    RGB by any channel; alpha is ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask not found: {path}")
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":  # its ringing turns the pixels next to an edge non-zero: false sky
                raise ValueError(f"mask {path} is a JPEG (lossy: its edges grow); save masks as PNG")
            if img.mode in ("P", "PA", "RGBA", "LA"):
                img = img.convert("L" if img.mode == "LA" else "RGB")
            values = np.asarray(img)
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot decode mask {path} ({err})") from None
    return values.any(axis=-1) if values.ndim == 3 else values != 0


# ---------------------------------------------------------------------------------------------------------------
# Depth encodings
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DepthCodec:
    """How one source stores its depth, parsed from a manifest row.

    Attributes:
        depth_format: One of `DEPTH_FORMATS`.
        scale: Multiplier from stored values to metres (or to the output unit for disparity sources).
        invalid_values: Stored values that mark invalid pixels (besides non-finite and non-positive results).
        disparity_to_depth: `(numerator, offset)` for disparity sources: `depth = numerator / (disp + offset)`,
            in the unit `scale` converts to metres. None keeps the map as disparity.
    """

    depth_format: str
    scale: float = 1.0
    invalid_values: tuple[float, ...] = ()
    disparity_to_depth: tuple[float, float] | None = None


def _png16(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise ValueError(f"{path}: expected a 16-bit PNG depth map, got image mode {img.mode}")
        value = np.asarray(img)
    if value.dtype != np.uint16:
        if value.min(initial=0) < 0 or value.max(initial=0) > 65535:
            raise ValueError(f"{path}: 16-bit PNG holds values outside 0..65535")
        value = value.astype(np.uint16)
    return value


def _nyu_raw_pgm(path: Path) -> np.ndarray:
    """Raw NYU Kinect PGM: the header says 16-bit big-endian, the samples are little-endian."""
    data = path.read_bytes()
    match = re.match(rb"P5\s+(\d+)\s+(\d+)\s+(\d+)\s", data)
    if match is None:
        raise ValueError(f"{path}: not a binary PGM (P5) file")
    width, height, maxval = (int(g) for g in match.groups())
    if maxval < 256:
        raise ValueError(f"{path}: PGM maxval {maxval} is 8-bit; raw Kinect disparity is 16-bit")
    count = width * height
    if len(data) - match.end() < 2 * count:
        raise ValueError(f"{path}: PGM is truncated ({len(data) - match.end()} bytes for {width}x{height} samples)")
    return np.frombuffer(data, "<u2", count, match.end()).reshape(height, width)


def _read_pfm(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        header = f.readline().strip()
        if header not in (b"Pf", b"PF"):
            raise ValueError(f"{path}: not a PFM file")
        width, height = (int(v) for v in f.readline().split())
        scale = float(f.readline().strip())
        channels = 3 if header == b"PF" else 1
        data = np.fromfile(f, dtype="<f4" if scale < 0 else ">f4", count=width * height * channels)
    if data.size != width * height * channels:
        raise ValueError(f"{path}: PFM is truncated")
    data = data.reshape(height, width, channels)[..., 0]
    return np.flipud(data).astype(np.float32)  # PFM rows go bottom to top


def _first_npz_array(path: Path) -> np.ndarray:
    with np.load(path) as npz:
        if not npz.files:
            raise ValueError(f"{path}: .npz holds no array")
        return np.asarray(npz[npz.files[0]])


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    return np.asarray(tifffile.imread(path))


def _read_exr(path: Path) -> np.ndarray:
    import os

    os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")
    import cv2

    value = cv2.imread(str(path), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_UNCHANGED)
    if value is None:
        raise ValueError(f"{path}: OpenCV could not read this EXR (it may lack OpenEXR support)")
    return value if value.ndim == 2 else value[..., 0]


def _sun_bitrotate(value: np.ndarray) -> np.ndarray:
    value = value.astype(np.uint16)
    return (value >> 3) | (value << 13)


# depth_format -> (reader, how the stored value becomes raw units before `scale`)
_READERS: dict[str, Callable[[Path], np.ndarray]] = {
    "uint16_png": _png16,
    "uint16_png_sun_bitrotated": lambda p: _sun_bitrotate(_png16(p)),
    "nyu_raw_kinect_disparity_pgm": _nyu_raw_pgm,
    "npz_float32_disparity_px": _first_npz_array,
    "pfm_disparity_px": _read_pfm,
    "npy_float32": np.load,
    "npz_float32": _first_npz_array,
    "tiff_float32": _read_tiff,
    "exr_float32": _read_exr,
}
DEPTH_FORMATS = tuple(_READERS)
DISPARITY_FORMATS = ("npz_float32_disparity_px", "pfm_disparity_px")

# File signatures: a depth file is checked to be the container its depth_format reads before it is decoded, so a
# wrong depth_format is an error naming both, not garbage (a PNG read as EXR by OpenCV gives numbers) or a
# reader's confusing message.
_SIGNATURES = {
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "PGM": (b"P5",),
    "NPZ (zip)": (b"PK\x03\x04", b"PK\x05\x06"),
    "PFM": (b"PF", b"Pf"),
    "NPY": (b"\x93NUMPY",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
    "EXR": (b"\x76\x2f\x31\x01",),
    "JPEG": (b"\xff\xd8\xff",),
}
_CONTAINER = {
    "uint16_png": "PNG",
    "uint16_png_sun_bitrotated": "PNG",
    "nyu_raw_kinect_disparity_pgm": "PGM",
    "npz_float32_disparity_px": "NPZ (zip)",
    "pfm_disparity_px": "PFM",
    "npy_float32": "NPY",
    "npz_float32": "NPZ (zip)",
    "tiff_float32": "TIFF",
    "exr_float32": "EXR",
}


def _container(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(8)
    return next((name for name, magics in _SIGNATURES.items() if head.startswith(magics)), None)


def read_depth_raw(path: str | Path, depth_format: str) -> np.ndarray:
    """Read a depth file's stored values (after SUN bit rotation) without scaling."""
    if depth_format not in _READERS:
        raise ValueError(f"unknown depth_format {depth_format!r}; expected one of {', '.join(DEPTH_FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"depth file not found: {path}")
    expected, found = _CONTAINER[depth_format], _container(path)
    if found != expected:
        raise ValueError(
            f"{path}: depth_format {depth_format} reads {expected} files, but this is "
            f"{'a ' + found + ' file' if found else 'not one'}"
        )
    try:
        value = _READERS[depth_format](path)
    except (OSError, EOFError, ValueError, TypeError, KeyError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: cannot decode depth as {depth_format} ({err})") from err
    if value.ndim != 2:
        raise ValueError(f"{path}: depth must be a single-channel map, got shape {value.shape}")
    return value


def decode_depth(path: str | Path, codec: DepthCodec) -> tuple[np.ndarray, np.ndarray, str]:
    """Decode a depth file to `(target_HW float32, valid_HW bool, output_space)`."""
    raw_HW = read_depth_raw(path, codec.depth_format)
    value_HW = raw_HW.astype(np.float64)
    invalid_HW = ~np.isfinite(value_HW)
    for bad in codec.invalid_values:
        invalid_HW |= np.isnan(value_HW) if np.isnan(bad) else (value_HW == bad)

    space = METRIC_DEPTH
    with np.errstate(divide="ignore", invalid="ignore"):
        if codec.depth_format == "nyu_raw_kinect_disparity_pgm":
            invalid_HW |= raw_HW >= 2047
            value_HW = 351.3 / (1092.5 - value_HW)
        elif codec.depth_format in DISPARITY_FORMATS:
            if codec.disparity_to_depth is None:
                space = DISPARITY
            else:
                numerator, offset = codec.disparity_to_depth
                value_HW = numerator / (value_HW + offset)
        value_HW = value_HW * codec.scale
    invalid_HW |= ~np.isfinite(value_HW) | (value_HW <= 0)
    target_HW = np.where(invalid_HW, 0.0, value_HW).astype(np.float32)
    return target_HW, ~invalid_HW, space


# ---------------------------------------------------------------------------------------------------------------
# Manifest fields
# ---------------------------------------------------------------------------------------------------------------

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_DISPARITY_FORMULA = re.compile(
    rf"^\s*depth_(?P<unit>mm|m)\s*=\s*(?P<a>{_NUMBER})\s*\*\s*(?P<b>{_NUMBER})\s*/\s*"
    rf"\(\s*disp\s*\+\s*(?P<offset>{_NUMBER})\s*\)(?=\s*(?:\(|$))"  # then nothing, or a (comment)
)
_LEADING_SCALE = re.compile(rf"^\s*(?P<num>{_NUMBER})(?:\s*/\s*(?P<den>{_NUMBER}))?(?=\s|\(|$)")


def parse_codec(depth_format: str, scale_field: str, invalid_field: str, *, where: str) -> DepthCodec:
    """Parse a manifest row's `depth_format`, `scale_to_metres` and `invalid` fields.

    `scale_to_metres` is a number or a fraction (`0.001`, `1/256`), optionally followed by a comment
    (`0.0002 (v/5000)`). Disparity sources give `depth_mm = B*f/(disp+doffs)` to become metric, or leave it
    empty to stay disparity. `nyu_raw_kinect_disparity_pgm` has its conversion built in, so free text is fine.
    `invalid` is empty, a number, several numbers separated by `;`, `NaN`, or free text for formats whose
    invalid rule is built in.
    """
    depth_format = depth_format.strip()
    if depth_format not in _READERS:
        raise ValueError(f"{where}: unknown depth_format {depth_format!r}; expected one of {', '.join(DEPTH_FORMATS)}")
    scale, disparity_to_depth = 1.0, None
    if depth_format in DISPARITY_FORMATS:
        match = _DISPARITY_FORMULA.match(scale_field)
        if match:
            unit = 1e-3 if match["unit"] == "mm" else 1.0
            disparity_to_depth = (float(match["a"]) * float(match["b"]), float(match["offset"]))
            scale = unit
        elif scale_field.strip():
            raise ValueError(
                f"{where}: scale_to_metres {scale_field!r} for a disparity source must read "
                "'depth_mm = BASELINE*F/(disp+DOFFS)' (or be empty to keep disparity)"
            )
    elif depth_format != "nyu_raw_kinect_disparity_pgm":
        match = _LEADING_SCALE.match(scale_field)
        if not match:
            raise ValueError(f"{where}: scale_to_metres {scale_field!r} is not a number or fraction like 1/256")
        denominator = float(match["den"]) if match["den"] else 1.0
        scale = float(match["num"]) / denominator if denominator else float("nan")
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError(f"{where}: scale_to_metres must be positive, got {scale_field!r}")

    invalid_values: list[float] = []
    text = invalid_field.strip()
    if text and depth_format != "nyu_raw_kinect_disparity_pgm":
        for part in text.split(";"):
            part = part.strip()
            if part.lower() == "nan":
                invalid_values.append(float("nan"))
                continue
            try:
                invalid_values.append(float(part))
            except ValueError:
                raise ValueError(f"{where}: invalid {invalid_field!r} is not a number, 'NaN' or a ';' list") from None
    return DepthCodec(
        depth_format=depth_format,
        scale=scale,
        invalid_values=tuple(invalid_values),
        disparity_to_depth=disparity_to_depth,
    )
