"""The Lightning internals depthkit leans on, where no public hook does the job. Most are used behind a guard or a
fallback (so a renamed one would not fail a run, it would silently stop working): this fails on the Lightning that
renames one, so the upgrade is looked at."""

import lightning.fabric.strategies.model_parallel as model_parallel
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

from depthkit.train import CSVLogger


def test_the_internals_depthkit_uses_are_there(tmp_path):
    # depthkit.train.module.logs_this_step: log only at logging steps (else every step pays for `self.log`).
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    assert isinstance(trainer._logger_connector.should_update_logs, bool)
    # depthkit.train.cli.DepthCLI: the resume checks run before Lightning replaces the module's arguments.
    assert callable(LightningCLI._parse_ckpt_path)
    # depthkit.train.callbacks.Preemption: Lightning's per-batch SIGTERM broadcast (a GPU sync) replaced.
    assert callable(_TrainingEpochLoop._broadcast_sigterm_tensor)
    # depthkit.train.parallel: optimizer states of DDP checkpoints rekeyed for FSDP2.
    assert callable(model_parallel._rekey_optimizer_state_if_needed)
    # depthkit.train.loggers: the CSV writer's delete-on-start step, and the logger's version slot.
    assert callable(_ExperimentWriter._check_log_dir_exists)
    logger = CSVLogger(tmp_path)
    assert logger._version is None and logger._experiment is None
