"""`depthkit eval` end to end with --predictions on a tiny fake layout, and its user errors."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import torch

from depthkit.cli import main
from depthkit.eval import commands


def _parser():
    parser = argparse.ArgumentParser(prog="depthkit")
    commands.register(parser.add_subparsers(dest="command"))
    return parser


def _run(argv):
    args = _parser().parse_args(["eval", *argv])
    return args.func(args)


@pytest.fixture
def kitti_with_predictions(fake_layout, tmp_path):
    root, truth = fake_layout("kitti")
    preds = tmp_path / "preds"
    preds.mkdir()
    for key, (depth_HW, valid_HW) in truth.items():
        filled_HW = np.where(valid_HW, depth_HW, 40.0)
        np.save(preds / f"{key}.npy", (2.0 / filled_HW + 0.1).astype(np.float32))  # exact affine disparity
    return root, preds


def test_eval_end_to_end_with_predictions(kitti_with_predictions, tmp_path, capsys):
    root, preds = kitti_with_predictions
    out = tmp_path / "results" / "kitti.json"
    argv = ["--predictions", str(preds), "--output-space", "affine_disparity", "--dataset", "kitti"]
    assert _run([*argv, "--data-root", str(root), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "lsq_disparity: benchmark protocol for affine_disparity" in printed and "crop kb_garg" in printed
    result = json.loads(out.read_text())
    assert result["alignment"]["name"] == "lsq_disparity" and result["protocol"]["crop"] == "kb_garg"
    assert result["predictions"]["output_space"] == "affine_disparity" and result["num_scored"] == 2
    assert result["summary"]["abs_rel"] == pytest.approx(0.0, abs=1e-5)
    assert result["summary"]["delta1"] == 1.0
    per_image = list(csv.DictReader(open(out.with_name("kitti_per_image.csv"))))
    assert len(per_image) == 2 and {"key", "abs_rel", "scale", "shift", "num_pixels"} <= set(per_image[0])
    summary = list(csv.DictReader(open(out.with_name("kitti_summary.csv"))))
    assert summary[0]["alignment"] == "lsq_disparity" and summary[0]["group"] == "all"


def test_eval_options_override_and_limit(kitti_with_predictions, tmp_path):
    root, preds = kitti_with_predictions
    out = tmp_path / "r.json"
    argv = ["--predictions", str(preds), "--output-space", "affine_disparity", "--dataset", "kitti"]
    argv += ["--data-root", str(root), "--out", str(out), "--quiet", "--limit", "1", "--crop", "eigen_kitti"]
    assert _run([*argv, "--metric-space", "disparity", "--worst", "1"]) == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == 1 and result["limit"] == 1 and result["overrides"] == {"crop": "eigen_kitti"}
    assert result["metric_space"] == "disparity" and out.with_name("r_worst.png").stat().st_size > 0


def test_cli_reports_missing_prediction_with_its_path(kitti_with_predictions, tmp_path, capsys):
    root, preds = kitti_with_predictions
    victim = sorted(preds.glob("*.npy"))[0]
    victim.unlink()
    argv = ["eval", "--predictions", str(preds), "--output-space", "affine_disparity", "--dataset", "kitti"]
    assert main([*argv, "--data-root", str(root), "--out", str(tmp_path / "r.json")]) == 1
    err = capsys.readouterr().err
    assert "depthkit eval: error:" in err and str(preds / victim.stem) in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--output-space"),
        (["--output-space", "metric_depth", "--model", "dav2_vits"], "exactly one of"),
        (["--output-space", "metric_depth", "--limit", "0"], "--limit"),
        (["--output-space", "affine_disparity", "--alignment", "median"], "cannot turn affine_disparity"),
        (["--output-space", "affine_disparity", "--min-depth", "79.9"], "none of the .* image\\(s\\) could be scored"),
    ],
)
def test_user_errors_are_value_errors(kitti_with_predictions, tmp_path, extra, message):
    root, preds = kitti_with_predictions
    argv = ["--predictions", str(preds), "--dataset", "kitti", "--data-root", str(root), "--quiet"]
    with pytest.raises(ValueError, match=message):
        _run([*argv, "--out", str(tmp_path / "r.json"), *extra])


def test_a_training_checkpoint_names_its_model_and_other_weights_need_one(fake_layout, tmp_path):
    from depthkit.models import create_model, save_checkpoint

    root, _ = fake_layout("diode")
    model = create_model("test_dav2_metric", max_depth=80.0)
    ckpt = tmp_path / "last.ckpt"  # as `depthkit fit` writes it: the model's name and overrides in hyper_parameters
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {
            "state_dict": state,
            "hyper_parameters": {"model": "test_dav2_metric", "model_overrides": {"max_depth": 80.0}},
        },
        ckpt,
    )
    out = tmp_path / "m.json"
    argv = ["--input-size", "28", "--device", "cpu", "--quiet", "--dataset", "diode", "--data-root", str(root)]
    assert _run(["--checkpoint", str(ckpt), *argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["predictions"]["model"] == "test_dav2_metric" and result["alignment"]["name"] == "none"
    with pytest.raises(ValueError, match="holds a test_dav2_metric model .* not test_dav2"):
        _run(["--checkpoint", str(ckpt), "--model", "test_dav2", *argv])
    plain = save_checkpoint(model, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="does not name its model .* add --model NAME"):
        _run(["--checkpoint", str(plain), *argv])


def test_eval_a_registry_model_end_to_end(fake_layout, tmp_path, capsys):
    """`--model` through depthkit.models: a tiny random-weight model, so only the plumbing is checked."""
    root, _ = fake_layout("diode")
    out = tmp_path / "m.json"
    argv = ["--model", "test_dav2", "--random-weights", "--input-size", "28", "--device", "cpu", "--quiet"]
    assert _run([*argv, "--dataset", "diode", "--data-root", str(root), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["predictions"]["model"] == "test_dav2" and result["alignment"]["name"] == "lsq_disparity"
    assert result["num_scored"] == 2 and all(np.isfinite(v) for v in result["summary"].values())
