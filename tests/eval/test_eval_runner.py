"""The runner on real data (manifest + noise), saved predictions, a stand-in model, DA-2K, reports, W&B."""

from __future__ import annotations

import csv
import json
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from depthkit.eval.benchmarks import load_benchmark
from depthkit.eval.report import format_table, log_wandb, write_results
from depthkit.eval.runner import FolderPredictor, ModelPredictor, evaluate
from depthkit.spaces import AFFINE_DISPARITY, METRIC_DEPTH


class ArrayPredictor:
    """Predictions computed from each sample's ground truth (a test double for a model)."""

    batch_size = 4

    def __init__(self, fn, output_space):
        self.fn, self.output_space = fn, output_space
        self.description = {"kind": "test", "output_space": output_space}

    def predict(self, items, samples):
        return [self.fn(s) for s in samples]


def _noisy(sample, sigma, seed):
    noise_HW = np.exp(np.random.default_rng(seed).normal(0.0, sigma, sample["target"].shape))
    depth_HW = np.where(sample["valid"], sample["target"], 3.0)  # holes get an arbitrary value
    return (depth_HW * noise_HW).astype(np.float32)


@pytest.fixture(scope="module")
def real_items(shared_data):
    protocol, items = load_benchmark(str(shared_data / "rgbd" / "manifest.csv"))
    return protocol, items[:10]  # NYU raw, SUN, TUM, three KITTI, three NYU, UniDepth: indoor and outdoor


def test_real_data_metric_ground_truth_plus_noise(real_items):
    protocol, items = real_items
    predictor = ArrayPredictor(lambda s: _noisy(s, 0.05, 0), METRIC_DEPTH)
    result = evaluate(items, predictor, protocol)
    assert result["alignment"]["name"] == "none" and result["num_scored"] == len(items)
    s = result["summary"]
    # Multiplicative log-normal noise, sigma 0.05: E|e^n - 1| ~ 0.04, |n| < ln 1.25 almost surely.
    assert 0.03 < s["abs_rel"] < 0.05 and s["delta1"] > 0.99 and s["rmse_log"] == pytest.approx(0.05, rel=0.05)
    assert {r["group"] for r in result["per_image"]} >= {"metric3d_demo", "open3d_testdata"}


def test_real_data_affine_disparity_plus_noise(real_items):
    protocol, items = real_items

    def affine(sample):
        return (5.0 / _noisy(sample, 0.05, 1) + 0.3).astype(np.float32)

    result = evaluate(items, ArrayPredictor(affine, AFFINE_DISPARITY), protocol)
    assert result["alignment"]["name"] == "lsq_disparity"
    assert result["summary"]["abs_rel"] < 0.08 and result["summary"]["delta1"] > 0.97
    assert all(r["scale"] > 0 for r in result["per_image"])
    # Scored in disparity space instead (Depth Anything's statement): also small, and recorded.
    result = evaluate(items[:3], ArrayPredictor(affine, AFFINE_DISPARITY), protocol, metric_space="disparity")
    assert result["metric_space"] == "disparity" and result["summary"]["abs_rel"] < 0.08
    # A metric prediction twice too far: AbsRel 1 in depth, |1/(2g) - 1/g| / (1/g) = 0.5 in disparity.
    doubled = ArrayPredictor(lambda s: 2 * np.where(s["valid"], s["target"], 1.0).astype(np.float32), METRIC_DEPTH)
    for space, expected in (("depth", 1.0), ("disparity", 0.5)):
        summary = evaluate(items[:3], doubled, protocol, metric_space=space)["summary"]
        assert summary["abs_rel"] == pytest.approx(expected, rel=1e-5)


