"""Each benchmark reader on a tiny fake copy of its layout; the protocol table; missing files name the path."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from depthkit.eval.alignment import ALIGNMENTS
from depthkit.eval.benchmarks import PROTOCOLS, READERS, load_benchmark, read_dpt
from depthkit.eval.metrics import CROPS
from depthkit.spaces import METRIC_DEPTH


def _check_depth_items(items, truth):
    assert sorted(i.key for i in items) == sorted(truth)
    for item in items:
        sample = item.load()
        depth_HW, valid_HW = truth[item.key]
        assert sample["__key__"] == item.key and sample["meta"]["output_space"] == METRIC_DEPTH
        assert sample["image"].dtype == np.uint8 and sample["image"].shape[:2] == depth_HW.shape
        assert sample["target"].dtype == np.float32
        np.testing.assert_array_equal(sample["valid"], valid_HW)
        assert_allclose(sample["target"][valid_HW], depth_HW[valid_HW], rtol=1e-6)
        assert np.all(sample["target"][~valid_HW] == 0)


def test_protocol_table_is_consistent():
    for name, protocol in PROTOCOLS.items():
        assert protocol.name == name and protocol.reader in (*READERS, "manifest")
        assert protocol.crop in CROPS and protocol.relative_alignment in ALIGNMENTS
        assert protocol.source, f"{name} must cite where its protocol comes from"
        assert 0 <= protocol.min_depth < protocol.max_depth
    assert (PROTOCOLS["nyu"].crop, PROTOCOLS["nyu"].max_depth, PROTOCOLS["nyu"].num_expected) == ("eigen_nyu", 10, 654)
    kitti = PROTOCOLS["kitti"]
    assert (kitti.crop, kitti.max_depth, kitti.num_expected) == ("kb_garg", 80, 652)


@pytest.mark.parametrize("layout", ["bts", "marigold"])
def test_nyu_reader(fake_layout, layout):
    root, truth = fake_layout("nyu", layout=layout)
    protocol, items = load_benchmark("nyu", root)
    assert protocol.name == "nyu"
    _check_depth_items(items, truth)


def test_nyu_split_file_selects_images(fake_layout):
    root, truth = fake_layout("nyu", with_split=True)
    _, items = load_benchmark("nyu", root)
    assert [i.key for i in items] == list(truth)


def test_kitti_reader_skips_none_and_finds_train_and_val(fake_layout):
    root, truth = fake_layout("kitti")
    _, items = load_benchmark("kitti", root)
    assert len(items) == 2  # the 'None' line has no annotated ground truth
    _check_depth_items(items, truth)


def test_diode_reader_and_subsets(fake_layout):
    root, truth = fake_layout("diode")
    _, items = load_benchmark("diode", root)
    _check_depth_items(items, truth)
    assert sorted(i.group for i in items) == ["indoors", "outdoor"]
    _, indoors = load_benchmark("diode_indoors", root / "val")
    assert [i.group for i in indoors] == ["indoors"]


@pytest.mark.parametrize("layout", ["official", "marigold"])
def test_eth3d_reader(fake_layout, layout):
    root, truth = fake_layout("eth3d", layout=layout)
    _, items = load_benchmark("eth3d", root)
    _check_depth_items(items, truth)


def test_sintel_reader_and_dpt(fake_layout):
    root, truth = fake_layout("sintel")
    _, items = load_benchmark("sintel", root)
    _check_depth_items(items, truth)
    assert "final" in str(items[0].rgb_path)
    _, clean = load_benchmark("sintel_clean", root)
    assert "clean" in str(clean[0].rgb_path)
    bad = root / "bad.dpt"
    bad.write_bytes(b"\0" * 20)
    with pytest.raises(ValueError, match="not a Sintel"):
        read_dpt(bad)


def test_da2k_reader_puts_the_closer_point_first(fake_layout):
    root, truth = fake_layout("da2k")
    protocol, items = load_benchmark("da2k", root)
    assert protocol.kind == "pairs"
    for item in items:
        sample = item.load()
        assert sample["pairs"] == truth[item.key]
    assert sorted(i.group for i in items) == ["indoor", "outdoor"]


def test_manifest_reader_on_the_real_data(shared_data):
    protocol, items = load_benchmark(str(shared_data / "rgbd" / "manifest.csv"))
    assert protocol.name == "manifest" and len(items) >= 20
    sample = items[0].load()
    assert sample["meta"]["output_space"] == METRIC_DEPTH and sample["valid"].any()


@pytest.mark.parametrize(
    ("name", "remove"),
    [
        ("nyu", "official_splits/test/kitchen/sync_depth_01003.png"),
        (
            "kitti",
            "data_depth_annotated/train/2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000054.png",
        ),
        ("kitti", "eigen_test_files_with_gt.txt"),
        ("diode", "val/outdoor/scene_00011/scan_00183/00011_00183_outdoor_000_010_depth_mask.npy"),
        ("eth3d", "office/ground_truth_depth/dslr_images/DSC_0001.JPG"),
        ("sintel", "training/depth/market_2/frame_0001.dpt"),
        ("da2k", "outdoor/0002.png"),
    ],
)
def test_missing_files_name_what_and_where(fake_layout, name, remove):
    root, _ = fake_layout(name)
    (root / remove).unlink()
    filename = remove.rsplit("/", 1)[-1]
    with pytest.raises(FileNotFoundError, match=filename.replace(".", r"\.")) as err:
        load_benchmark(name, root)
    assert "Expected layout" in str(err.value)


def test_unknown_dataset_and_missing_root(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_benchmark("nyuv3", tmp_path)
    with pytest.raises(ValueError, match="--data-root is required"):
        load_benchmark("nyu", None)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_benchmark("nyu", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="NYUv2 test images"):
        load_benchmark("nyu", tmp_path)
