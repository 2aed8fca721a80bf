"""Epoch mode (`data.resampled false`) under Lightning: new epochs, and resumes mid-epoch and at an epoch's end."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from depthkit.data.convert import write_synthetic
from depthkit.train import DepthDataModule


class KeyRecorder(L.LightningModule):
    """Trains nothing; records the keys of each epoch's batches."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.seen: dict[int, list[str]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(batch["key"])
        return (batch["image"].float().mean() * self.weight).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(data, ckpt_dir=None, ckpt_path=None) -> dict[int, list[str]]:
    module = KeyRecorder()
    datamodule = DepthDataModule(str(data), batch_size=4, crop_size=28, num_workers=0, resampled=False, val=None)
    save = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=6, save_top_k=-1, filename="{step}")]
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        callbacks=save if ckpt_dir else [],
        enable_checkpointing=bool(ckpt_dir),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule, ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.parametrize("step", [6, 12])  # 12 batches an epoch: mid-epoch, and the epoch's last batch
def test_epochs_differ_and_a_resume_continues_them(tmp_path, step):
    """Each epoch is new (Lightning calls no set_epoch on a dataset). Resumed at the last batch of epoch 0, the run
    used to begin with an empty epoch (the rest of epoch 0) and then lag one epoch behind."""
    write_synthetic(tmp_path / "data", num=48, size=(28, 28), shard_size=6)
    full = _fit(tmp_path / "data", ckpt_dir=tmp_path / "ckpt")
    assert [len(full[e]) for e in range(3)] == [48, 48, 48] and full[0] != full[1] != full[2]
    resumed = _fit(tmp_path / "data", ckpt_path=str(tmp_path / "ckpt" / f"step={step}.ckpt"))
    assert resumed.get(0, []) == full[0][step * 4 :]
    assert resumed[1] == full[1] and resumed[2] == full[2]