def test_folder_predictions_npy_and_png_at_another_size(fake_layout, tmp_path):
    root, truth = fake_layout("nyu")
    protocol, items = load_benchmark("nyu", root)
    preds = tmp_path / "preds"
    preds.mkdir()
    keys = sorted(truth)
    depth_HW, _ = truth[keys[0]]
    np.save(preds / f"{keys[0]}.npy", (1.0 / np.maximum(depth_HW, 0.1)).astype(np.float32))
    depth_HW, valid_HW = truth[keys[1]]
    cols = np.arange(depth_HW.shape[1])
    filled_HW = np.stack([np.interp(cols, cols[v], d[v]) for d, v in zip(depth_HW, valid_HW, strict=True)])
    small = Image.fromarray((1000.0 / filled_HW).astype(np.float32)).resize((320, 240), Image.BILINEAR)
    Image.fromarray(np.asarray(small).astype(np.uint16)).save(preds / f"{keys[1]}.png")  # half size, 16-bit
    result = evaluate(items, FolderPredictor(preds, output_space=AFFINE_DISPARITY), protocol)
    rows = {r["key"]: r for r in result["per_image"]}
    assert rows[keys[0]]["abs_rel"] < 1e-5  # exact disparity at full size
    assert rows[keys[1]]["abs_rel"] < 0.02  # half size, 16-bit: bilinear upsampling of a smooth field
    assert rows[keys[0]]["num_pixels"] <= (471 - 45) * (601 - 41)  # Eigen crop applied


def test_png_metric_predictions_need_a_scale(fake_layout, tmp_path):
    root, truth = fake_layout("nyu")
    _, items = load_benchmark("nyu", root)
    Image.fromarray(np.full((4, 4), 1000, dtype=np.uint16)).save(tmp_path / f"{items[0].key}.png")
    predictor = FolderPredictor(tmp_path, output_space=METRIC_DEPTH)
    with pytest.raises(ValueError, match="--png-scale"):
        predictor.load(items[0].key)
    assert FolderPredictor(tmp_path, output_space=METRIC_DEPTH, png_scale=1e-3).load(items[0].key).max() == 1.0
    with pytest.raises(FileNotFoundError, match=items[1].key):
        predictor.load(items[1].key)


@dataclass
class _Prediction:
    values: np.ndarray
    output_space: str


class _StandInModel:
    """Quacks like a depthkit.models model: `meta.output_space` and `infer(images, input_size, batch_size)`."""

    meta = types.SimpleNamespace(output_space=AFFINE_DISPARITY)

    def __init__(self):
        self.calls = []

    def infer(self, images, input_size=518, batch_size=8):
        self.calls.append((len(images), input_size))
        return [_Prediction(image.mean(axis=2).astype(np.float32) + 1.0, AFFINE_DISPARITY) for image in images]


def test_model_predictor_batches_and_checks_spaces(fake_layout):
    root, _ = fake_layout("sintel")
    protocol, items = load_benchmark("sintel", root)
    model = _StandInModel()
    result = evaluate(items, ModelPredictor(model, name="stand_in", input_size=28, batch_size=8), protocol)
    assert model.calls == [(2, 28)] and result["num_scored"] == 2
    assert result["predictions"]["model"] == "stand_in"


def test_da2k_pair_accuracy(fake_layout):
    root, truth = fake_layout("da2k")
    protocol, items = load_benchmark("da2k", root)

    def disparity_from_pairs(sample, flip=False):
        pred = np.zeros(sample["image"].shape[:2], dtype=np.float32)
        for (r1, c1), (r2, c2) in sample["pairs"]:
            pred[r1, c1], pred[r2, c2] = (1.0, 2.0) if flip else (2.0, 1.0)
        return pred

    right = evaluate(items, ArrayPredictor(disparity_from_pairs, AFFINE_DISPARITY), protocol)
    assert right["summary"]["pair_accuracy"] == 1.0 and right["summary"]["num_pairs"] == 4
    wrong = evaluate(items, ArrayPredictor(lambda s: disparity_from_pairs(s, True), AFFINE_DISPARITY), protocol)
    assert wrong["summary"]["pair_accuracy"] == 0.0
    as_depth = evaluate(items, ArrayPredictor(lambda s: disparity_from_pairs(s, True), METRIC_DEPTH), protocol)
    assert as_depth["summary"]["pair_accuracy"] == 1.0  # in depth, smaller is closer
    assert set(right["groups"]) == {"indoor", "outdoor"}
    with pytest.raises(ValueError, match="pair order"):
        evaluate(items, ArrayPredictor(disparity_from_pairs, AFFINE_DISPARITY), protocol, alignment="lsq_depth")


