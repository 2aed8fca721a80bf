"""`make demo` wiring: every stage runs and the report is written (slow: run with `-m slow`)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "depthkit.demo", "--out", str(out), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = result.stdout + result.stderr
    for stage in ("1/7", "2/7", "3/7", "4/7", "5/7", "6/7", "7/7"):
        assert f"[demo] {stage}" in log, log[-3000:]
    for name in (
        "report.md",
        "samples.png",
        "loss_curves.png",
        "student.onnx",
        "student_official.pth",
        "eval_rgbd_teacher.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "wandb").is_dir() and not (out / "wandb" / "wandb").exists()  # W&B's runs, one folder deep
    report = (out / "report.md").read_text()
    assert "| ramp |" in report and "| teacher |" in report and "| student |" in report
    # Three steps cannot meet the honesty bar: the demo must say so and fail, not pass quietly.
    assert result.returncode == 1 and "FAIL: teacher AbsRel <= 0.5 x ramp AbsRel" in report
