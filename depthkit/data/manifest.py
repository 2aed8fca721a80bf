"""The manifest-driven reader for real RGB-D data.

A manifest is a CSV with one row per RGB-D pair and the columns
`source,rgb,depth,depth_format,scale_to_metres,invalid,fx,fy,cx,cy,domain,gt_type,notes` (an optional `licence`
column is carried into the metadata; an optional `sky` column names a mask image, non-zero where the image shows
sky). Paths are relative to the manifest's folder. See `docs/data.md`.

    rows = read_manifest("data/rgbd/manifest.csv")
    sample = load_row(rows[0])   # {"__key__", "image", "target", "valid", "meta"}
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from depthkit.data.formats import DepthCodec, decode_depth, load_image, load_mask, parse_codec
from depthkit.spaces import AFFINE_DISPARITY

REQUIRED_COLUMNS = (
    "source",
    "rgb",
    "depth",
    "depth_format",
    "scale_to_metres",
    "invalid",
    "fx",
    "fy",
    "cx",
    "cy",
    "domain",
    "gt_type",
    "notes",
)
FORMAT_VERSION = 1


def sample_key(relative_path: str) -> str:
    """A shard-safe key from a path: no dots (WebDataset splits keys at the first dot) and no slashes."""
    stem = relative_path.rsplit(".", 1)[0] if "." in Path(relative_path).name else relative_path
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")
    if not key:
        raise ValueError(f"cannot make a sample key from path {relative_path!r}")
    return key


@dataclass(frozen=True, kw_only=True)
class ManifestRow:
    """One RGB-D pair of a manifest, with paths resolved and depth encoding parsed.

    Attributes:
        key: Shard-safe sample key derived from the RGB path.
        line: Line number in the manifest (for error messages).
        manifest: The manifest file.
        rgb_path: The colour image.
        depth_path: The depth file.
        codec: How the depth file is encoded.
        intrinsics: `{"fx", "fy", "cx", "cy"}` in pixels, or None where the manifest leaves them empty.
        fields: The row's text fields (`source`, `domain`, `gt_type`, `notes`, `licence`, ...).
        sky_path: A sky mask (any image, non-zero = sky), or None.
    """

    key: str
    line: int
    manifest: Path
    rgb_path: Path
    depth_path: Path
    codec: DepthCodec
    intrinsics: dict[str, float] | None
    fields: dict[str, str] = field(default_factory=dict)
    sky_path: Path | None = None

    @property
    def where(self) -> str:
        return f"{self.manifest}:{self.line}"


def _parse_intrinsics(row: dict[str, str], where: str) -> dict[str, float] | None:
    values = {k: (row.get(k) or "").strip() for k in ("fx", "fy", "cx", "cy")}
    if not any(values.values()):
        return None
    if not all(values.values()):
        missing = [k for k, v in values.items() if not v]
        raise ValueError(f"{where}: intrinsics are partly given; missing {', '.join(missing)}")
    try:
        parsed = {k: float(v) for k, v in values.items()}
    except ValueError:
        raise ValueError(f"{where}: intrinsics {values} are not numbers") from None
    if not all(math.isfinite(v) for v in parsed.values()) or parsed["fx"] <= 0 or parsed["fy"] <= 0:
        raise ValueError(f"{where}: intrinsics {values}: fx and fy must be positive, all four finite")
    return parsed


def read_manifest(path: str | Path, *, skipped: list[str] | None = None) -> list[ManifestRow]:
    """Parse and validate a manifest; every problem names the file and line.

    Args:
        path: The manifest CSV.
        skipped: When given, a row with a bad field (missing path, repeated key, unknown `depth_format`, bad scale,
            invalid value or intrinsics) is left out and its message appended here, instead of raising. Problems of
            the whole file (missing, not UTF-8, missing columns, no rows) always raise.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    root = path.parent
    try:
        rows, num_records = _read_rows(path, root, skipped)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text CSV ({err.reason} at byte {err.start})") from None
    if not num_records:
        raise ValueError(f"{path}: the manifest has a header but no rows")
    if not rows:
        raise ValueError(f"{path}: all {num_records} rows are bad; the first: {skipped[0]}")
    return rows


