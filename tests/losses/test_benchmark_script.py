"""benchmarks/losses.py runs (--quick; on CPU the eager reference only). It is never a timed test."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "losses.py"


def test_quick_benchmark_runs_and_writes_csv(tmp_path):
    args = [sys.executable, str(SCRIPT), "--quick", "--out-dir", str(tmp_path), "--dtypes", "fp32"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (csv_path,) = tmp_path.glob("losses_*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    ops = {r["op"] for r in rows}
    assert {"ssi_lsq", "ssi_median", "gradient_matching", "feature_alignment"} <= ops
    if not torch.cuda.is_available():
        assert csv_path.name == "losses_cpu-quick.csv"
        assert {r["impl"] for r in rows} == {"eager"}
