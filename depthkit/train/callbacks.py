"""Callbacks: progress bar, throughput and data-wait logging, image panels, preemption checkpoints."""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from depthkit._files import write_bytes_atomic
from depthkit.colors import colorize, robust_range
from depthkit.data.stream import batch_parts
from depthkit.train.module import logs_this_step

log = logging.getLogger("depthkit.train")

PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps to `max_steps` and without the logger's `v_num`;
    `depthkit fit` adds it unless the config names a bar.

    Lightning's bars count batches of the current epoch, which a stream of resampled shards never ends: its rich bar
    reads "Epoch 0/-2", and a resumed run "Epoch 1: 130/128". tqdm needs no extra package and writes plain lines into
    batch-job logs.
    """

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if trainer.max_steps > 0 and bar is not None:
            bar.total, bar.initial, bar.n = trainer.max_steps, trainer.global_step, trainer.global_step
            bar.set_description("train steps")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if trainer.max_steps <= 0 or bar is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._should_update(trainer.global_step, bar.total) and not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class ThroughputMonitor(L.Callback):
    """Logs `perf/images_per_s` (all ranks), `perf/data_wait_fraction` and `data/skipped` at each logging step.

    Both rates cover the steps since the last logging step (the first step, start-up, is left out). Data wait is the
    time from the end of one step to the start of the next (the loader's turn); the rest is compute. A step after a
    validation or a checkpoint save is left out too: that time is neither. Images count labeled + unlabeled images
    on this rank, times the world size.
    """

    def __init__(self):
        self._step_end: float | None = None
        self._step_start = 0.0
        self._interrupted = False  # a validation or a save since the last step
        self._window = [0, 0.0, 0.0]  # images, wait seconds, total seconds

    def on_validation_start(self, trainer, pl_module):
        self._interrupted = True

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._interrupted = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_start = time.perf_counter()
        self._wait = 0.0 if self._step_end is None else self._step_start - self._step_end
        self._counted, self._interrupted = self._step_end is not None and not self._interrupted, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._counted:
            images = sum(int(part["image"].shape[0]) for part in batch_parts(batch).values())
            self._window[0] += images * trainer.world_size
            self._window[1] += self._wait
            self._window[2] += now - self._step_start + self._wait
        self._step_end = now
        if not logs_this_step(trainer):
            return
        # Host tensors: Lightning would copy a Python number to the device, and that copy waits for the step.
        images, wait, total = self._window
        if total > 0:
            pl_module.log_dict(
                {
                    "perf/images_per_s": torch.tensor(images / total),
                    "perf/data_wait_fraction": torch.tensor(wait / total),
                },
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )
            self._window = [0, 0.0, 0.0]
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "num_skipped"):
            pl_module.log("data/skipped", torch.tensor(float(datamodule.num_skipped)), on_step=True, batch_size=1)


def panel_image(panel: dict) -> np.ndarray:
    """input | target | prediction (least-squares aligned to the target) | absolute error, side by side.

    Target and prediction share one colour scale, the target's (a prediction twice too far, or flat, looks so);
    near is red in disparity and in depth. The error's scale is fixed at half the target's range, so panels of a
    run show it shrink.
    """
    image = panel["image"].permute(1, 2, 0).numpy()
    target, valid, pred = panel["target"].numpy(), panel["valid"].numpy(), panel["pred"].numpy()
    aligned = pred
    if valid.sum() >= 2 and panel["space"] != "metric_depth":
        a = np.stack([pred[valid], np.ones(valid.sum())], 1)
        (scale, shift), *_ = np.linalg.lstsq(a.astype(np.float64), target[valid].astype(np.float64), rcond=None)
        aligned = scale * pred + shift
    error = np.abs(aligned - target)
    lo, hi = robust_range(target, valid)
    cmap = "Spectral" if panel["space"] == "metric_depth" else "Spectral_r"  # near: small depth, large disparity
    tiles = [
        image,
        colorize(target, valid, cmap, (lo, hi)),
        colorize(aligned, valid, cmap, (lo, hi)),
        colorize(error, valid, "magma", (0.0, (hi - lo) / 2)),
    ]
    return np.concatenate(tiles, axis=1)


class ImagePanels(L.Callback):
    """Every time the module keeps a sample (`panel_every_n_steps`), logs an input | target | prediction | error
    panel as `panels/<name>` (a student's pseudo-labeled sample: `panels/train_unlabeled`): to W&B
    (`WandbLogger.log_image`) when it is the logger, else as PNG under the log directory (`panels/<name>/`)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        panels = getattr(pl_module, "panels", None)
        if not panels or not trainer.is_global_zero:
            return
        pl_module.panels = {}
        for name, panel in panels.items():
            self.log_panel(trainer, name, panel)

    @staticmethod
    def log_panel(trainer, name: str, panel: dict) -> None:
        picture = panel_image(panel)
        caption = f"step {panel['step']}: input | {panel.get('target_name', 'target')} | prediction (aligned) | error"
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                # At the step whose training_step kept it, beside its metrics (global_step has moved on by now).
                logger.log_image(key=f"panels/{name}", images=[picture], caption=[caption], step=panel["step"])
                return
        from PIL import Image

        # `trainer.log_dir` would broadcast across ranks; only rank 0 is here, so ask the logger directly.
        folder = Path(getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir) / "panels" / name
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(picture).save(buf, format="PNG")
        write_bytes_atomic(folder / f"step_{panel['step']:08d}.png", buf.getvalue())


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: workers ignore the preemption signals, which SLURM sends to every process of the
    job. A worker killed by one fails the main process mid-step, before `Preemption` can save; the main process
    shuts its workers down when it exits."""
    for name in PREEMPTION_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def mark_preempted(loggers, exit_code: int) -> None:
    """Tell a W&B run that it was preempted and ends with `exit_code`: W&B otherwise records a preempted run as
    finished (exit code 0), though the process exits with 128 + the signal."""
    for logger in loggers:
        run = getattr(logger, "experiment", None)
        if hasattr(run, "mark_preempting") and hasattr(run, "finish"):  # a wandb Run
            run.mark_preempting()
            run.finish(exit_code=exit_code)


def requeue_slurm_job() -> None:
    """`scontrol requeue` this SLURM job (an array job's task), as Lightning's auto-requeue does; a failure is
    logged (an interactive allocation cannot be requeued)."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    try:
        code = subprocess.call(["scontrol", "requeue", job])
    except OSError as err:
        code = str(err)
    if code == 0:
        log.warning("requeued SLURM job %s", job)
    else:
        log.warning("could not requeue SLURM job %s (scontrol requeue: %s)", job, code)


def _agreed_elsewhere() -> None:
    """Stands in for Lightning's per-batch SIGTERM broadcast (see `Preemption._take_over_signals`)."""


def _remove(path: Path) -> None:
    """Remove a file or a folder (a sharded checkpoint), if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _replace(new: Path, path: Path) -> None:
    """Rename `new` to `path`, also when either is a folder (a sharded checkpoint): `os.replace` cannot replace a
    folder that holds files. The old one is moved aside first and removed after, so `path` is never missing a
    whole checkpoint for longer than two renames."""
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(path.name + ".old")
        _remove(old)
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old)
    else:
        if new.is_dir():
            path.unlink(missing_ok=True)  # a single-file checkpoint replaced by a sharded one
        os.replace(new, path)


class Preemption(L.Callback):
    """On SIGTERM or SIGUSR1 (cluster preemption), save `preempted.ckpt` after the current optimizer step and exit.

    The checkpoint holds model, optimizer, scheduler, step and data position; resume with
    `depthkit fit ... --ckpt_path <dir>/preempted.ckpt`. It is written beside its final name and renamed into place:
    Lightning stages checkpoints in $TMPDIR, often another filesystem, where its final move is a non-atomic copy.

    A signal is only recorded when it arrives. The previous handlers (Lightning's SIGTERM handler) run after the
    checkpoint is saved, on every rank; in place of Lightning's SLURM auto-requeue handler (SIGUSR1), which would
    save a second full checkpoint, rank 0 requeues the job itself (`requeue_slurm_job`). Run first, Lightning's
    SIGTERM handler would stop the loop at the end of the step, before this callback can save, and in the sanity
    check it ends the run with status 0. The handlers are taken over from the sanity check on (Lightning installs
    its own just before), so a signal that arrives there is kept for the first optimizer step. The process then
    exits with status 128 + the signal number, as a shell reports a process killed by it, so launchers see an
    unfinished run, not a success.
    """

    def __init__(self, dirpath: str | None = None, signals: tuple[str, ...] = PREEMPTION_SIGNALS):
        self.dirpath, self.signal_names = dirpath, signals
        self._received = 0
        self._previous: dict = {}
        self._group = None

    def on_sanity_check_start(self, trainer, pl_module):
        self._take_over_signals(trainer)

    def on_train_start(self, trainer, pl_module):
        self._take_over_signals(trainer)  # no sanity check in this run

    def _take_over_signals(self, trainer) -> None:
        if trainer.world_size > 1 and self._group is None:
            # Ranks agree on a signal after every optimizer step. A CPU (gloo) all-reduce keeps that off the GPU:
            # on the NCCL group it would be a device tensor read back each step, a full GPU sync.
            self._group = torch.distributed.new_group(backend="gloo")
            epoch_loop = trainer.fit_loop.epoch_loop
            if "SIGTERM" in self.signal_names and hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
                # Lightning (2.6) broadcasts its own SIGTERM flag from rank 0 before every batch, as a device tensor
                # it reads back (`.item()`): with several processes the host waited for the GPU each step. This
                # callback already agrees on SIGTERM through gloo and stops every rank itself.
                epoch_loop._broadcast_sigterm_tensor = _agreed_elsewhere
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.signal_names:
            signum = getattr(signal, name, None)
            if signum is None or signum in self._previous:
                continue
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        self._received = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: the gradients gathered so far would be in no checkpoint
        signum = int(self._received)
        if trainer.world_size > 1:
            received = torch.tensor([signum], dtype=torch.int64)
            torch.distributed.all_reduce(received, op=torch.distributed.ReduceOp.MAX, group=self._group)
            signum = int(received)
        if not signum:
            return
        name = signal.Signals(signum).name
        if 0 < trainer.max_steps <= trainer.global_step:
            # The last step is done: the run ends now as finished (last.ckpt, exit 0). Saved as preempted, it exited
            # 128 + N and was requeued, and the requeued resume found nothing left to train.
            log.warning("received %s after the last step (%d): the run finishes", name, trainer.global_step)
            self._received = 0
            return
        path = Path(self.dirpath or trainer.default_root_dir) / "preempted.ckpt"
        partial = path.with_name(path.name + ".partial")
        if trainer.is_global_zero:
            _remove(partial)  # an earlier save's leftover: a sharded save would write into it
        trainer.strategy.barrier("preempted-partial")
        trainer.save_checkpoint(partial, weights_only=False)
        if trainer.is_global_zero:
            _replace(partial, path)
        trainer.strategy.barrier("preempted-checkpoint")
        log.warning("received %s: saved %s at step %d, exiting", name, path, trainer.global_step)
        previous = self._previous.get(signum)
        if signum == signal.SIGUSR1 and type(previous).__module__.startswith("lightning."):
            # Lightning's SLURM auto-requeue handler would also save hpc_ckpt_N.ckpt, a second full checkpoint in
            # the minutes before the kill (one more file each requeue, which Lightning would later resume from
            # without depthkit's checks): only its requeue is kept.
            if trainer.is_global_zero:
                requeue_slurm_job()
            # Until the job is requeued: srun --kill-on-bad-exit would end rank 0 with the first rank that exits.
            trainer.strategy.barrier("requeued")
        elif callable(previous):
            previous(signum, None)
        if trainer.is_global_zero:
            mark_preempted(trainer.loggers, 128 + signum)
        raise SystemExit(128 + signum)

    def teardown(self, trainer, pl_module, stage):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
