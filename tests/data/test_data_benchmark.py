"""benchmarks/data.py runs in a small form and prints every row. It is never a timed test."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "data.py"


def test_the_data_benchmark_runs_every_pipeline():
    args = [sys.executable, str(SCRIPT), "--num", "16", "--size", "56", "70", "--crop", "42", "--repeat", "1"]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=600).stdout
    rows = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()[2:]}
    assert set(rows) == {
        "synthetic_256x256_images_per_s",
        "plain_webdataset_decode_samples_per_s",
        "depthkit_labeled_pipeline_samples_per_s",
        "pipeline_vs_plain_ratio",
        "student_pseudo_pipeline_ms_per_sample",
        "student_pipeline_vs_plain_ratio",
    }
    assert all(value > 0 for value in rows.values())
