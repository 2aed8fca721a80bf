"""`depthkit fit | validate | test`: LightningCLI over `DepthModule` subclasses and `DepthDataModule`.

Configs compose with repeated `--config` (later files override earlier ones) and dotted overrides
(`--trainer.max_steps 100`). A recipe may name fragment files for whole sections (`model: ../configs/...yaml`).
Errors in the configuration (unknown model, missing shards, bad ratio, a checkpoint of another architecture)
are printed as one clear message before any training starts.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from depthkit.train.data import DepthDataModule
from depthkit.train.module import DepthModule


def build_cli(argv: list[str], *, run: bool = True) -> LightningCLI:
    return LightningCLI(
        DepthModule,
        DepthDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        # From the command line, LightningCLI reads sys.argv itself (given both, it warns on every run).
        args=None if argv == sys.argv[1:] else argv,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "depthkit"},
    )


def run_lightning_cli(argv: list[str]) -> int:
    try:
        build_cli(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"depthkit {argv[0] if argv else ''}: error: {err}", file=sys.stderr)
        return 1
    return 0
