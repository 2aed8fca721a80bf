"""Run by test_train.py under torchrun or an emulated srun: a few steps on CPU processes (gloo), DDP or FSDP2.

Usage: parallel_probe.py DATA_ROOT OUT STRATEGY KIND [preempt | resume=CKPT]: STRATEGY `ddp` | `fsdp2` | `fsdp2_bf16`
(FSDP2 with `param_dtype="bf16"`) | `hsdp` (FSDP2 with `hybrid_shard`), KIND `teacher` | `student`, on
$PROBE_NUM_NODES nodes (1 by default) of 2 processes each.
With `preempt`, rank 1 alone sends itself SIGUSR1 during the second step: every rank must save `OUT/preempted.ckpt`
and exit with 138. With `resume=CKPT`, the run continues from that checkpoint.

Each rank writes the keys it saw (`keys_<rank>.txt`), the full parameters of the model after the steps
(`params_<rank>.pt`, gathered from the shards under FSDP2), per parameter the fraction of it held locally
(`local_<rank>.pt`: 1.0 everywhere under DDP, about 1 / world size under FSDP2) and its local shards
(`shards_<rank>.pt`, FSDP2 only), and the dtypes of a block's and the prediction layer's weights while they ran
(`dtypes_<rank>.json`).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from depthkit.train import (
    DepthDataModule,
    DepthModule,
    FSDP2Strategy,
    ImagePanels,
    Preemption,
    StudentModule,
    ThroughputMonitor,
)


class Probe(L.Callback):
    def __init__(self, out: Path, preempt: bool):
        self.out, self.keys, self.preempt = out, [], preempt

    def on_train_start(self, trainer, pl_module):
        # The dtypes of the weights while they run: pre-hooks run after FSDP2's own, which gathers them.
        self.dtypes = {}
        watch = {"block": (pl_module.model.encoder.blocks[0], "attn.qkv.weight")}
        watch["prediction"] = (pl_module.model.head.prediction_layer, "weight")
        for name, (mod, param) in watch.items():
            mod.register_forward_pre_hook(functools.partial(self._record, name, param))

    def _record(self, name: str, param: str, module, args) -> None:
        self.dtypes.setdefault(name, str(module.get_parameter(param).dtype))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys += batch["labeled"]["key"] if "labeled" in batch else batch["key"]
        if self.preempt and batch_idx == 1 and trainer.global_rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        (self.out / f"keys_{rank}.txt").write_text("\n".join(self.keys))
        full = get_model_state_dict(pl_module.model, options=StateDictOptions(full_state_dict=True))
        torch.save({k: v.detach().clone() for k, v in full.items()}, self.out / f"params_{rank}.pt")
        local = {
            name: (p.to_local().numel() if hasattr(p, "to_local") else p.numel()) / p.numel()
            for name, p in pl_module.named_parameters()
        }
        torch.save(local, self.out / f"local_{rank}.pt")
        (self.out / f"dtypes_{rank}.json").write_text(json.dumps(self.dtypes))
        broadcast = trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor  # Lightning's per-batch sync, or not
        (self.out / f"sigterm_broadcast_{rank}.txt").write_text(getattr(broadcast, "__name__", "?"))
        shards = {name: p.to_local().clone() for name, p in pl_module.named_parameters() if hasattr(p, "to_local")}
        torch.save(shards, self.out / f"shards_{rank}.pt")


if __name__ == "__main__":
    root, out, strategy, kind = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    preempt = sys.argv[5:] == ["preempt"]
    resume = sys.argv[5].removeprefix("resume=") if sys.argv[5:6] and sys.argv[5].startswith("resume=") else None
    L.seed_everything(0)
    if kind == "student":
        module = StudentModule("test_dav2", panel_every_n_steps=1)
        extra = {"unlabeled": str(root / "unlabeled"), "pseudo_labels": str(root / "pseudo")}
    else:
        module, extra = DepthModule("test_dav2", panel_every_n_steps=1), {}
    data = DepthDataModule(
        str(root / "labeled"), batch_size=2, crop_size=42, num_workers=0, resampled=False, shuffle_buffer=0, **extra
    )
    # The callbacks of configs/trainer/*.yaml ride along: rank-0-only code in them must never block the others.
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy={
            "fsdp2": FSDP2Strategy(),
            "fsdp2_bf16": FSDP2Strategy(param_dtype="bf16"),
            "hsdp": FSDP2Strategy(hybrid_shard=True),
        }.get(strategy, strategy),
        num_nodes=int(os.environ.get("PROBE_NUM_NODES", "1")),
        max_steps=3,
        logger=CSVLogger(out),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[Probe(out, preempt), ThroughputMonitor(), ImagePanels(), Preemption(dirpath=str(out))],
    )
    trainer.fit(module, data, ckpt_path=resume)
