"""benchmarks/train_step.py runs on CPU (tiny model, a few steps) and writes its CSV. It is never a timed test."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_step.py"


def test_train_step_benchmark_runs_both_loops_and_writes_csv(tmp_path):
    out = tmp_path / "train_step.csv"
    args = [sys.executable, str(SCRIPT), "--steps", "3", "--warmup", "1", "--repeats", "1", "--out", str(out)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = csv.DictReader(out.open())
    assert row["device"] == "cpu (1 thread)" and row["model"] == "test_dav2"
    fit, plain, ratio = float(row["fit_images_per_s"]), float(row["plain_images_per_s"]), float(row["ratio"])
    assert fit > 0 and plain > 0 and 0 < ratio < 10
    assert "ratio" in result.stdout


def test_find_syncs_must_stay_between_two_logging_steps():
    args = [sys.executable, str(SCRIPT), "--find-syncs", "20", "--log-every", "20"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--find-syncs 20 must be below --log-every 20" in result.stderr
