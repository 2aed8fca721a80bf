"""`depthkit fit | validate | test`: LightningCLI over `DepthModule` subclasses and `DepthDataModule`.

Configs compose with repeated `--config` (later files override earlier ones) and dotted overrides
(`--trainer.max_steps 100`). A recipe may name fragment files for whole sections (`model: ../configs/...yaml`).
Errors in the configuration (unknown model, missing shards, bad ratio, a checkpoint of another architecture)
are printed as one clear message before any training starts.
"""

from __future__ import annotations

import logging
import sys
import warnings

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks.progress import ProgressBar as Bar
from lightning.pytorch.cli import LightningCLI

from depthkit.train.callbacks import ProgressBar
from depthkit.train.data import DepthDataModule
from depthkit.train.module import DepthModule


class _DropAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def quiet_lightning() -> None:
    """Silence Lightning's notices that are no concern of a depthkit user, printed on every run.

    Its advert for a hosted logger; the note that its default logger is CSV without tensorboard (depthkit's
    trainer fragments rely on that default: CSV under `default_root_dir`); and a deprecation inside its own code.
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropAdvert())
    warnings.filterwarnings("ignore", message="Starting from v1.9.0, `tensorboardX` has been removed")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class DepthCLI(LightningCLI):
    """LightningCLI with depthkit's progress bar, unless the config names a bar or turns the bar off."""

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        callbacks = list(kwargs.get("callbacks", config.get("callbacks")) or [])
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, Bar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, ProgressBar()]
        return super().instantiate_trainer(**kwargs)


def build_cli(argv: list[str], *, run: bool = True) -> LightningCLI:
    return DepthCLI(
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
    quiet_lightning()
    try:
        build_cli(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"depthkit {argv[0] if argv else ''}: error: {err}", file=sys.stderr)
        return 1
    return 0
