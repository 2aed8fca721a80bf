"""depthkit's CSV logger continues a resumed run's metrics.csv (Lightning's deletes it)."""

import csv

from depthkit.train import CSVLogger


def _rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_a_continued_run_keeps_the_earlier_rows_and_replaces_the_repeated_steps(tmp_path):
    first = CSVLogger(tmp_path)
    for step in range(6):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.save()
    # Resumed from the checkpoint of step 3: steps 3-5 are trained (and logged) again, with a new metric.
    resumed = CSVLogger(tmp_path)
    assert resumed.continue_run(first.log_dir)
    resumed.log_metrics({"train/loss": 30.0, "val/abs_rel": 0.5}, step=3)
    resumed.save()
    resumed.log_metrics({"train/loss": 40.0}, step=4)
    resumed.save()
    rows = _rows(tmp_path / "lightning_logs/version_0/metrics.csv")
    assert [(int(r["step"]), float(r["train/loss"])) for r in rows] == [(0, 0), (1, 1), (2, 2), (3, 30), (4, 40)]
    assert [r["val/abs_rel"] for r in rows] == ["", "", "", "0.5", ""]
    assert not (tmp_path / "lightning_logs/version_1").exists()


def test_only_a_version_folder_of_the_same_logger_is_continued(tmp_path):
    first = CSVLogger(tmp_path / "a")
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.save()
    elsewhere = CSVLogger(tmp_path / "b")  # a checkpoint copied into another run root starts a new run there
    assert not elsewhere.continue_run(first.log_dir)
    assert not CSVLogger(tmp_path / "a", version="mine").continue_run(first.log_dir)  # a configured version wins
    assert not CSVLogger(tmp_path / "a").continue_run(tmp_path / "a/lightning_logs/version_7")  # gone
    fresh = CSVLogger(tmp_path / "a")
    fresh.log_metrics({"train/loss": 2.0}, step=0)
    fresh.save()
    assert fresh.log_dir.endswith("version_1")
    assert [r["train/loss"] for r in _rows(first.experiment.metrics_file_path)] == ["1.0"]


def test_the_run_record_reads_what_it_wrote_and_ignores_other_fields():
    from depthkit.train.config import RunRecord

    record = RunRecord(module="StudentModule", schedule_steps=10, log_dir="/runs/a/version_0")
    saved = record.to_dict()
    assert saved == {"module": "StudentModule", "schedule_steps": 10, "log_dir": "/runs/a/version_0"}
    assert RunRecord.of({"depthkit": {**saved, "from_a_later_version": 1}}) == record
    assert RunRecord.of({}) == RunRecord()  # a Lightning checkpoint of another tool
