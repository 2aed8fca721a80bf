"""depthkit's CSV logger continues a resumed run's metrics.csv (Lightning's deletes it)."""

import csv

from depthkit.train import CSVLogger
from depthkit.train.loggers import mark_run_folder


def _rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_a_continued_run_keeps_the_earlier_rows_and_replaces_the_repeated_steps(tmp_path):
    first = CSVLogger(tmp_path)
    for step in range(6):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.save()
    mark_run_folder(first.log_dir, "run-a", 3)  # its newest checkpoint: step 3 (the process died at step 5)
    # Resumed from the checkpoint of step 3: steps 3-5 are trained (and logged) again, with a new metric.
    resumed = CSVLogger(tmp_path)
    assert resumed.continue_run(first.log_dir, run_id="run-a", step=3) is None
    resumed.log_metrics({"train/loss": 30.0, "val/abs_rel": 0.5}, step=3)
    resumed.save()
    resumed.log_metrics({"train/loss": 40.0}, step=4)
    resumed.save()
    rows = _rows(tmp_path / "lightning_logs/version_0/metrics.csv")
    assert [(int(r["step"]), float(r["train/loss"])) for r in rows] == [(0, 0), (1, 1), (2, 2), (3, 30), (4, 40)]
    assert [r["val/abs_rel"] for r in rows] == ["", "", "", "0.5", ""]
    assert not (tmp_path / "lightning_logs/version_1").exists()


def test_only_the_runs_own_folder_without_a_newer_checkpoint_is_continued(tmp_path):
    first = CSVLogger(tmp_path / "a")
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.save()
    mark_run_folder(first.log_dir, "run-a", 20)

    def why_not(logger=None, **kw):
        return (logger or CSVLogger(tmp_path / "a")).continue_run(
            **{"log_dir": first.log_dir, "run_id": "run-a", "step": 20, **kw}
        )

    assert "no run folder under" in why_not(CSVLogger(tmp_path / "b"))  # a checkpoint copied into another root
    assert "version is configured" in why_not(CSVLogger(tmp_path / "a", version="mine"))
    assert "no run folder under" in why_not(log_dir=tmp_path / "a/lightning_logs/version_7")  # gone
    assert "holds another run" in why_not(run_id="run-b")  # the folder was reused by another run
    assert "holds another run" in why_not(run_id=None)  # a checkpoint without a run id
    assert "step 20): this one branches it" in why_not(step=10)  # an older checkpoint: a branch
    assert why_not(step=25) is None
    fresh = CSVLogger(tmp_path / "a")
    fresh.log_metrics({"train/loss": 2.0}, step=0)
    fresh.save()
    assert fresh.log_dir.endswith("version_1")
    assert [r["train/loss"] for r in _rows(first.experiment.metrics_file_path)] == ["1.0"]


def test_the_run_record_reads_what_it_wrote_and_ignores_other_fields():
    from depthkit.train.config import RunRecord

    record = RunRecord(module="StudentModule", schedule_steps=10, log_dir="/runs/a/version_0", run_id="r")
    saved = record.to_dict()
    assert saved == {"module": "StudentModule", "schedule_steps": 10, "log_dir": "/runs/a/version_0", "run_id": "r"}
    assert RunRecord.of({"depthkit": {**saved, "from_a_later_version": 1}}) == record
    assert RunRecord.of({}) == RunRecord()  # a Lightning checkpoint of another tool
