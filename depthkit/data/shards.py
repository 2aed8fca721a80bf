"""The depthkit shard format: encoding and decoding of samples, writers, shard lists (the tar reading itself is
`depthkit.data.tar_reader`).

Shards are plain POSIX tar files in WebDataset layout, so `tar tf` and plain `webdataset` open them. Each sample
is a group of members sharing a key (the part of the name before the first dot):

| member | kinds | content |
| --- | --- | --- |
| `KEY.jpg` / `KEY.png` / `KEY.webp` | labeled, unlabeled | 8-bit RGB image (source bytes kept when they are RGB) |
| `KEY.target.png` | labeled, pseudo | uint16 PNG: `target = value * meta["target_scale"]`; 0 = invalid |
| `KEY.target.npz` | labeled, pseudo | float32 `target` (zlib, lossless; or float16), or its byte planes; NaN invalid |
| `KEY.valid.png` | optional | 8-bit mask (0 invalid, 255 valid) when validity is not carried by the target |
| `KEY.sky.png` | optional, labeled | 8-bit mask (255 sky): unlabeled sky pixels train as disparity 0 (farthest) |
| `KEY.json` | all | metadata, see below |

Metadata (`KEY.json`): `format_version`, `kind` (`labeled`, `unlabeled`, `pseudo`), `source`, `licence`, and for
targets `output_space` (`metric_depth` in metres, `disparity`, `affine_disparity`), `target_encoding` (`png16`
or `npz`), `target_scale` (png16 only: the unit of one step, metres for metric depth), `intrinsics` where known.
Pseudo-labels add `provenance` (teacher checkpoint hash, model name, resolution, TTA, depthkit version, time).

A labeled sample's target is stored as png16 when that is exact (integer-coded sources such as mm PNGs), else as
npz; see `encode_target`. Pseudo-labels (a network's float32 output) are stored as byte planes in the npz: arrays
`target_hi` (the two high bytes of each little-endian float32, as `2 x H x W` uint8, deflated) and `target_lo` (the
two low bytes, stored: mantissa noise deflate cannot shrink), so `target = stack(lo0, lo1, hi0, hi1).view(float32)`;
lossless, about 5x faster to write and 2.5x to read than the deflated float32 array, and 20% smaller. Writers write
`STEM.HOST-PID.tar.tmp` and rename, so a crash never leaves a half shard.
"""

from __future__ import annotations

import glob
import io
import json
import os
import socket
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from depthkit._files import naming_errors, read_json_object
from depthkit.data.formats import image_from_bytes
from depthkit.spaces import check_space

FORMAT_VERSION = 1
KINDS = ("labeled", "unlabeled", "pseudo")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


WRITING_MARKER = ".depthkit-writing"
"""A file depthkit's dataset writers keep in their folder until its `index.json` is written (see `shard_paths`)."""
INDEX_NAME = "index.json"
"""What depthkit's writers leave beside their shards, last: kind, sample counts per shard (`folder_index`)."""


class ShardFormatError(ValueError):
    """A shard member is missing, undecodable or inconsistent; the message names the shard and key."""


# ---------------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------------


def encode_mask(mask_HW, *, like: np.ndarray, what: str) -> bytes:
    """A bool mask the size of `like` as an 8-bit PNG (0 / 255)."""
    mask_HW = np.asarray(mask_HW, dtype=bool)
    if mask_HW.shape != like.shape:
        raise ValueError(f"{what} is {mask_HW.shape}, the target {like.shape}")
    buf = io.BytesIO()
    Image.fromarray(mask_HW.astype(np.uint8) * 255).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_image(image_HW3: np.ndarray, *, fmt: str = "png", quality: int = 95) -> bytes:
    """Encode an RGB uint8 image as PNG (lossless) or JPEG."""
    if image_HW3.dtype != np.uint8 or image_HW3.ndim != 3 or image_HW3.shape[2] != 3:
        raise ValueError(f"image must be uint8 HxWx3, got {image_HW3.dtype} {image_HW3.shape}")
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image_HW3).save(buf, format="PNG", compress_level=1)
    elif fmt in ("jpg", "jpeg"):
        Image.fromarray(image_HW3).save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"image format {fmt!r}; expected 'png' or 'jpg'")
    return buf.getvalue()