def test_images_without_scored_pixels_are_listed_as_skipped(fake_layout):
    root, _ = fake_layout("sintel")
    protocol, items = load_benchmark("sintel", root)
    result = evaluate(items, ArrayPredictor(lambda s: s["target"], METRIC_DEPTH), protocol, max_depth=0.5001)
    assert result["num_scored"] == 0 and result["num_skipped"] == 2
    assert result["per_image"][0]["status"].startswith("skipped")
    assert result["overrides"] == {"max_depth": 0.5001}


def test_reports_are_written_and_printed(fake_layout, tmp_path):
    root, _ = fake_layout("diode")
    protocol, items = load_benchmark("diode", root)
    result = evaluate(items, ArrayPredictor(lambda s: _noisy(s, 0.1, 2), METRIC_DEPTH), protocol, num_worst=2)
    written = write_results(result, tmp_path / "out" / "res.json")
    assert [p.name for p in written] == ["res.json", "res_summary.csv", "res_per_image.csv", "res_worst.png"]
    saved = json.loads((tmp_path / "out" / "res.json").read_text())
    assert saved["alignment"]["name"] == "none" and "_worst" not in saved and len(saved["per_image"]) == 2
    summary = list(csv.DictReader(open(tmp_path / "out" / "res_summary.csv")))
    assert [r["group"] for r in summary] == ["all", "indoors", "outdoor"]
    assert float(summary[0]["abs_rel"]) == pytest.approx(result["summary"]["abs_rel"])
    assert not list((tmp_path / "out").glob("*.tmp"))
    table = format_table(result)
    assert "alignment    none" in table and "0.6..350 m" in table and "standard split has 771" in table
    # A set of no known size (DA-2K) cut by --limit says so too; uncut, nothing is said.
    unsized = {**result, "protocol": {**result["protocol"], "num_expected": None}}
    assert "(--limit 2: part of the set" in format_table({**unsized, "limit": 2})  # 2 images scored
    assert "not comparable" not in format_table({**unsized, "limit": None})
    # The whole split with skipped images is not the published mean either.
    whole = {**result, "protocol": {**result["protocol"], "num_expected": 2}}
    assert "not comparable" not in format_table(whole)
    assert "published means are over all 2" in format_table({**whole, "num_scored": 1, "num_skipped": 1})
    # A run without --worst leaves no figure of an earlier run beside its results.
    write_results({**result, "_worst": None}, tmp_path / "out" / "res.json")
    assert not (tmp_path / "out" / "res_worst.png").exists()
    long_name = "scene_with_a_name_longer_than_the_column"
    result["groups"][long_name] = result["groups"].pop("outdoor")
    rows = format_table(result).splitlines()
    rows = rows[rows.index(next(line for line in rows if line.startswith("group "))) :]
    assert any(line.startswith(long_name + " ") for line in rows), "a group name is printed in full"
    assert len({len(line.rsplit("  ", 1)[0]) for line in rows}) == 1, "the columns line up"


