"""Run by test_train.py under torchrun: 3 DDP steps on CPU (gloo); each rank writes the keys it saw and its params."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from depthkit.train import DepthDataModule, DepthModule, ImagePanels, Preemption, ThroughputMonitor


class Probe(L.Callback):
    def __init__(self, out: Path):
        self.out, self.keys = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys += batch["key"]

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        (self.out / f"keys_{rank}.txt").write_text("\n".join(self.keys))
        torch.save(
            {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}, self.out / f"params_{rank}.pt"
        )


if __name__ == "__main__":
    shards, out = sys.argv[1], Path(sys.argv[2])
    L.seed_everything(0)
    module = DepthModule("test_dav2", panel_every_n_steps=1)
    data = DepthDataModule(shards, batch_size=2, crop_size=42, num_workers=0, resampled=False, shuffle_buffer=0)
    # The callbacks of configs/trainer/*.yaml ride along: rank-0-only code in them must never block the others.
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=3,
        logger=CSVLogger(out),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[Probe(out), ThroughputMonitor(), ImagePanels(), Preemption()],
    )
    trainer.fit(module, data)