def _read_rows(path: Path, root: Path, skipped: list[str] | None) -> tuple[list[ManifestRow], int]:
    """The good rows, and how many records the file holds."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's "CSV UTF-8" starts with a BOM
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            found = list(reader.fieldnames or ())
            hint = ""
            if any(name != name.strip() for name in found):
                hint = " (its header has spaces around the column names: remove them)"
            elif len(found) == 1 and any(sep in found[0] for sep in ";\t"):
                hint = " (it is not comma-separated: a manifest is a CSV with ',' between fields)"
            raise ValueError(f"{path}: manifest lacks column(s) {', '.join(missing)}{hint}")
        rows: list[ManifestRow] = []
        seen: dict[str, int] = {}
        num_records = 0
        for line, record in enumerate(reader, start=2):
            num_records += 1
            try:
                rows.append(_parse_row(path, root, line, record, seen))
            except ValueError as err:
                if skipped is None:
                    raise
                skipped.append(str(err))
    return rows, num_records


def _parse_row(path: Path, root: Path, line: int, record: dict, seen: dict[str, int]) -> ManifestRow:
    """One CSV record as a `ManifestRow`; `seen` maps the keys of earlier rows to their lines."""
    where = f"{path}:{line}"
    record = {k: (v or "") for k, v in record.items() if k is not None}
    if not record["rgb"].strip() or not record["depth"].strip():
        raise ValueError(f"{where}: 'rgb' and 'depth' must both be given")
    try:
        key = sample_key(record["rgb"].strip())
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    if key in seen:
        raise ValueError(f"{where}: sample key {key!r} repeats line {seen[key]} (same rgb path?)")
    codec = parse_codec(record["depth_format"], record["scale_to_metres"], record["invalid"], where=where)
    text_fields = {k: v.strip() for k, v in record.items() if k not in ("rgb", "depth", "fx", "fy", "cx", "cy", "sky")}
    sky = record.get("sky", "").strip()
    row = ManifestRow(
        key=key,
        line=line,
        manifest=path,
        rgb_path=root / record["rgb"].strip(),
        depth_path=root / record["depth"].strip(),
        codec=codec,
        intrinsics=_parse_intrinsics(record, where),
        fields=text_fields,
        sky_path=root / sky if sky else None,
    )
    seen[key] = line
    return row


def load_row(row: ManifestRow) -> dict:
    """Decode one manifest row to a sample dict: `__key__`, `image`, `target`, `valid`, `meta`.

    `image` is RGB uint8 `H×W×3`; `target` float32 `H×W` is metres for metric sources (disparity in pixels for
    disparity-only sources); `valid` is bool `H×W`; with a `sky` column, `sky` is bool `H×W`. Raises `ValueError`
    naming the manifest line and file when a file does not decode or a map does not match the image size.
    """
    try:
        image_HW3 = load_image(row.rgb_path, rotated=False)  # an EXIF rotation the depth map may not share
        target_HW, valid_HW, space = decode_depth(row.depth_path, row.codec)
        sky_HW = None if row.sky_path is None else load_mask(row.sky_path)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{row.where}: {err}") from err
    for name, path, map_HW in (("depth", row.depth_path, target_HW), ("sky mask", row.sky_path, sky_HW)):
        if map_HW is not None and map_HW.shape != image_HW3.shape[:2]:
            raise ValueError(
                f"{row.where}: {name} {path} is {map_HW.shape[1]}x{map_HW.shape[0]} but image "
                f"{row.rgb_path} is {image_HW3.shape[1]}x{image_HW3.shape[0]}"
            )
    if sky_HW is not None and space == AFFINE_DISPARITY:
        raise ValueError(f"{row.where}: a sky mask needs depth or disparity (0 = farthest), not {space}")
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "labeled",
        "source": row.fields.get("source", ""),
        "output_space": space,
        "intrinsics": row.intrinsics,
        "domain": row.fields.get("domain", ""),
        "gt_type": row.fields.get("gt_type", ""),
        "licence": row.fields.get("licence", ""),
        "notes": row.fields.get("notes", ""),
        "origin": {"rgb": row.rgb_path.name, "depth": row.depth_path.name, "depth_format": row.codec.depth_format},
    }
    sample = {"__key__": row.key, "image": image_HW3, "target": target_HW, "valid": valid_HW, "meta": meta}
    if sky_HW is not None:
        sample["sky"] = sky_HW
        meta["origin"]["sky"] = row.sky_path.name
    return sample


def iter_manifest(path: str | Path, *, on_error: str = "raise", stats: dict | None = None) -> Iterator[dict]:
    """Yield decoded samples of a manifest.

    Args:
        path: The manifest CSV.
        on_error: "raise" stops at the first bad row; "skip" skips it and counts it in `stats["skipped"]`
            (with the messages in `stats["errors"]`).
        stats: Optional dict that receives the counts.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}; expected 'raise' or 'skip'")
    stats = {} if stats is None else stats
    stats.setdefault("skipped", 0)
    stats.setdefault("errors", [])
    bad_rows: list[str] = []
    rows = read_manifest(path, skipped=bad_rows if on_error == "skip" else None)
    stats["skipped"] += len(bad_rows)
    stats["errors"].extend(bad_rows)
    for row in rows:
        try:
            sample = load_row(row)
        except (ValueError, FileNotFoundError) as err:
            if on_error == "raise":
                raise
            stats["skipped"] += 1
            stats["errors"].append(str(err))
            continue
        yield sample