def source_image_bytes(path: Path) -> tuple[str, bytes] | None:
    """The file's own bytes and extension when it is an 8-bit RGB JPEG/PNG/WebP without EXIF rotation."""
    ext = path.suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTENSIONS:
        return None
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            orientation = img.getexif().get(0x0112, 1)
            if img.mode != "RGB" or orientation != 1:
                return None
    except OSError:
        return None
    return ("jpg" if ext == "jpeg" else ext), data


def encode_target(
    target_HW: np.ndarray,
    valid_HW: np.ndarray,
    *,
    scale: float | None = None,
    half: bool = False,
    planes: bool = False,
    compress_level: int = 6,
) -> tuple[str, bytes]:
    """Encode a target map; returns `(extension, bytes)`. Lossless unless `half`.

    With `scale`, the map is stored as uint16 PNG when every valid value is an integer multiple of `scale` in
    1..65535 (so decoding gives back exactly the same float32 values); otherwise, or without `scale`, as a
    compressed `.npz` with NaN at invalid pixels.

    Args:
        target_HW: The map (float32 after conversion).
        valid_HW: Its valid pixels.
        scale: The png16 step, when the map may be integer-coded.
        half: Store the npz array as float16 (rounded to 11 significant bits: relative error <= 2^-11 = 4.9e-4
            from 6.1e-5 to 65504, absolute <= 3e-8 below), or as float32 when a valid value exceeds 65504.
        planes: Store the float32 npz array as byte planes (module docstring): for maps with noisy low mantissa bits
            (network outputs); exact, integer-like maps deflate better whole.
        compress_level: zlib level of the PNG or npz, 0-9: 6 for archives; 1 writes float32 about 1.5x and PNG
            about 5x faster, a few percent bigger.
    """
    target_HW = np.asarray(target_HW, dtype=np.float32)
    valid_HW = np.asarray(valid_HW, dtype=bool)
    if target_HW.shape != valid_HW.shape or target_HW.ndim != 2:
        raise ValueError(f"target {target_HW.shape} and valid {valid_HW.shape} must be equal 2-D shapes")
    if scale is not None:
        steps = np.rint(target_HW.astype(np.float64) / scale)
        in_range = (steps >= 1) & (steps <= 65535)
        exact = np.float32(steps * scale) == target_HW  # the decoder computes float32(value * scale)
        if np.all(~valid_HW | (in_range & exact)):
            value = np.where(valid_HW, steps, 0).astype(np.uint16)
            buf = io.BytesIO()
            Image.fromarray(value).save(buf, format="PNG", compress_level=compress_level)
            return "target.png", buf.getvalue()
    stored_HW = np.where(valid_HW, target_HW, np.float32("nan"))
    limit = np.finfo(np.float16).max  # NaN (invalid) compares False: only valid values count
    if half and not ((stored_HW > limit).any() or (stored_HW < -limit).any()):
        return "target.npz", npz_bytes(_float16(stored_HW), name="target", compress_level=compress_level)
    if planes:
        return "target.npz", _plane_npz_bytes(stored_HW, compress_level=compress_level)
    return "target.npz", npz_bytes(stored_HW, name="target", compress_level=compress_level)