def test_wandb_logging_is_offline_and_logs_a_table(fake_layout, monkeypatch):
    calls = {}

    class FakeRun:
        def log(self, data):
            calls["log"] = data

        def finish(self):
            calls["finished"] = True

    fake = types.SimpleNamespace(
        init=lambda **kw: calls.__setitem__("init", kw) or FakeRun(),
        Table=lambda columns, data: ("table", columns, data),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    root, _ = fake_layout("sintel")
    protocol, items = load_benchmark("sintel", root)
    result = evaluate(items, ArrayPredictor(lambda s: s["target"], METRIC_DEPTH), protocol)
    log_wandb(result)
    assert calls["init"]["mode"] == "offline" and calls["finished"]
    table = calls["log"]["eval/sintel_per_image"]
    assert table[0] == "table" and "abs_rel" in table[1] and len(table[2]) == 2
    assert calls["log"]["eval/abs_rel"] == pytest.approx(0.0, abs=1e-7)
    # A manifest given by a relative path: its stem names the table (W&B refused "eval/../data/m.csv_per_image").
    log_wandb({**result, "dataset": "../../data/rgbd/manifest.csv"}, folder="results")
    assert "eval/manifest_per_image" in calls["log"] and calls["init"]["dir"] == "results"


def test_reads_what_depthkit_predict_writes(fake_layout, tmp_path):
    """`depthkit predict --save npy,png16` on the benchmark root names outputs by image path; both decode."""
    from depthkit.models.predict import write_outputs

    root, truth = fake_layout("sintel")
    protocol, items = load_benchmark("sintel", root)
    for space, kind in ((AFFINE_DISPARITY, "png16"), (METRIC_DEPTH, "png16"), (AFFINE_DISPARITY, "npy")):
        out = tmp_path / f"{space}_{kind}"
        for item in items:
            depth_HW, _ = truth[item.key]
            values_HW = (1.0 / depth_HW if space == AFFINE_DISPARITY else depth_HW).astype(np.float32)
            write_outputs(values_HW, space, out, item.name, [kind])  # item.name = "alley_1/frame_0001"
        result = evaluate(items, FolderPredictor(out, output_space=space), protocol)
        assert result["summary"]["abs_rel"] < 2e-3, (space, kind)  # 16-bit quantization only
    with pytest.raises(ValueError, match="written as affine_disparity"):
        FolderPredictor(tmp_path / f"{AFFINE_DISPARITY}_png16", output_space=METRIC_DEPTH).load(
            items[0].key, items[0].name
        )
    # --save npy,png16: the .npy is read first, and the PNG beside it says what space both are in
    both = tmp_path / "both"
    write_outputs(np.ones((4, 5), np.float32), AFFINE_DISPARITY, both, items[0].name, ["npy", "png16"])
    with pytest.raises(ValueError, match=r"frame_0001.npy: written as affine_disparity, but --output-space is metric"):
        FolderPredictor(both, output_space=METRIC_DEPTH).load(items[0].key, items[0].name)
    assert FolderPredictor(both, output_space=AFFINE_DISPARITY).load(items[0].key, items[0].name).shape == (4, 5)


def test_kitti_images_are_cut_to_the_benchmark_box_before_the_model_sees_them(fake_layout):
    """ZoeDepth and Marigold crop image and ground truth to the KB box (352 x 1216) before inference; depthkit fed
    the whole 375 x 1242 frame, so every KITTI number came from another input. A saved prediction of the whole frame
    is cut to the box too."""
    root, _ = fake_layout("kitti")
    protocol, items = load_benchmark("kitti", root)
    seen = []

    def exact(sample):  # the true affine disparity of whatever the model is shown
        seen.append((sample["image"].shape[:2], sample["target"].shape))
        return (2.0 / np.where(sample["valid"], sample["target"], 1.0) + 0.1).astype(np.float32)

    result = evaluate(items, ArrayPredictor(exact, AFFINE_DISPARITY), protocol)
    assert seen and all(shapes == ((352, 1216), (352, 1216)) for shapes in seen)
    assert result["num_scored"] == len(items) and result["summary"]["abs_rel"] < 1e-6
    full = ArrayPredictor(
        lambda s: np.pad(exact(s), ((375 - 352, 0), (13, 13)), constant_values=-5.0), AFFINE_DISPARITY
    )
    assert evaluate(items, full, protocol)["summary"]["abs_rel"] < 1e-6  # the padding (frame outside the box) is cut
    # A low-resolution prediction of the whole frame is resized to the frame, then cut (not stretched to the box):
    # a curve across the frame's 1242 columns is, in the box, its columns 13 to 1228 (a curve, as the alignment
    # absorbs any affine change).
    ramp_w = (2.0 + np.linspace(0.0, 1.0, 621) ** 2).astype(np.float32)
    half = ArrayPredictor(lambda s: np.broadcast_to(ramp_w, (188, 621)).copy(), AFFINE_DISPARITY)
    box_w = (2.0 + ((13 + np.arange(1216)) / 1241) ** 2).astype(np.float32)
    shown = ArrayPredictor(lambda s: np.broadcast_to(box_w, (352, 1216)).copy(), AFFINE_DISPARITY)
    got, expected = (evaluate(items, p, protocol)["summary"] for p in (half, shown))
    assert got["abs_rel"] == pytest.approx(expected["abs_rel"], rel=1e-6) and got["abs_rel"] > 0.01
