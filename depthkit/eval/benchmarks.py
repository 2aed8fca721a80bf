"""Benchmark protocols (one table) and readers for the standard local layouts of each benchmark.

Nothing is downloaded: users point `--data-root` at their own copy. A reader lists its samples lazily
(`EvalItem.load()` decodes one), so `--limit` and missing-prediction checks stay cheap. Every missing file
raises `FileNotFoundError` naming what was expected and where. Samples are the data layer's dicts (`__key__`,
`image`, `target` metres, `valid`, `meta`); DA-2K samples carry `pairs` instead of a target.

Sample keys are `depthkit.data.manifest.sample_key` of the image path relative to the benchmark root (slashes
and dots become `_`), e.g. NYU `bathroom/rgb_00045.jpg` -> `bathroom_rgb_00045`. Saved predictions are named by
these keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from depthkit.data.formats import load_image, read_depth_raw
from depthkit.data.manifest import load_row, read_manifest, sample_key
from depthkit.spaces import METRIC_DEPTH


@dataclass(frozen=True, kw_only=True)
class Protocol:
    """How one benchmark is scored.

    Attributes:
        name: Table key, used by `--dataset`.
        reader: Reader name in `READERS` ("manifest": the items of a manifest CSV, read by `load_benchmark`).
        kind: "depth" (dense metrics) or "pairs" (relative-depth pair accuracy).
        min_depth: Ground truth at or below this (m) is not scored.
        max_depth: Ground truth at or above this (m) is not scored; also the clamp for predictions
            (`alignment.FAR_DEPTH_CAP` when infinite).
        crop: Named crop of `metrics.CROPS`.
        relative_alignment: Alignment for relative (affine-invariant or scale-free disparity) predictions.
        num_expected: Images in the full standard split (None where not fixed); a smaller count is reported.
        options: Reader options (subset, image pass).
        source: Where the numbers above come from.
    """

    name: str
    reader: str
    kind: str = "depth"
    min_depth: float = 1e-3
    max_depth: float = float("inf")
    crop: str = "none"
    relative_alignment: str = "lsq_disparity"
    num_expected: int | None = None
    options: dict = field(default_factory=dict)
    source: str = ""


_INF = float("inf")

# The protocol table. Depth Anything V1/V2 (Yang et al. 2024) state that zero-shot relative depth "follows
# MiDaS": per-image least squares scale and shift in disparity (`lsq_disparity`), AbsRel and delta1.
# Their evaluation code is unpublished; ranges and crops below come from the published code named per row.
PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        # 654 official test images, raw (not in-painted) depth, Eigen crop, 1e-3..10 m: BTS README and
        # utils/eval_with_pngs.py (--eigen_crop --max_depth_eval 10), ZoeDepth, Marigold nyu_dataset.py,
        # MiDaS NYU gist (depth_cap=10).
        Protocol(
            name="nyu",
            reader="nyu",
            min_depth=1e-3,
            max_depth=10.0,
            crop="eigen_nyu",
            num_expected=654,
            source="BTS eval_with_pngs.py; ZoeDepth; Marigold (NYUv2 test, Eigen crop, 1e-3..10 m)",
        ),
        # Eigen test split (697 images; 652 have annotated ground truth), data_depth_annotated, 1e-3..80 m,
        # Garg crop inside the KITTI-benchmark crop (kb_garg): ZoeDepth's evaluation (do_kb_crop, then garg_crop),
        # which Depth Anything V1's metric KITTI numbers come from. BTS eval_with_pngs.py and DPT apply Garg to the
        # full frame (--crop garg); Marigold applies Eigen inside the KB crop (--crop kb_eigen).
        Protocol(
            name="kitti",
            reader="kitti",
            min_depth=1e-3,
            max_depth=80.0,
            crop="kb_garg",
            num_expected=652,
            source="ZoeDepth / Depth Anything V1 metric eval (Eigen test, KB crop + Garg crop, 1e-3..80 m)",
        ),
        # DIODE validation split (325 indoor + 446 outdoor), sensor mask, 0.6..350 m: Marigold diode_dataset.py
        # and data_split/diode_depth lists.
        Protocol(
            name="diode",
            reader="diode",
            min_depth=0.6,
            max_depth=350.0,
            num_expected=771,
            options={"subset": "all"},
            source="Marigold diode_dataset.py (DIODE val, 0.6..350 m)",
        ),
        Protocol(
            name="diode_indoors",
            reader="diode",
            min_depth=0.6,
            max_depth=350.0,
            num_expected=325,
            options={"subset": "indoors"},
            source="Marigold diode_dataset.py (DIODE val indoors, 0.6..350 m)",
        ),
        Protocol(
            name="diode_outdoor",
            reader="diode",
            min_depth=0.6,
            max_depth=350.0,
            num_expected=446,
            options={"subset": "outdoor"},
            source="Marigold diode_dataset.py (DIODE val outdoor, 0.6..350 m)",
        ),
        # ETH3D high-res multi-view training DSLR images (13 scenes, 454 images), depth > 1e-5, no upper
        # bound: Marigold eth3d_dataset.py and data_split/eth3d_depth.
        Protocol(
            name="eth3d",
            reader="eth3d",
            min_depth=1e-5,
            max_depth=_INF,
            num_expected=454,
            source="Marigold eth3d_dataset.py (ETH3D DSLR training, 1e-5..inf m)",
        ),
        # MPI Sintel training set (1064 frames, 23 scenes), depth 1e-3..70: Video Depth Anything
        # benchmark/eval/eval.py (Sintel: max_depth_eval=70, mask gt > 1e-3). Which pass Depth Anything used is
        # not stated; final is the default, sintel_clean the alternative.
        Protocol(
            name="sintel",
            reader="sintel",
            min_depth=1e-3,
            max_depth=70.0,
            num_expected=1064,
            options={"image_pass": "final"},
            source="Video Depth Anything benchmark/eval/eval.py (Sintel training, 1e-3..70)",
        ),
        Protocol(
            name="sintel_clean",
            reader="sintel",
            min_depth=1e-3,
            max_depth=70.0,
            num_expected=1064,
            options={"image_pass": "clean"},
            source="Video Depth Anything benchmark/eval/eval.py (Sintel training clean pass, 1e-3..70)",
        ),
        # DA-2K: 1K images, ~2K annotated point pairs, accuracy of which point is closer (Depth Anything V2,
        # DA-2K.md).
        Protocol(
            name="da2k",
            reader="da2k",
            kind="pairs",
            relative_alignment="none",
            source="Depth Anything V2 DA-2K.md (pair accuracy)",
        ),
        # Any manifest CSV of the data layer (see docs/data.md): no crop, 1e-3 m up, predictions clamped at
        # alignment.FAR_DEPTH_CAP.
        Protocol(
            name="manifest",
            reader="manifest",
            min_depth=1e-3,
            max_depth=_INF,
            source="depthkit default for manifests: every valid pixel above 1e-3 m",
        ),
    )
}


@dataclass(frozen=True, kw_only=True)
class EvalItem:
    """One benchmark sample, decoded on demand.

    Attributes:
        key: Sample key; saved predictions are named `<key>.npy` / `<key>.png`.
        name: The image path the key comes from, relative to the benchmark root, without suffix (what
            `depthkit predict` names its outputs when run on that root); predictions may use it instead.
        rgb_path: The input image (for messages).
        group: Sub-set label for grouped summaries (scene type, source), or "".
        load: Decodes the sample dict.
    """

    key: str
    name: str
    rgb_path: Path
    group: str = ""
    load: Callable[[], dict] = field(repr=False, compare=False)


def _stem(relative_path: str) -> str:
    """`a/b/c.png` -> `a/b/c`."""
    head, _, tail = relative_path.rpartition("/")
    return f"{head}/{tail.rsplit('.', 1)[0]}" if head else tail.rsplit(".", 1)[0]


def _missing(what: str, where: Path, layout: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} not found under {where}. Expected layout:\n{layout}")


def _require_files(dataset: str, layout: str, *paths: Path) -> None:
    """Raise `_missing` for the first of `paths` that is no file ("<dataset> file <name>", with the layout)."""
    for path in paths:
        if not path.is_file():
            raise _missing(f"{dataset} file {path.name}", path.parent, layout)


def _depth_sample(key: str, rgb_path: Path, target_HW: np.ndarray, valid_HW: np.ndarray, meta: dict) -> dict:
    image_HW3 = load_image(rgb_path)
    if target_HW.shape != image_HW3.shape[:2]:
        raise ValueError(
            f"{key}: ground truth is {target_HW.shape[1]}x{target_HW.shape[0]} but image {rgb_path} is "
            f"{image_HW3.shape[1]}x{image_HW3.shape[0]}"
        )
    target_HW = np.where(valid_HW, target_HW, 0.0).astype(np.float32)
    meta = {"output_space": METRIC_DEPTH, **meta}
    return {"__key__": key, "image": image_HW3, "target": target_HW, "valid": valid_HW, "meta": meta}


def _png16_depth(path: Path, scale: float) -> tuple[np.ndarray, np.ndarray]:
    raw_HW = read_depth_raw(path, "uint16_png")
    return raw_HW.astype(np.float32) * np.float32(scale), raw_HW > 0


def _read_split(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# NYU Depth v2
# ---------------------------------------------------------------------------------------------------------------

NYU_LAYOUT = """\
  BTS extraction (utils/extract_official_train_test_set_from_mat.py, raw depth):
    <root>/official_splits/test/<scene>/rgb_00045.jpg + sync_depth_00045.png   (uint16 mm, 0 = invalid)
  or Marigold's nyu_labeled_extracted (untarred):
    <root>/test/<scene>/rgb_0001.png + depth_0001.png                          (uint16 mm, 0 = invalid)
  <root> may also be the test folder itself. An optional split list <root>/nyudepthv2_test_files_with_gt.txt
  (BTS: '<scene>/rgb_00045.jpg <scene>/sync_depth_00045.png 518.8579') or --split-file fixes the 654 images.
  The labeled .mat itself needs h5py, which depthkit does not depend on: extract it first."""

NYU_SPLIT_NAME = "nyudepthv2_test_files_with_gt.txt"
_NYU_RGB = re.compile(r"^rgb_(\d+)\.(jpg|png)$")


def _nyu_test_dir(root: Path) -> Path:
    for candidate in (root / "official_splits" / "test", root / "test", root):
        if candidate.is_dir() and any(candidate.glob("*/rgb_*")):
            return candidate
    raise _missing("NYUv2 test images (<scene>/rgb_*.jpg|png)", root, NYU_LAYOUT)


def _load_nyu(key: str, rgb_path: Path, depth_path: Path) -> dict:
    target_HW, valid_HW = _png16_depth(depth_path, 1e-3)
    return _depth_sample(key, rgb_path, target_HW, valid_HW, {"source": "nyu", "domain": "indoor"})


def read_nyu(root: Path, *, split_file: Path | None = None) -> list[EvalItem]:
    """NYUv2 654-image test split from a pre-extracted layout (`NYU_LAYOUT`)."""
    test_dir = _nyu_test_dir(root)
    if split_file is None:
        candidates = (root / NYU_SPLIT_NAME, test_dir / NYU_SPLIT_NAME)
        split_file = next((p for p in candidates if p.is_file()), None)
    pairs: list[tuple[str, str]] = []
    if split_file is not None:
        for parts in _read_split(split_file):
            pairs.append((parts[0].lstrip("/"), parts[1].lstrip("/")))
    else:
        for rgb_path in sorted(test_dir.glob("*/rgb_*")):
            match = _NYU_RGB.match(rgb_path.name)
            if not match:
                continue
            scene, index = rgb_path.parent.name, match.group(1)
            names = (f"sync_depth_{index}.png", f"depth_{index}.png")
            depth_path = next((rgb_path.parent / n for n in names if (rgb_path.parent / n).is_file()), None)
            if depth_path is None:
                raise _missing(f"depth for {rgb_path.name} ({' or '.join(names)})", rgb_path.parent, NYU_LAYOUT)
            pairs.append((f"{scene}/{rgb_path.name}", f"{scene}/{depth_path.name}"))
    items = []
    for rgb_rel, depth_rel in pairs:
        rgb_path, depth_path = test_dir / rgb_rel, test_dir / depth_rel
        _require_files("NYUv2", NYU_LAYOUT, rgb_path, depth_path)
        key = sample_key(rgb_rel)
        load = partial(_load_nyu, key, rgb_path, depth_path)
        items.append(EvalItem(key=key, name=_stem(rgb_rel), rgb_path=rgb_path, load=load))
    return items


# ---------------------------------------------------------------------------------------------------------------
# KITTI (Eigen test split, annotated ground truth)
# ---------------------------------------------------------------------------------------------------------------

KITTI_LAYOUT = """\
  <root>/eigen_test_files_with_gt.txt   (BTS train_test_inputs/; or --split-file), lines
      '2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png
       2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000069.png 721.5377' ('None' = no GT)
  <root>/raw/<date>/<drive>/image_02/data/*.png  (KITTI raw; or <root>/<date>/... directly)
  <root>/data_depth_annotated/{train,val}/<drive>/proj_depth/groundtruth/image_02/*.png
      (data_depth_annotated.zip unzipped as is, or with train/ and val/ merged; uint16, depth = value / 256)"""

KITTI_SPLIT_NAMES = ("eigen_test_files_with_gt.txt", "kitti_eigen_test_files_with_gt.txt")


def _load_kitti(key: str, rgb_path: Path, depth_path: Path) -> dict:
    target_HW, valid_HW = _png16_depth(depth_path, 1.0 / 256.0)
    return _depth_sample(key, rgb_path, target_HW, valid_HW, {"source": "kitti", "domain": "outdoor_driving"})


def read_kitti(root: Path, *, split_file: Path | None = None) -> list[EvalItem]:
    """KITTI Eigen test images that have annotated ground truth (652 of 697; `KITTI_LAYOUT`)."""
    if split_file is None:
        split_file = next((root / n for n in KITTI_SPLIT_NAMES if (root / n).is_file()), None)
        if split_file is None:
            raise _missing(f"KITTI Eigen split file ({' or '.join(KITTI_SPLIT_NAMES)})", root, KITTI_LAYOUT)
    rgb_roots = (root / "raw", root)
    gt_roots = tuple(root / "data_depth_annotated" / s for s in ("val", "train", "")) + (root,)
    items = []
    for parts in _read_split(split_file):
        rgb_rel, depth_rel = parts[0], parts[1]
        if depth_rel == "None":
            continue
        rgb_path = next((r / rgb_rel for r in rgb_roots if (r / rgb_rel).is_file()), None)
        if rgb_path is None:
            looked = ", ".join(map(str, rgb_roots))
            raise _missing(f"KITTI image {rgb_rel}", root, f"{KITTI_LAYOUT}\n  looked in: {looked}")
        depth_path = next((r / depth_rel for r in gt_roots if (r / depth_rel).is_file()), None)
        if depth_path is None:
            looked = ", ".join(map(str, gt_roots))
            raise _missing(f"KITTI annotated depth {depth_rel}", root, f"{KITTI_LAYOUT}\n  looked in: {looked}")
        key = sample_key(rgb_rel)
        load = partial(_load_kitti, key, rgb_path, depth_path)
        items.append(EvalItem(key=key, name=_stem(rgb_rel), rgb_path=rgb_path, load=load))
    return items


# ---------------------------------------------------------------------------------------------------------------
# DIODE
# ---------------------------------------------------------------------------------------------------------------

DIODE_LAYOUT = """\
  <root>/val/{indoors,outdoor}/scene_*/scan_*/<name>.png
      with <name>_depth.npy (float32 metres, HxWx1) and <name>_depth_mask.npy (HxW, nonzero = valid)
  (val.tar.gz from diode-dataset.org unpacked; <root> may also be the val folder itself)"""


def _load_diode(key: str, rgb_path: Path, depth_path: Path, mask_path: Path, group: str) -> dict:
    depth = np.load(depth_path).astype(np.float32)
    depth_HW = depth.reshape(depth.shape[:2])  # HxWx1 -> HxW
    mask_HW = np.load(mask_path).reshape(depth_HW.shape) > 0
    valid_HW = mask_HW & np.isfinite(depth_HW) & (depth_HW > 0)
    return _depth_sample(key, rgb_path, depth_HW, valid_HW, {"source": "diode", "domain": group})


def read_diode(root: Path, *, subset: str = "all", split_file: Path | None = None) -> list[EvalItem]:
    """DIODE validation images (`DIODE_LAYOUT`); `subset` is "all", "indoors" or "outdoor"."""
    if subset not in ("all", "indoors", "outdoor"):
        raise ValueError(f"DIODE subset={subset!r}; expected all, indoors or outdoor")
    val_dir = root / "val" if (root / "val").is_dir() else root
    scene_types = ("indoors", "outdoor") if subset == "all" else (subset,)
    if split_file is not None:
        rels = [parts[0] for parts in _read_split(split_file)]
        rels = [r for r in rels if r.split("/")[0] in scene_types]
    else:
        rels = sorted(
            p.relative_to(val_dir).as_posix() for t in scene_types for p in (val_dir / t).glob("scene_*/scan_*/*.png")
        )
    if not rels:
        raise _missing(f"DIODE val images ({'/'.join(scene_types)})", val_dir, DIODE_LAYOUT)
    items = []
    for rel in rels:
        rgb_path = val_dir / rel
        depth_path = rgb_path.with_name(rgb_path.stem + "_depth.npy")
        mask_path = rgb_path.with_name(rgb_path.stem + "_depth_mask.npy")
        _require_files("DIODE", DIODE_LAYOUT, rgb_path, depth_path, mask_path)
        key, group = sample_key(rel), rel.split("/")[0]
        load = partial(_load_diode, key, rgb_path, depth_path, mask_path, group)
        items.append(EvalItem(key=key, name=_stem(rel), rgb_path=rgb_path, group=group, load=load))
    return items


# ---------------------------------------------------------------------------------------------------------------
# ETH3D
# ---------------------------------------------------------------------------------------------------------------

ETH3D_LAYOUT = """\
  ETH3D high-res multi-view training, archives unpacked into one folder:
    <root>/<scene>/images/dslr_images/DSC_*.JPG                (multi_view_training_dslr_jpg.7z)
    <root>/<scene>/ground_truth_depth/dslr_images/DSC_*.JPG    (<scene>_dslr_depth.7z; raw float32, row-major,
                                                                image size, inf = no depth; not a JPEG)
  or Marigold's eth3d.tar layout:
    <root>/rgb/<scene>/images/dslr_images/DSC_*.JPG
    <root>/depth/<scene>_dslr_depth/<scene>/ground_truth_depth/dslr_images/DSC_*.JPG"""


def read_eth3d_depth(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """ETH3D ground-truth depth: raw little-endian float32, `shape` row-major, inf (or <= 0) where unknown."""
    data = path.read_bytes()
    height, width = shape
    if len(data) != 4 * height * width:
        raise ValueError(f"{path}: {len(data)} bytes is not a {width}x{height} float32 ETH3D depth map")
    depth_HW = np.frombuffer(data, dtype="<f4").reshape(height, width).astype(np.float32)
    valid_HW = np.isfinite(depth_HW) & (depth_HW > 0)
    return np.where(valid_HW, depth_HW, 0.0).astype(np.float32), valid_HW


def _load_eth3d(key: str, rgb_path: Path, depth_path: Path, scene: str) -> dict:
    image_HW3 = load_image(rgb_path)
    target_HW, valid_HW = read_eth3d_depth(depth_path, image_HW3.shape[:2])
    meta = {"output_space": METRIC_DEPTH, "source": "eth3d", "domain": scene}
    return {"__key__": key, "image": image_HW3, "target": target_HW, "valid": valid_HW, "meta": meta}


def read_eth3d(root: Path, *, split_file: Path | None = None) -> list[EvalItem]:
    """ETH3D DSLR training images with ground-truth depth (`ETH3D_LAYOUT`)."""
    if split_file is not None:
        pairs = [(root / p[0], root / p[1]) for p in _read_split(split_file)]
    else:
        pairs = []
        official = sorted(root.glob("*/images/dslr_images/*"))
        marigold = sorted((root / "rgb").glob("*/images/dslr_images/*"))
        for rgb_path in official:
            scene = rgb_path.parts[-4]
            pairs.append((rgb_path, root / scene / "ground_truth_depth" / "dslr_images" / rgb_path.name))
        for rgb_path in marigold:
            scene = rgb_path.parts[-4]
            depth_dir = root / "depth" / f"{scene}_dslr_depth" / scene / "ground_truth_depth" / "dslr_images"
            pairs.append((rgb_path, depth_dir / rgb_path.name))
    if not pairs:
        raise _missing("ETH3D DSLR images (<scene>/images/dslr_images/*)", root, ETH3D_LAYOUT)
    items = []
    for rgb_path, depth_path in pairs:
        _require_files("ETH3D", ETH3D_LAYOUT, rgb_path, depth_path)
        scene = rgb_path.parts[-4]
        key = sample_key(f"{scene}/{rgb_path.name}")
        load = partial(_load_eth3d, key, rgb_path, depth_path, scene)
        items.append(EvalItem(key=key, name=f"{scene}/{rgb_path.stem}", rgb_path=rgb_path, group=scene, load=load))
    return items


# ---------------------------------------------------------------------------------------------------------------
# MPI Sintel
# ---------------------------------------------------------------------------------------------------------------

SINTEL_LAYOUT = """\
  MPI-Sintel-complete and MPI-Sintel-depth-training-20150305 unpacked into one folder (both start with training/):
    <root>/training/{final,clean}/<scene>/frame_0001.png
    <root>/training/depth/<scene>/frame_0001.dpt     (float32 tag 202021.25, int32 width, int32 height, float32 depth)
  or each archive in its own folder under <root>: <root>/MPI-Sintel-complete/training/...,
    <root>/MPI-Sintel-depth-training-20150305/training/depth/..."""

SINTEL_TAG = 202021.25


def read_dpt(path: Path) -> np.ndarray:
    """Read a Sintel `.dpt` depth file to float32 `H×W`."""
    data = path.read_bytes()
    if len(data) < 12 or np.frombuffer(data, "<f4", 1, 0)[0] != np.float32(SINTEL_TAG):
        raise ValueError(f"{path}: not a Sintel .dpt file (tag {SINTEL_TAG} missing)")
    width, height = (int(v) for v in np.frombuffer(data, "<i4", 2, 4))
    if width <= 0 or height <= 0 or len(data) != 12 + 4 * width * height:
        raise ValueError(f"{path}: .dpt header says {width}x{height}, which does not match its {len(data)} bytes")
    return np.frombuffer(data, "<f4", width * height, 12).reshape(height, width).astype(np.float32)


def _load_sintel(key: str, rgb_path: Path, depth_path: Path, scene: str) -> dict:
    depth_HW = read_dpt(depth_path)
    valid_HW = np.isfinite(depth_HW) & (depth_HW > 0)
    return _depth_sample(key, rgb_path, depth_HW, valid_HW, {"source": "sintel", "domain": scene})


def read_sintel(root: Path, *, image_pass: str = "final", split_file: Path | None = None) -> list[EvalItem]:
    """MPI Sintel training frames with depth (`SINTEL_LAYOUT`); `image_pass` is "final" or "clean"."""
    if image_pass not in ("final", "clean"):
        raise ValueError(f"Sintel image_pass={image_pass!r}; expected final or clean")
    image_dirs = (root / "training" / image_pass, root / "MPI-Sintel-complete" / "training" / image_pass)
    depth_dirs = (root / "training" / "depth", root / "MPI-Sintel-depth-training-20150305" / "training" / "depth")
    image_dir = next((d for d in image_dirs if d.is_dir()), None)
    depth_dir = next((d for d in depth_dirs if d.is_dir()), None)
    if image_dir is None:
        raise _missing(f"Sintel {image_pass} pass ({' or '.join(map(str, image_dirs))})", root, SINTEL_LAYOUT)
    if depth_dir is None:
        raise _missing(f"Sintel depth ({' or '.join(map(str, depth_dirs))})", root, SINTEL_LAYOUT)
    if split_file is not None:
        rels = [parts[0] for parts in _read_split(split_file)]
    else:
        rels = sorted(p.relative_to(image_dir).as_posix() for p in image_dir.glob("*/*.png"))
    if not rels:
        raise _missing("Sintel frames (<scene>/frame_*.png)", image_dir, SINTEL_LAYOUT)
    items = []
    for rel in rels:
        rgb_path = image_dir / rel
        depth_path = (depth_dir / rel).with_suffix(".dpt")
        _require_files("Sintel", SINTEL_LAYOUT, rgb_path, depth_path)
        scene = rgb_path.parent.name
        key = sample_key(rel)
        load = partial(_load_sintel, key, rgb_path, depth_path, scene)
        items.append(EvalItem(key=key, name=_stem(rel), rgb_path=rgb_path, group=scene, load=load))
    return items


# ---------------------------------------------------------------------------------------------------------------
# DA-2K
# ---------------------------------------------------------------------------------------------------------------

DA2K_LAYOUT = """\
  <root>/annotations.json   {"<image path>": [{"point1": [h, w], "point2": [h, w], "closer_point": "point1"}, ...]}
  <root>/<image path>       (the images, paths relative to <root>; huggingface.co/datasets/depth-anything/DA-2K)"""


def _load_da2k(key: str, rgb_path: Path, pairs: tuple, group: str) -> dict:
    image_HW3 = load_image(rgb_path)
    return {"__key__": key, "image": image_HW3, "pairs": list(pairs), "meta": {"source": "da2k", "domain": group}}


def _da2k_point(value, where: str) -> tuple[int, int]:
    if not (isinstance(value, list | tuple) and len(value) == 2):
        raise ValueError(f"{where}: a point must be [h, w], got {value!r}")
    return int(round(float(value[0]))), int(round(float(value[1])))


def read_da2k(root: Path, *, split_file: Path | None = None) -> list[EvalItem]:
    """DA-2K image pairs (`DA2K_LAYOUT`); each item's pairs list the closer point first. `split_file`, when given, is
    the annotations JSON to read instead of `root/annotations.json` (for the other readers, a list of files)."""
    annotations_path = split_file or root / "annotations.json"
    if not annotations_path.is_file():
        raise _missing("DA-2K annotations.json", annotations_path.parent, DA2K_LAYOUT)
    try:
        annotations = json.loads(annotations_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{annotations_path}: not valid JSON ({err})") from err
    if not isinstance(annotations, dict):
        raise ValueError(f"{annotations_path}: expected an object mapping image paths to annotation lists")
    items = []
    for image_rel in sorted(annotations):
        pairs = []
        for i, ann in enumerate(annotations[image_rel]):
            where = f"{annotations_path}: {image_rel}[{i}]"
            p1, p2 = _da2k_point(ann.get("point1"), where), _da2k_point(ann.get("point2"), where)
            closer = ann.get("closer_point", "point1")
            if closer not in ("point1", "point2"):
                raise ValueError(f"{where}: closer_point={closer!r}; expected point1 or point2")
            pairs.append((p1, p2) if closer == "point1" else (p2, p1))
        rgb_path = root / image_rel
        if not rgb_path.is_file():
            raise _missing(f"DA-2K image {image_rel}", root, DA2K_LAYOUT)
        key = sample_key(image_rel)
        group = image_rel.split("/")[0] if "/" in image_rel else ""
        load = partial(_load_da2k, key, rgb_path, tuple(pairs), group)
        items.append(EvalItem(key=key, name=_stem(image_rel), rgb_path=rgb_path, group=group, load=load))
    return items


# ---------------------------------------------------------------------------------------------------------------
# Manifest CSV (data layer)
# ---------------------------------------------------------------------------------------------------------------


def _load_manifest_row(row) -> dict:
    sample = load_row(row)
    if sample["meta"]["output_space"] != METRIC_DEPTH:
        raise ValueError(
            f"{row.where}: ground truth is {sample['meta']['output_space']}, not metric depth; depth metrics need "
            "metres (give the disparity-to-depth formula in scale_to_metres)"
        )
    return sample


def read_manifest_items(path: Path) -> list[EvalItem]:
    """Every row of a data-layer manifest CSV, grouped by its `source` column."""
    items = []
    for row in read_manifest(path):
        load = partial(_load_manifest_row, row)
        try:
            relative = row.rgb_path.relative_to(path.parent).as_posix()
        except ValueError:  # an absolute path in the manifest: the path without its root
            relative = row.rgb_path.as_posix().lstrip("/")
        name = _stem(relative)
        group = row.fields.get("source", "")
        items.append(EvalItem(key=row.key, name=name, rgb_path=row.rgb_path, group=group, load=load))
    return items


READERS: dict[str, Callable[..., list[EvalItem]]] = {
    "nyu": read_nyu,
    "kitti": read_kitti,
    "diode": read_diode,
    "eth3d": read_eth3d,
    "sintel": read_sintel,
    "da2k": read_da2k,
}


def load_benchmark(
    dataset: str, data_root: str | Path | None = None, *, split_file: str | Path | None = None
) -> tuple[Protocol, list[EvalItem]]:
    """Resolve `--dataset` (a `PROTOCOLS` name or a manifest CSV path) to its protocol and items.

    Raises:
        ValueError: an unknown name, or a benchmark without `data_root`.
        FileNotFoundError: files of the expected layout are missing (the message shows the layout).
    """
    split = Path(split_file) if split_file is not None else None
    if dataset.endswith(".csv") or (dataset not in PROTOCOLS and Path(dataset).is_file()):
        if split is not None or data_root is not None:
            raise ValueError("--split-file and --data-root are for named benchmarks; a manifest lists its own files")
        return PROTOCOLS["manifest"], read_manifest_items(Path(dataset))
    if dataset not in PROTOCOLS or dataset == "manifest":
        names = ", ".join(n for n in PROTOCOLS if n != "manifest")
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {names}, or a manifest .csv path")
    protocol = PROTOCOLS[dataset]
    if data_root is None:
        raise ValueError(f"--data-root is required for {dataset} (the folder holding your local copy)")
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root for {dataset} not found: {root}")
    return protocol, READERS[protocol.reader](root, split_file=split, **protocol.options)
