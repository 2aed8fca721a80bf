"""Typed training configs: frozen keyword-only dataclasses whose field docstrings become `--help`."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with separate encoder / decoder learning rates, warmup, then a decay schedule (per step)."""

    encoder_lr: float = 5e-6
    """Learning rate of the pretrained encoder (Depth Anything V2: 5e-6)."""
    decoder_lr: float = 5e-5
    """Learning rate of the DPT head (Depth Anything V2: 10x the encoder's, 5e-5)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many optimizer steps."""
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    """Decay after warmup, over `trainer.max_steps`: "poly" (1 - t)^power (Depth Anything), "cosine", "constant"."""
    poly_power: float = 0.9
    """Exponent of the poly schedule."""
    min_lr_ratio: float = 0.0
    """Floor of the schedule as a fraction of the peak learning rate."""

    def __post_init__(self):
        if self.encoder_lr < 0 or self.decoder_lr <= 0:
            raise ValueError(f"optim: learning rates must be positive (encoder_lr may be 0), got {self}")
        if self.schedule not in ("poly", "cosine", "constant"):
            raise ValueError(f"optim.schedule={self.schedule!r}; expected 'poly', 'cosine' or 'constant'")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of the peak learning rate at optimizer step `step` of `total_steps`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant" or total_steps <= self.warmup_steps:
            return 1.0
        t = min(1.0, (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps))
        decay = (1.0 - t) ** self.poly_power if self.schedule == "poly" else 0.5 * (1.0 + math.cos(math.pi * t))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay


@dataclass(frozen=True, kw_only=True)
class LossWeights:
    """How the student's terms are combined."""

    labeled: float = 1.0
    """Weight of the loss on labeled images."""
    unlabeled: float = 1.0
    """Weight of the loss on pseudo-labeled (CutMix-ed, strongly augmented) images."""
    feature: float = 1.0
    """Weight of feature alignment to the frozen DINOv2 encoder (0 disables it)."""
    normalize: bool = True
    """Divide by the sum of the weights, so equal weights give the mean of the terms (Depth Anything V1)."""

    def __post_init__(self):
        if min(self.labeled, self.unlabeled, self.feature) < 0 or self.labeled + self.unlabeled + self.feature <= 0:
            raise ValueError(f"loss_weights must be >= 0 with a positive sum, got {self}")


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """What a `depthkit fit` checkpoint says of its run (`checkpoint["depthkit"]`, written by
    `DepthModule.on_save_checkpoint`), read back by `--ckpt_path` (`depthkit.train.cli.check_resume`)."""

    module: str | None = None
    """The LightningModule's class name: a teacher's run is not resumed as a student's."""
    schedule_steps: int | None = None
    """The steps the learning-rate schedule spans (`trainer.max_steps` then): a resume says when it changes."""
    wandb_run_id: str | None = None
    """The W&B run the metrics went to: a resumed fit continues it."""
    log_dir: str | None = None
    """The CSV logger's run folder (absolute): a resumed fit logs on into it (`depthkit.train.CSVLogger`)."""
    run_id: str | None = None
    """The run's identity (random, kept across resumes): the run folder a resume continues must be this run's."""

    @classmethod
    def of(cls, checkpoint: dict) -> RunRecord:
        """The record of a loaded checkpoint (empty for one without; fields of other depthkit versions ignored)."""
        known = {field.name for field in fields(cls)}
        return cls(**{k: v for k, v in (checkpoint.get("depthkit") or {}).items() if k in known})

    def to_dict(self) -> dict:
        """The fields that are set, as saved in a checkpoint."""
        return {
            field.name: getattr(self, field.name) for field in fields(self) if getattr(self, field.name) is not None
        }
