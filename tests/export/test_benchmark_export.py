"""benchmarks/export.py runs and writes its CSV (tiny model, one iteration). It is never a timed test."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "export.py"


def test_benchmark_runs_and_writes_csv(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_export", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # in-process: a fresh interpreter would spend most of the time importing torch
    args = ["--size", "28x42", "--threads", "1", "--warmup", "0", "--iters", "1", "--csv", "--out-dir", str(tmp_path)]
    assert script.main(args) == 0
    assert "torch/ort" in capsys.readouterr().out
    (row,) = list(csv.DictReader((tmp_path / "export_cpu.csv").open()))
    assert row["model"] == "test_dav2" and (row["height"], row["width"]) == ("28", "42")
    assert float(row["torch_eager_ms"]) > 0 and float(row["onnxruntime_ms"]) > 0
    assert float(row["max_rel_err"]) < 1e-4
