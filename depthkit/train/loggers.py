"""The CSV logger of depthkit runs: Lightning's, continued across resumes.

Lightning's `CSVLogger` starts a new `version_N` folder on every resume (and, given an existing version, deletes its
`metrics.csv`), so a preempted run's metrics, checkpoints and config ended up split over as many folders as it had
restarts. A resumed `depthkit fit` (`DepthCLI`) continues the folder its checkpoint was written from instead: the
metrics of the steps the resume repeats are replaced, the rest kept.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from depthkit._files import read_json_object, replacing, write_json_atomic

RUN_MARK = "run.json"
"""Beside a run's metrics: `{"run_id", "step"}` of the newest checkpoint saved from the run into this folder."""


class ContinuedWriter(ExperimentWriter):
    """Lightning's metrics writer, which keeps the rows of a `metrics.csv` already in its folder, but those at or
    after the first step it logs itself (a run resumed from step N logs steps from N again)."""

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv
        self._continuing = os.path.isfile(self.metrics_file_path)

    def save(self) -> None:
        if self._continuing and self.metrics:
            self._continuing = False
            self._merge_earlier_rows(min(row["step"] for row in self.metrics))
        super().save()

    def _merge_earlier_rows(self, first_step: int) -> None:
        with open(self.metrics_file_path, newline="") as file:
            reader = csv.DictReader(file)
            keys = list(reader.fieldnames or [])
            rows = [row for row in reader if not row.get("step") or int(float(row["step"])) < first_step]
        self.metrics_keys = sorted(set(keys).union(*self.metrics))
        with replacing(Path(self.metrics_file_path)) as partial, open(partial, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


class CSVLogger(LightningCSVLogger):
    """Lightning's CSV logger (`<save_dir>/<name>/version_N/metrics.csv`, `hparams.yaml`), the default logger of
    `depthkit fit`. Given a `version` whose folder holds a `metrics.csv`, it continues that file (see
    `ContinuedWriter`) instead of deleting it."""

    def continue_run(self, log_dir: str | os.PathLike, *, run_id: str | None, step: int) -> str | None:
        """Log into `log_dir`, the folder of the run being resumed from its checkpoint of `step`, when it is a version
        folder of this logger (whose `version` is not configured), it holds that run (`RUN_MARK`: the same
        `run_id`), and no newer checkpoint of it: a resume from an older one branches the run, and continuing the
        folder would overwrite the later metrics and `last.ckpt`. Returns why not, or None when it will."""
        log_dir = Path(log_dir)
        if self._version is not None or self._experiment is not None:
            return "the CSV logger's version is configured"
        if not log_dir.is_dir() or log_dir.parent.resolve() != Path(self.root_dir).resolve():
            return f"{log_dir} is no run folder under {self.root_dir}"
        mark = folder_mark(log_dir)
        if run_id is None or mark.get("run_id") != run_id:
            return f"{log_dir} holds another run"
        if step < mark.get("step", 0):
            return f"{log_dir} holds a newer checkpoint of the run (step {mark['step']}): this one branches it"
        self._version = log_dir.name
        return None

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuedWriter(log_dir=self.log_dir)
        return self._experiment


def mark_run_folder(log_dir: str | os.PathLike, run_id: str, step: int) -> None:
    """Record in a run folder which run saved its newest checkpoint, at which step (`CSVLogger.continue_run`)."""
    write_json_atomic(Path(log_dir) / RUN_MARK, {"run_id": run_id, "step": int(step)})


def folder_mark(log_dir: str | os.PathLike) -> dict:
    """A run folder's `RUN_MARK` ({} without a readable one)."""
    return read_json_object(Path(log_dir) / RUN_MARK)
