"""Tiny fake copies of each benchmark's on-disk layout, written into tmp_path.

Each builder returns `(root, truth)` where `truth` maps sample key -> (depth_HW metres, valid_HW) as written, so
tests can check what a reader decodes against what was put there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _rgb(path: Path, height: int, width: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _png16(path: Path, value_HW: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(value_HW.astype(np.uint16)).save(path)


def _depth(height: int, width: int, seed: int, lo: float, hi: float, invalid_fraction: float = 0.2):
    """A smooth depth field in [lo, hi] (so resized predictions stay close) with random holes."""
    rng = np.random.default_rng(seed)
    rows_H1, cols_1W = np.linspace(0, 1, height)[:, None], np.linspace(0, 1, width)[None, :]
    phase = rng.uniform(0, np.pi)
    field_HW = 0.5 + 0.5 * np.sin(np.pi * cols_1W + phase) * np.cos(np.pi * rows_H1 / 2)
    depth_HW = (lo + (hi - lo) * field_HW).astype(np.float32)
    valid_HW = rng.random((height, width)) >= invalid_fraction
    return depth_HW, valid_HW


def make_nyu(root: Path, *, layout: str = "bts", with_split: bool = False) -> tuple[Path, dict]:
    """NYU test images at the native 480x640 (the Eigen crop needs it); depth stored in mm."""
    truth = {}
    test_dir = root / "official_splits" / "test" if layout == "bts" else root / "test"
    lines = []
    for i, (scene, index) in enumerate((("bathroom", 45), ("kitchen", 1003))):
        rgb_name = f"rgb_{index:05d}.jpg" if layout == "bts" else f"rgb_{index:04d}.png"
        depth_name = f"sync_depth_{index:05d}.png" if layout == "bts" else f"depth_{index:04d}.png"
        depth_HW, valid_HW = _depth(480, 640, i, 0.5, 9.5)
        depth_mm_HW = np.where(valid_HW, np.round(depth_HW * 1000), 0)
        _rgb(test_dir / scene / rgb_name, 480, 640, i)
        _png16(test_dir / scene / depth_name, depth_mm_HW)
        truth[f"{scene}_{rgb_name.split('.')[0]}"] = (depth_mm_HW / 1000.0, valid_HW)
        lines.append(f"{scene}/{rgb_name} {scene}/{depth_name} 518.8579")
    if with_split:
        (root / "nyudepthv2_test_files_with_gt.txt").write_text("\n".join(lines[:1]) + "\n")
        truth = dict(list(truth.items())[:1])
    return root, truth


KITTI_HW = (375, 1242)  # a real frame size: the KITTI protocol's crop starts with the 352x1216 benchmark crop


def make_kitti(root: Path) -> tuple[Path, dict]:
    """Three Eigen-split lines: two with annotated GT (one under val/, one under train/), one 'None'."""
    truth, lines = {}, []
    drive = "2011_09_26_drive_0002_sync"
    for i, (frame, subset) in enumerate((("0000000069", "val"), ("0000000054", "train"), ("0000000075", None))):
        rgb_rel = f"2011_09_26/{drive}/image_02/data/{frame}.png"
        _rgb(root / "raw" / rgb_rel, *KITTI_HW, i)
        if subset is None:
            lines.append(f"{rgb_rel} None 721.5377")
            continue
        depth_rel = f"{drive}/proj_depth/groundtruth/image_02/{frame}.png"
        depth_HW, valid_HW = _depth(*KITTI_HW, i, 2.0, 85.0, invalid_fraction=0.8)
        raw_HW = np.where(valid_HW, np.round(depth_HW * 256), 0)
        _png16(root / "data_depth_annotated" / subset / depth_rel, raw_HW)
        lines.append(f"{rgb_rel} {depth_rel} 721.5377")
        truth[f"2011_09_26_{drive}_image_02_data_{frame}"] = (raw_HW / 256.0, valid_HW)
    (root / "eigen_test_files_with_gt.txt").write_text("\n".join(lines) + "\n")
    return root, truth


def make_diode(root: Path) -> tuple[Path, dict]:
    truth = {}
    for i, scene_type in enumerate(("indoors", "outdoor")):
        folder = root / "val" / scene_type / f"scene_0001{i}" / "scan_00183"
        name = f"0001{i}_00183_{scene_type}_000_010"
        _rgb(folder / f"{name}.png", 24, 32, i)
        depth_HW, valid_HW = _depth(24, 32, i, 0.7, 300.0)
        np.save(folder / f"{name}_depth.npy", depth_HW[..., None])
        np.save(folder / f"{name}_depth_mask.npy", valid_HW.astype(np.float32))
        truth[f"{scene_type}_scene_0001{i}_scan_00183_{name}"] = (depth_HW, valid_HW)
    return root, truth


def make_eth3d(root: Path, *, layout: str = "official") -> tuple[Path, dict]:
    truth = {}
    for i, scene in enumerate(("courtyard", "office")):
        rgb_rel = Path(scene) / "images" / "dslr_images" / "DSC_0001.JPG"
        if layout == "official":
            rgb_path = root / rgb_rel
            depth_path = root / scene / "ground_truth_depth" / "dslr_images" / "DSC_0001.JPG"
        else:
            rgb_path = root / "rgb" / rgb_rel
            depth_path = root / "depth" / f"{scene}_dslr_depth" / scene / "ground_truth_depth" / "dslr_images"
            depth_path = depth_path / "DSC_0001.JPG"
        _rgb(rgb_path, 20, 30, i)
        depth_HW, valid_HW = _depth(20, 30, i, 0.5, 40.0)
        depth_path.parent.mkdir(parents=True, exist_ok=True)
        depth_path.write_bytes(np.where(valid_HW, depth_HW, np.inf).astype("<f4").tobytes())
        truth[f"{scene}_DSC_0001"] = (depth_HW, valid_HW)
    return root, truth


def write_dpt(path: Path, depth_HW: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = depth_HW.shape
    header = np.array([202021.25], "<f4").tobytes() + np.array([width, height], "<i4").tobytes()
    path.write_bytes(header + depth_HW.astype("<f4").tobytes())


def make_sintel(root: Path) -> tuple[Path, dict]:
    truth = {}
    for i, scene in enumerate(("alley_1", "market_2")):
        for image_pass in ("final", "clean"):
            _rgb(root / "training" / image_pass / scene / "frame_0001.png", 16, 40, i)
        depth_HW, _ = _depth(16, 40, i, 0.5, 90.0, invalid_fraction=0.0)
        write_dpt(root / "training" / "depth" / scene / "frame_0001.dpt", depth_HW)
        truth[f"{scene}_frame_0001"] = (depth_HW, np.ones_like(depth_HW, dtype=bool))
    return root, truth


def make_da2k(root: Path) -> tuple[Path, dict]:
    """Two images; truth maps key -> list of ((closer), (farther)) pixel pairs."""
    annotations, truth = {}, {}
    for i, rel in enumerate(("indoor/0001.jpg", "outdoor/0002.png")):
        _rgb(root / rel, 20, 30, i)
        annotations[rel] = [
            {"point1": [2, 3], "point2": [15, 25], "closer_point": "point1"},
            {"point1": [10, 10], "point2": [5, 5], "closer_point": "point2"},
        ]
        truth[rel.replace("/", "_").split(".")[0]] = [((2, 3), (15, 25)), ((5, 5), (10, 10))]
    (root / "annotations.json").write_text(json.dumps(annotations))
    return root, truth


BUILDERS = {
    "nyu": make_nyu,
    "kitti": make_kitti,
    "diode": make_diode,
    "eth3d": make_eth3d,
    "sintel": make_sintel,
    "da2k": make_da2k,
}


@pytest.fixture
def fake_layout(tmp_path):
    """`fake_layout(name, **options)` builds a fake copy of benchmark `name` under tmp_path."""

    def build(name: str, **options):
        return BUILDERS[name](tmp_path / name, **options)

    return build
