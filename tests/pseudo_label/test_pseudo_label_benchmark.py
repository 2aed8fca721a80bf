"""benchmarks/pseudo_label.py runs in its CI-sized CPU form and writes every ratio. It is never a timed test."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pseudo_label.py"


def test_quick_pseudo_label_benchmark_writes_its_ratios(tmp_path):
    out = tmp_path / "pseudo_label.csv"
    args = [sys.executable, str(SCRIPT), "--quick", "--repeat", "1", "--single-num", "4", "--encoding", "npz"]
    result = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["metric"]: r for r in csv.DictReader(out.open())}
    for metric in ("pure_forward_images_per_s", "one_at_a_time_images_per_s", "job_images_per_s_npz"):
        assert float(rows[metric]["value"]) > 0, metric
    assert float(rows["job_vs_pure_forward_ratio_npz"]["target"]) == 0.8
    assert 0 < float(rows["job_vs_pure_forward_ratio_npz"]["value"]) < 10
    assert "model test_dav2, device cpu" in rows["pure_forward_images_per_s"]["setup"]


def test_label_encoding_benchmark_compares_every_encoding_exactly_where_lossless():
    script = SCRIPT.with_name("label_encoding.py")
    args = [sys.executable, str(script), "--height", "70", "--width", "90", "--repeat", "1"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:-1]}
    assert set(rows) == {"npz-whole", "npz", "f16", "png16"}
    assert float(rows["npz"][-1]) == 0 and float(rows["npz-whole"][-1]) == 0  # lossless
    assert "npz (byte planes) vs npz-whole" in out.splitlines()[-1]