def _float16(map_HW: np.ndarray) -> np.ndarray:
    """`map_HW.astype(float16)`, bit for bit (round to nearest even, subnormals, NaN), through torch: numpy's cast
    took ~3 ms of a 480x640 label's ~10 ms f16 write, torch's (vectorized) 0.03 ms."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(map_HW)).to(torch.float16).numpy()


def _plane_npz_bytes(map_HW: np.ndarray, *, compress_level: int) -> bytes:
    """An npz of a float32 map's byte planes (module docstring): `target_hi` deflated; `target_lo` stored unless a
    sample of it deflates (flat regions repeat whole values: a rendered or upsampled map's low bytes may)."""
    little_HW = np.ascontiguousarray(map_HW, dtype="<f4")  # the byte view needs C order
    bytes_4HW = little_HW.view(np.uint8).reshape(*map_HW.shape, 4).transpose(2, 0, 1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, planes_2HW in (("target_hi", bytes_4HW[2:]), ("target_lo", bytes_4HW[:2])):
            array = io.BytesIO()
            np.lib.format.write_array(array, np.ascontiguousarray(planes_2HW), allow_pickle=False)
            data = array.getvalue()
            deflate = name == "target_hi" or _deflates(data, compress_level)
            compression = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
            archive.writestr(f"{name}.npy", data, compress_type=compression, compresslevel=compress_level)
    return buf.getvalue()


def _deflates(data: bytes, level: int, sample: int = 1 << 16) -> bool:
    """Whether deflate shrinks `data` by over 10%, judged on 4 evenly spread pieces of `sample` bytes in all (on all
    of it when it is no longer)."""
    if len(data) <= sample:
        probe = data
    else:
        step = len(data) // 4
        probe = b"".join(data[i : i + sample // 4] for i in range(0, 4 * step, step))
    return len(zlib.compress(probe, level)) < 0.9 * len(probe)


def _plane_npz_map(npz) -> np.ndarray:
    """The float32 map of a byte-plane npz (`_plane_npz_bytes`)."""
    hi, lo = npz["target_hi"], npz["target_lo"]
    if hi.dtype != np.uint8 or hi.shape != lo.shape or lo.dtype != np.uint8 or hi.ndim != 3 or len(hi) != 2:
        raise ValueError(f"target_hi {hi.dtype}{hi.shape} and target_lo {lo.dtype}{lo.shape}: expected 2 x H x W uint8")
    return np.stack((lo[0], lo[1], hi[0], hi[1]), axis=-1).view("<f4")[..., 0].astype(np.float32, copy=False)


def npz_bytes(array: np.ndarray, *, name: str, compress_level: int = 6) -> bytes:
    """`numpy.savez_compressed` of one array, with a chosen zlib level (numpy's own is fixed at 6)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=compress_level) as archive:
        with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_sample(
    sample: dict,
    *,
    image_format: str = "png",
    target_scale: float | None = None,
    target_half: bool = False,
    target_planes: bool = False,
    target_compress_level: int = 6,
) -> dict[str, bytes]:
    """Encode a sample dict (`__key__`, `image`, optional `target`/`valid`, `meta`) to tar members.

    `sample["image_bytes"] = (ext, bytes)` passes an already encoded image through unchanged. `target_scale`,
    `target_half`, `target_planes` and `target_compress_level` are `encode_target`'s `scale`, `half`, `planes` and
    `compress_level`.
    """
    key = sample["__key__"]
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
    meta = dict(sample.get("meta", {}))
    kind = meta.setdefault("kind", "labeled" if "target" in sample else "unlabeled")
    if kind not in KINDS:
        raise ValueError(f"{key}: meta kind {kind!r}; expected one of {KINDS}")
    meta["format_version"] = FORMAT_VERSION
    members: dict[str, bytes] = {}
    if kind != "pseudo":
        if "image_bytes" in sample:
            ext, data = sample["image_bytes"]
            members[ext] = data
        else:
            members["jpg" if image_format in ("jpg", "jpeg") else "png"] = encode_image(
                sample["image"], fmt=image_format
            )
    if kind in ("labeled", "pseudo"):
        if "target" not in sample:
            raise ValueError(f"{key}: a {kind} sample needs a target")
        check_space(meta.get("output_space", ""), what=f"{key}: meta output_space")
        target_HW = np.asarray(sample["target"], dtype=np.float32)
        valid_HW = np.asarray(sample.get("valid", np.isfinite(target_HW) & (target_HW > 0)), dtype=bool)
        image_hw = np.shape(sample["image"])[:2] if kind == "labeled" and "image_bytes" not in sample else None
        if target_HW.ndim != 2 or valid_HW.shape != target_HW.shape or image_hw not in (None, target_HW.shape):
            raise ValueError(
                f"{key}: target {target_HW.shape}, valid {valid_HW.shape} and image {image_hw or '(encoded)'} "
                "must be H x W of the same size"
            )
        if not np.all(np.isfinite(target_HW[valid_HW])):
            raise ValueError(f"{key}: target has NaN/inf at pixels marked valid")
        ext, data = encode_target(
            target_HW,
            valid_HW,
            scale=target_scale,
            half=target_half,
            planes=target_planes,
            compress_level=target_compress_level,
        )
        members[ext] = data
        if "sky" in sample:
            if kind != "labeled" or meta["output_space"] == "affine_disparity":
                raise ValueError(f"{key}: a sky mask needs a labeled depth or disparity target (sky: disparity 0)")
            members["sky.png"] = encode_mask(sample["sky"], like=target_HW, what=f"{key}: sky mask")
        meta["target_encoding"] = "png16" if ext == "target.png" else "npz"
        if ext == "target.png":
            meta["target_scale"] = float(target_scale)
        else:
            meta.pop("target_scale", None)
        # Both encodings carry validity exactly (0 in png16, NaN in npz), so no valid.png is written.
    members["json"] = json.dumps(meta, sort_keys=True).encode()
    return {f"{key}.{ext}": data for ext, data in members.items()}


# ---------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------


def decode_sample(
    raw: dict,
    *,
    kind: str | None = None,
    with_target: bool = True,
    target_steps: bool = False,
) -> dict:
    """Decode one WebDataset sample (`__key__`, `__url__`, extension -> bytes) to a sample dict.

    Args:
        raw: The raw sample as WebDataset's tar expansion produces it.
        kind: Expected kind; None takes it from the metadata.
        with_target: False leaves the target out (a labeled shard read as images only).
        target_steps: True keeps a png16 target (without a valid.png mask) as its stored uint16 steps, for a
            transform that resizes and crops first and then calls `png16_target`: nearest-neighbour geometry
            commutes with the per-pixel conversion, so the result is the same, computed on fewer pixels.

    Returns:
        `{"__key__", "__url__", "meta", "image"?, "target"?, "valid"?, "sky"?}`; `target` is float32 with 0 at
        invalid pixels, `valid` and `sky` bool. With `target_steps`, a png16 target comes as `target_steps`
        (uint16, 0 invalid) instead of `target` and `valid`; its scale is `meta["target_scale"]`.

    Raises:
        ShardFormatError: naming the shard and key, for missing or undecodable members and bad metadata.
    """
    key = raw.get("__key__", "?")
    url = raw.get("__url__", "?")
    where = f"shard {url}, key {key}"
    if "json" not in raw:
        raise ShardFormatError(f"{where}: no KEY.json metadata member (members: {_exts(raw)})")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as err:
        raise ShardFormatError(f"{where}: KEY.json is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{where}: KEY.json must hold an object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ShardFormatError(f"{where}: format_version {version!r}; this depthkit reads {FORMAT_VERSION}")
    actual_kind = meta.get("kind")
    if kind is not None and actual_kind != kind:
        raise ShardFormatError(f"{where}: expected a {kind} sample, metadata says {actual_kind!r}")
    sample: dict = {"__key__": key, "__url__": url, "meta": meta}
    if actual_kind != "pseudo":
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if ext is None:
            raise ShardFormatError(f"{where}: no image member (.jpg/.png/.webp; members: {_exts(raw)})")
        try:
            sample["image"] = image_from_bytes(raw[ext], name=f"{key}.{ext}")
        except ValueError as err:
            raise ShardFormatError(f"{where}: {err}") from None
    if actual_kind not in KINDS:
        raise ShardFormatError(f"{where}: metadata kind {actual_kind!r}; expected one of {KINDS}")
    if with_target and actual_kind in ("labeled", "pseudo"):
        fields = _decode_target(raw, meta, where, keep_steps=target_steps)
        target_HW = fields["target"] if "target" in fields else fields["target_steps"]
        if "image" in sample and target_HW.shape != sample["image"].shape[:2]:
            h, w = sample["image"].shape[:2]
            raise ShardFormatError(f"{where}: target is {target_HW.shape[1]}x{target_HW.shape[0]} but image is {w}x{h}")
        if "sky.png" in raw:
            if meta.get("output_space") == "affine_disparity":  # 0 is not the farthest there
                raise ShardFormatError(f"{where}: a sky mask needs a depth or disparity target, not affine_disparity")
            fields["sky"] = _decode_mask(raw, "sky", where, shape=target_HW.shape)
        sample.update(fields)
    return sample


def png16_target(steps_HW: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """`(target, valid)` of png16 steps: float32(step * scale), the product in float64 as encoded; 0 invalid."""
    return (steps_HW * float(scale)).astype(np.float32), steps_HW > 0


def _decode_target(raw: dict, meta: dict, where: str, *, keep_steps: bool) -> dict[str, np.ndarray]:
    try:
        check_space(meta.get("output_space", ""), what="meta output_space")
    except ValueError as err:
        raise ShardFormatError(f"{where}: {err}") from None
    try:
        if "target.png" in raw:
            scale = meta.get("target_scale")
            if not isinstance(scale, (int, float)) or scale <= 0:
                raise ShardFormatError(f"{where}: png16 target needs a positive target_scale, got {scale!r}")
            with Image.open(io.BytesIO(raw["target.png"])) as img:
                value = np.asarray(img)
            if value.ndim != 2 or value.dtype.kind not in "ui":
                raise ShardFormatError(f"{where}: KEY.target.png must be a 16-bit single-channel PNG")
            if keep_steps and "valid.png" not in raw:
                return {"target_steps": value}
            target_HW, valid_HW = png16_target(value, scale)
        elif "target.npz" in raw:
            with np.load(io.BytesIO(raw["target.npz"])) as npz:
                if "target" in npz.files:
                    target_HW = np.asarray(npz["target"], dtype=np.float32)
                elif {"target_hi", "target_lo"} <= set(npz.files):
                    target_HW = _plane_npz_map(npz)
                else:
                    raise ShardFormatError(f"{where}: KEY.target.npz has no 'target' array (nor its byte planes)")
            if target_HW.ndim != 2:
                raise ShardFormatError(f"{where}: target must be 2-D, got shape {target_HW.shape}")
            valid_HW = np.isfinite(target_HW)
            if np.any(np.isinf(target_HW)):
                raise ShardFormatError(f"{where}: target holds inf values (invalid pixels must be NaN)")
            target_HW = np.where(valid_HW, target_HW, np.float32(0))
        else:
            raise ShardFormatError(f"{where}: no target member (.target.png/.target.npz; members: {_exts(raw)})")
    except (OSError, ValueError) as err:
        if isinstance(err, ShardFormatError):
            raise
        raise ShardFormatError(f"{where}: cannot decode target ({err})") from None
    if "valid.png" in raw:
        valid_HW = _decode_mask(raw, "valid", where, shape=target_HW.shape) & np.isfinite(target_HW)
    return {"target": np.ascontiguousarray(target_HW), "valid": np.ascontiguousarray(valid_HW)}


def _decode_mask(raw: dict, name: str, where: str, *, shape: tuple[int, ...]) -> np.ndarray:
    """`KEY.NAME.png` as a bool mask (> 127), which must be `shape`."""
    try:
        with Image.open(io.BytesIO(raw[f"{name}.png"])) as img:
            mask_HW = np.asarray(img.convert("L")) > 127
    except OSError as err:
        raise ShardFormatError(f"{where}: cannot decode KEY.{name}.png ({err})") from None
    if mask_HW.shape != shape:
        raise ShardFormatError(f"{where}: {name} mask {mask_HW.shape} differs from target {shape}")
    return mask_HW


def _exts(raw: dict) -> str:
    return ", ".join(sorted(k for k in raw if not k.startswith("__"))) or "none"


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


class ShardWriter:
    """Writes samples into numbered shards `PREFIX-000000.tar`, each renamed into place when complete.

    Args:
        out_dir: Output folder (created).
        prefix: Shard name prefix.
        shard_size: Samples per shard.
        start_index: Number of the first shard.

    Use as a context manager; `written` lists finished shards with their sample counts.
    """

    def __init__(self, out_dir: str | Path, *, prefix: str = "shard", shard_size: int = 1000, start_index: int = 0):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.shard_size, self.index = prefix, shard_size, start_index
        self.written: list[tuple[Path, int]] = []
        self._tar: TarWriter | None = None

    def write(self, members: dict[str, bytes]) -> None:
        if self._tar is None:
            self._tar = TarWriter(self.out_dir / f"{self.prefix}-{self.index:06d}.tar")
        self._tar.add_sample(members)
        if self._tar.num_samples >= self.shard_size:
            self._finish()

    def _finish(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self.written.append((self._tar.path, self._tar.num_samples))
            self._tar = None
            self.index += 1

    def close(self) -> None:
        self._finish()

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.abort()
            self._tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TarWriter:
    """One tar shard written to a temporary name and renamed to `PATH` on `close()` (never half-written).

    The temporary name is this process's own (`STEM.HOST-PID.tar.tmp`, see `temporary_tar`): two writers of one
    shard (two jobs on one output by mistake) each write their own file, and whichever renames last leaves a whole
    shard of its own, never one written into by both.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp_path = temporary_tar(self.path)
        self._tar = tarfile.open(self.tmp_path, "w", format=tarfile.USTAR_FORMAT)
        self.num_samples = 0

    def add_sample(self, members: dict[str, bytes]) -> None:
        with naming_errors(self.path):
            for name in sorted(members, key=_member_order):
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(members[name]), 0o444  # mtime 0: the same samples give the same bytes
                self._tar.addfile(info, io.BytesIO(members[name]))
        self.num_samples += 1

    def close(self) -> None:
        with naming_errors(self.path):
            self._tar.close()
            with open(self.tmp_path, "rb") as f:
                os.fsync(f.fileno())
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        try:
            self._tar.close()  # writes the end blocks: fails again when the write that failed was a full disk
        except OSError:
            pass
        finally:
            self.tmp_path.unlink(missing_ok=True)


def temporary_tar(path: Path) -> Path:
    """This process's temporary name for shard `path`: `STEM.HOST-PID.tar.tmp` (ends in `.tar.tmp`, the unfinished
    shards that readers refuse in a folder without an index)."""
    return path.with_name(f"{path.stem}.{socket.gethostname()}-{os.getpid()}{path.suffix}.tmp")


def stale_temporaries(path: Path) -> list[Path]:
    """Temporary files of shard `path` that other processes left (`temporary_tar`, or the older `NAME.tmp`)."""
    pattern = glob.escape(str(path.with_name(path.stem))) + ".*" + glob.escape(path.suffix) + ".tmp"
    found = [Path(p) for p in glob.glob(pattern)] + [path.with_name(path.name + ".tmp")]
    return [p for p in found if p.exists() and p != temporary_tar(path)]


def _member_order(name: str) -> tuple[int, str]:
    # Metadata first so streaming readers learn the kind before the payload; then the rest by name.
    return (0 if name.endswith(".json") else 1, name)


def shard_file_name(url: str) -> str:
    """A shard's file name. Pseudo-label shards carry the file name of the image shard they label."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def label_shard_url(labels: str | Path, image_url: str) -> str:
    """Where the pseudo-labels of an image shard live: `labels/<the image shard's file name>`."""
    return str(labels).rstrip("/") + "/" + shard_file_name(image_url)


def iter_tar_samples(path: str | Path) -> Iterator[dict]:
    """Raw samples (`__key__`, `__url__`, extension -> bytes) of one local tar, in file order, read by plain
    webdataset: what tests check depthkit's shards against (depthkit's own readers go through
    `depthkit.data.tar_reader.iter_raw_samples`, which also detects damage)."""
    import webdataset as wds

    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard not found: {path}")
    yield from wds.tarfile_samples([{"url": path}])


REMOTE_SCHEMES = ("http://", "https://", "pipe:")  # what `depthkit.data.stream` opens (webdataset's gopen)


def is_local(url: str) -> bool:
    """Whether a shard spec names local files, not a URL (`http://`, `s3://`, ...) or a `pipe:` command."""
    return "://" not in url and not url.startswith("pipe:")


def shard_paths(spec: str | Path | list) -> list[str]:
    """Expand shard specs: a folder (its `*.tar`), a glob, a brace pattern, a URL, or a list of those.

    Raises:
        FileNotFoundError: a folder without shards, a pattern that matches nothing, a missing file.
        ValueError: a folder a depthkit writer never finished (its `WRITING_MARKER`, or `*.tar.tmp` files, and no
            `index.json`).
    """

    import braceexpand

    if isinstance(spec, (list, tuple)):
        if not spec:
            raise FileNotFoundError("no shards given (an empty list)")
        return [p for s in spec for p in shard_paths(s)]
    spec = str(spec)
    if not is_local(spec):
        if not spec.startswith(REMOTE_SCHEMES):
            scheme = spec.split("://", 1)[0] + "://"
            raise ValueError(
                f"shard URL {spec}: {scheme} is not read directly (http://, https://, pipe: are); stream it through "
                f"a command, e.g. 'pipe:aws s3 cp {spec} -' or 'pipe:gsutil cat {spec}', or give a local path"
            )
        return list(braceexpand.braceexpand(spec))
    if os.path.isdir(spec):
        found = sorted(glob.glob(os.path.join(spec, "*.tar")))
        _check_finished(spec)
        if not found:
            raise FileNotFoundError(f"no .tar shards in folder {spec}")
        return found
    paths = []
    for pattern in braceexpand.braceexpand(spec):
        if any(c in pattern for c in "*?["):
            matched = sorted(glob.glob(pattern))
            if not matched:
                raise FileNotFoundError(f"no shards match {pattern}")
            paths.extend(matched)
        else:
            if not os.path.isfile(pattern):
                raise FileNotFoundError(f"shard not found: {pattern}")
            paths.append(pattern)
    for folder in sorted({os.path.dirname(p) or "." for p in paths}):  # shards named one by one, or by a pattern
        _check_finished(folder)
    return paths


def folder_index(folder: str | os.PathLike) -> dict:
    """The `index.json` of a local shard folder (`depthkit data`, `synth`, `pseudo-label`: its `kind`, the sample
    count of each shard in `shards`); {} when there is none or it is unreadable (shards of other tools)."""
    return read_json_object(os.path.join(folder, INDEX_NAME))


def index_sample_counts(urls: list[str]) -> list[int | None]:
    """Each shard's sample count from its folder's `index.json` (`folder_index`, read once per folder); None where
    it is not known (a URL, a folder without an index, shards of other tools)."""
    shards_of: dict[str, dict] = {}
    counts: list[int | None] = []
    for url in urls:
        if not is_local(url):
            counts.append(None)
            continue
        folder = os.path.dirname(url)
        if folder not in shards_of:
            shards = folder_index(folder).get("shards")
            shards_of[folder] = shards if isinstance(shards, dict) else {}
        count = shards_of[folder].get(shard_file_name(url))
        counts.append(count if isinstance(count, int) else None)
    return counts


def _check_finished(folder: str) -> None:
    """Refuse a folder that a depthkit writer (synth, data convert) did not finish: they remove an older index
    first and write theirs last, so a mark or a `.tar.tmp` without `index.json` is a killed run's part."""
    if os.path.exists(os.path.join(folder, INDEX_NAME)):
        return
    unfinished = sorted(glob.glob(os.path.join(folder, "*.tar.tmp")))
    if not unfinished and not os.path.exists(os.path.join(folder, WRITING_MARKER)):
        return
    what = f"{len(unfinished)} unfinished shard(s) ({os.path.basename(unfinished[0])})" if unfinished else ""
    raise ValueError(
        f"folder {folder} holds {what or f'the mark of a writer ({WRITING_MARKER})'} and no index.json: the run that "
        "wrote it was killed (or is still running), so its shards are only part of the data; rerun it (synth / data "
        "convert: --overwrite)"
    )
