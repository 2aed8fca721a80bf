"""`depthkit fit | validate | test`: LightningCLI over `DepthModule` subclasses and `DepthDataModule`.

Configs compose with repeated `--config` (later files override earlier ones) and dotted overrides
(`--trainer.max_steps 100`). A recipe may name fragment files for whole sections (`model: ../configs/...yaml`).
Errors in the configuration (unknown model, missing shards, bad ratio, a checkpoint of another architecture)
are printed as one clear message before any training starts.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple

from jsonargparse import Namespace
from jsonargparse.typing import import_object
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.callbacks.progress import ProgressBar as Bar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from depthkit.models.checkpoint import (
    check_training_config,
    found_config_diffs,
    is_sharded_checkpoint,
    load_torch_file,
    locate_weights,
    read_checkpoint_config,
    training_config,
)
from depthkit.models.registry import model_config
from depthkit.train.callbacks import ProgressBar
from depthkit.train.config import RunRecord
from depthkit.train.data import STAGE_DATA, DepthDataModule, check_stage_data
from depthkit.train.loggers import CSVLogger
from depthkit.train.module import DepthModule, check_module_data


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
    """LightningCLI with depthkit's progress bar (unless the config names a bar or turns the bar off), and a check
    that `--ckpt_path` resumes a run of this very module and model before any work starts."""

    def _parse_ckpt_path(self) -> None:
        # Lightning reads `--ckpt_path` here and replaces the configured module's arguments with the checkpoint's:
        # the check must come first, against the configuration as given.
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return super()._parse_ckpt_path()
        section = self.config[subcommand]
        if section.get("ckpt_path") == "last":  # Lightning looks in this run's new log folder only: never there
            root = Path((section.get("trainer") or {}).get("default_root_dir") or os.getcwd())
            section.ckpt_path = str(latest_checkpoint(root))
            rank_zero_info(f"--ckpt_path last: {section.ckpt_path}")
        elif section.get("ckpt_path") and str(section.ckpt_path).startswith("~"):  # one path for every reader
            section.ckpt_path = str(Path(section.ckpt_path).expanduser())  # (a `~` the shell did not expand)
        max_steps = (section.get("trainer") or {}).get("max_steps") if subcommand == "fit" else None
        resumed_run = check_resume(section.get("ckpt_path"), section.get("model"), max_steps)
        if subcommand == "fit" and resumed_run.record.wandb_run_id:
            _continue_wandb_run(section.get("trainer") or {}, resumed_run.record.wandb_run_id)
        self._resumed_run = resumed_run if subcommand == "fit" else None
        given = section.get("model").clone() if section.get("model") is not None else None
        self._apply_run_arguments(subcommand, resumed_run.hyper_parameters)
        resumed = self.config[subcommand].get("model")
        # validate / test score the run as it was trained: the checkpoint's arguments are the point, not a change.
        if subcommand == "fit" and given is not None and resumed is not None:
            changed = _changed_arguments(given, resumed)
            if changed:
                raise ValueError(
                    f"--ckpt_path {section.ckpt_path} resumes with the run's own module arguments, but the "
                    f"configuration changes {'; '.join(changed)}: drop the change, or start a new run from its "
                    "weights (model.checkpoint_path)"
                )

    def _apply_run_arguments(self, subcommand: str, hyper_parameters: dict) -> None:
        """What Lightning's `_parse_ckpt_path` does, from the hyperparameters `check_resume` already read: the
        module is built with the run's own arguments. Lightning's own reads the whole file a second time (without
        mmap: every tensor, optimizer state included) and only files: a sharded checkpoint (a folder, its
        hyperparameters in `meta.pt`) and a `~` path the shell did not expand were built from the new configuration
        while the optimizer kept the old learning rates."""
        hparams = dict(hyper_parameters)
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        # The stage's data first: a typo in a shard path is named before the model, the trainer or a log folder.
        subcommand = self.config.get("subcommand")
        if subcommand in STAGE_DATA:
            check_stage_data(subcommand, self.config[subcommand].get("data") or {})
        if subcommand == "fit":
            if (self.config.fit.get("trainer") or {}).get("max_steps") == 0:
                raise ValueError("trainer.max_steps 0 trains nothing: give the run's length (-1 with max_epochs)")
            module, data = self.config.fit.get("model"), self.config.fit.get("data") or {}
            if module is not None:
                module_class = import_object(str(module.class_path))  # parsed: it resolves
                teacher = module.init_args.get("teacher") is not None
                check_module_data(
                    module_class, data.get("labeled"), data.get("unlabeled"), data.get("pseudo_labels"), teacher=teacher
                )
        if subcommand in ("validate", "test") and self.config[subcommand].get("ckpt_path") is None:
            weights = self.config[subcommand].get("model") and self.config[subcommand].model.get("init_args")
            if weights is not None:
                check_scored_weights(subcommand, weights)
        if subcommand:
            _wandb_defaults(self.config[subcommand].get("trainer") or {})

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        callbacks = list(kwargs.get("callbacks", config.get("callbacks")) or [])
        if config.get("logger") is False:  # `--trainer.logger false`: nothing to log learning rates to
            kwargs["callbacks"] = callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, Bar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, ProgressBar()]
        if config.get("logger") in (None, True):  # Lightning's default (TensorBoard where installed), continued
            kwargs["logger"] = CSVLogger(save_dir=config.get("default_root_dir") or os.getcwd())
        resumed = getattr(self, "_resumed_run", None)
        if resumed is not None and resumed.record.log_dir:
            _continue_run_folder(kwargs.get("logger", config.get("logger")), resumed)
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as err:
            # Lightning's message may not name the option ("No supported gpu backend found!"): say what was asked.
            raise MisconfigurationException(f"trainer ({_hardware_options(config)}): {err}") from None


def _wandb_logger_args(trainer_config) -> list[Namespace]:
    """The `init_args` of the configured W&B loggers (`trainer.logger`, one or a list), to edit in place."""
    loggers = trainer_config.get("logger")
    return [
        logger.init_args
        for logger in (loggers if isinstance(loggers, list) else [loggers])
        if isinstance(logger, Namespace)
        and str(logger.get("class_path", "")).endswith("WandbLogger")
        and logger.get("init_args") is not None
    ]


def _continue_wandb_run(trainer_config, run_id: str) -> None:
    """A resumed fit logs to the W&B run of its checkpoint (Lightning's WandbLogger resumes a run by its id), not to a
    new, unlinked one, unless the configuration names a run."""
    for args in _wandb_logger_args(trainer_config):
        if args.get("id") is None and args.get("version") is None:
            args.id = run_id
            rank_zero_info(f"--ckpt_path: continuing W&B run {run_id}")


def _continue_run_folder(loggers, resumed: ResumedRun) -> None:
    """A resumed fit logs into the folder of its checkpoint's run (metrics.csv continued, checkpoints beside the
    earlier ones), not into a new `version_N`, when a depthkit CSV logger of the configuration holds that folder and
    the folder holds no newer checkpoint of the run (`CSVLogger.continue_run`)."""
    log_dir = resumed.record.log_dir
    for logger in loggers if isinstance(loggers, list | tuple) else [loggers]:
        if isinstance(logger, CSVLogger):
            why_not = logger.continue_run(log_dir, run_id=resumed.record.run_id, step=resumed.step or 0)
            rank_zero_info(f"--ckpt_path: {f'a new run folder: {why_not}' if why_not else f'continuing {log_dir}'}")
            if not why_not:  # its checkpoints/ holds the run's earlier ones, by design (only that folder's notice)
                folder = re.escape(str(Path(log_dir) / "checkpoints"))
                warnings.filterwarnings("ignore", message=rf"Checkpoint directory {folder} exists and is not empty")
            return


def _wandb_defaults(trainer_config) -> None:
    """Settle what the W&B overlay leaves open. A W&B logger given no `save_dir` (or its default, ".") writes under
    `trainer.default_root_dir`, as the CSV logger does, instead of wherever the command runs: one run's files (W&B's,
    the checkpoints, config.yaml, preempted.ckpt) in one tree. `WANDB_MODE`, when set (online, offline, disabled),
    decides over the configured `offline`: the overlay's `offline: true` is depthkit's default, and W&B users switch
    modes with that variable."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    for args in _wandb_logger_args(trainer_config):
        if str(args.get("save_dir") or ".") == ".":
            args.save_dir = trainer_config.get("default_root_dir") or os.getcwd()
        if mode:
            args.offline = mode in ("offline", "dryrun")  # otherwise W&B reads the variable itself


class RunConfig(SaveConfigCallback):
    """Save the run's configuration as `config.yaml` in the run's own folder (`run_dir`), never in a folder that
    runs share: Lightning's callback writes to `trainer.log_dir`, which for W&B is the logger's `save_dir`, so each
    W&B run overwrote the last one's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer, pl_module, stage) -> None:  # called on global rank 0 only
        path = run_dir(trainer) / self.config_filename
        path.parent.mkdir(parents=True, exist_ok=True)
        resume = 0
        while path.exists():  # a resumed run's folder: its first configuration stays, the resumes beside it
            resume += 1
            path = path.with_name(f"{Path(self.config_filename).stem}.resume_{resume}.yaml")
        self.parser.save(self.config, str(path), skip_unset=False, overwrite=self.overwrite, multifile=self.multifile)
        # Lightning gives a logger the module's and the data's arguments; the rest of the run's configuration (steps,
        # precision, devices, accumulation, seed) goes to the loggers without a config.yaml beside them (W&B's run
        # config), so runs compare on it there.
        run = {k: v for k, v in self.config.as_dict().items() if k not in ("model", "data")}
        for logger in trainer.loggers:
            if not isinstance(logger, LightningCSVLogger | TensorBoardLogger):
                try:  # rank 0 only: an error here would leave the other ranks waiting for it
                    logger.log_hyperparams(run)
                except Exception as err:  # noqa: BLE001 - e.g. a logger that refuses changed values on resume
                    rank_zero_warn(f"{type(logger).__name__} did not take the run configuration: {err}")


def run_dir(trainer: Trainer) -> Path:
    """The folder of this run: the CSV / TensorBoard logger's version folder; for another logger (W&B), the folder
    Lightning's `ModelCheckpoint` puts the run's `checkpoints/` in (`<save_dir>/<name>/<version>`); without a
    logger, `default_root_dir`."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    if isinstance(logger, LightningCSVLogger | TensorBoardLogger):
        return Path(logger.log_dir)
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version


def _hardware_options(trainer_config) -> str:
    """`accelerator=gpu, devices=0, ...`: the trainer options that pick the hardware, as given."""
    given = []
    for key in ("accelerator", "devices", "num_nodes", "strategy", "precision"):
        value = trainer_config.get(key)
        if value is not None:
            shown = value if isinstance(value, str | int | float | list) else type(value).__name__
            given.append(f"{key}={shown}")
    return ", ".join(given)


OPTIMIZER_OPTIONS = ("--optimizer", "--lr_scheduler")


def build_cli(argv: list[str], *, run: bool = True) -> LightningCLI:
    # LightningCLI's --optimizer / --lr_scheduler would replace the module's own optimizer and schedule: the
    # encoder / decoder learning rates would silently become one. They are turned off, with a pointer.
    for arg in argv:
        option = arg.split("=", 1)[0].split(".", 1)[0]
        if option in OPTIMIZER_OPTIONS:
            raise ValueError(
                f"{option}: depthkit modules build their optimizer (AdamW with encoder and decoder learning rates) "
                "and schedule from model.optim: set --model.optim.encoder_lr, --model.optim.decoder_lr, "
                "--model.optim.weight_decay, --model.optim.warmup_steps, --model.optim.schedule"
            )
    return DepthCLI(
        DepthModule,
        DepthDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        # From the command line, LightningCLI reads sys.argv itself (given both, it warns on every run).
        args=None if argv == sys.argv[1:] else argv,
        run=run,
        save_config_callback=RunConfig,
        save_config_kwargs={"overwrite": True},
        # A bad option raises (ArgumentError) rather than print the whole usage: `run_lightning_cli` says it in a line.
        parser_kwargs={"prog": "depthkit", "exit_on_error": False},
        auto_configure_optimizers=False,
    )


LIGHTNING_CKPT_NAMES = ("best", "hpc")  # `--ckpt_path` words Lightning resolves itself ("last": `latest_checkpoint`)
SHARDED_META = "meta.pt"  # where Lightning's sharded checkpoints keep the state that is not tensors


def latest_checkpoint(root: Path) -> Path:
    """What `--ckpt_path last` resumes: the newest `last*.ckpt` of any run under `root` (the trainer's
    `default_root_dir`), or the `preempted.ckpt` there if newer.

    Raises:
        FileNotFoundError: there is neither.
    """
    # The run folders Lightning makes: lightning_logs/version_N (CSV), <project>/<run id> (W&B); not a deep walk.
    found = [*root.glob("*/*/checkpoints/last*.ckpt"), *root.glob("preempted.ckpt")]
    if not found:
        raise FileNotFoundError(
            f"--ckpt_path last: no checkpoints/last.ckpt of a run under {root} (trainer.default_root_dir), nor a "
            "preempted.ckpt there; pass the checkpoint's path"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


class ResumedRun(NamedTuple):
    """What `check_resume` read of a checkpoint: depthkit's record (`DepthModule.on_save_checkpoint`) and the
    module's hyperparameters (empty when there is no checkpoint to read)."""

    record: RunRecord
    hyper_parameters: dict
    step: int | None = None


class RunComplete(Exception):
    """`--ckpt_path` names a checkpoint at the run's last step: nothing is left to train (not an error: a requeued
    job of a run that finished resumes its `last.ckpt`)."""


def check_resume(ckpt_path: str | None, module_config, max_steps: int | None = None) -> ResumedRun:
    """Refuse a `--ckpt_path` that is no `depthkit fit` checkpoint, or one of another module or model, or one that
    `max_steps` (given when fitting) leaves nothing to train; warn when `max_steps` changes the run's schedule.

    `module_config` is the configured `model` section (`class_path`, `init_args`). Lightning would take a
    teacher's run for a student's, or turn a relative teacher's configuration into the metric one of the
    checkpoint, without a word; a weights file fails deep inside it. Read with `mmap`: the tensors stay on disk.

    Returns:
        The checkpoint's depthkit record and hyperparameters (`ResumedRun`; empty when there is none to read).
    """
    if ckpt_path is None or ckpt_path in LIGHTNING_CKPT_NAMES or str(ckpt_path).startswith("registry"):
        return ResumedRun(RunRecord(), {})
    path = Path(ckpt_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--ckpt_path {path}: no such file")
    state = path
    if path.is_dir():  # a sharded checkpoint: torch.distributed.checkpoint's shards, and the rest in meta.pt
        state = path / SHARDED_META
        if not is_sharded_checkpoint(path) or not state.is_file():
            raise ValueError(
                f"--ckpt_path {path} is a folder, not a checkpoint (nor a sharded one: no .metadata and {SHARDED_META})"
            )
    if not zipfile.is_zipfile(state):  # torch.save has written zip files since torch 1.6
        raise ValueError(f"--ckpt_path {state} is not a checkpoint (not a torch zip file)")
    obj = load_torch_file(state, mmap=True)
    if not isinstance(obj, dict) or "pytorch-lightning_version" not in obj:
        raise ValueError(
            f"--ckpt_path {path} is not a `depthkit fit` checkpoint (no training state); to start a run from its "
            "weights, set model.checkpoint_path instead"
        )
    step, record = obj.get("global_step"), RunRecord.of(obj)
    bounded = max_steps is not None and max_steps > 0 and step is not None  # a fit with a length, from a step
    if bounded and max_steps < step:
        raise ValueError(f"--ckpt_path {path} is at step {step}: trainer.max_steps {max_steps} leaves nothing to train")
    if module_config is not None:
        _check_run_of(path, obj, record, module_config)
    if bounded:  # after the refusals: a run of another model
        if step == max_steps:
            raise RunComplete(f"--ckpt_path {path} is at step {step} = trainer.max_steps: the run is complete")
        if record.schedule_steps and record.schedule_steps != max_steps:
            rank_zero_warn(
                f"--ckpt_path {path}: its learning-rate schedule spans {record.schedule_steps} steps, "
                f"trainer.max_steps {max_steps} makes it span {max_steps}: from step {step} on the learning rate "
                "follows the new length (a resumed run equals the uninterrupted one only with the same max_steps)"
            )
    return ResumedRun(record, dict(obj.get("hyper_parameters") or {}), step)


def _check_run_of(path: Path, obj: dict, record: RunRecord, module_config) -> None:
    """Refuse a checkpoint of another module class, or of another model config than the configured one."""
    kind, configured = record.module, str(module_config.class_path).rsplit(".", 1)[-1]
    if kind is not None and kind != configured:
        raise ValueError(f"--ckpt_path {path} is a {kind} run; this config trains a {configured}")
    found, args = training_config(obj), module_config.init_args
    if found is not None:
        built = model_config(args.model, **dict(args.get("model_overrides") or {}))
        diffs = [f"{field}: {a!r} there, {b!r} here" for field, a, b in found_config_diffs(found, built)]
        if diffs:
            raise ValueError(
                f"--ckpt_path {path} is a run of {found['model']} ({'; '.join(diffs)}); to start a run from its "
                "weights, set model.checkpoint_path instead"
            )


def check_scored_weights(subcommand: str, module_args) -> None:
    """validate / test without `--ckpt_path` score the weights the module arguments name: refuse none at all (an
    untrained model), and a `model.checkpoint_path` that names another model than the configured one (fit may start
    from such weights: a relative teacher's for a metric fine-tuning; a score of them would be wrong)."""
    if module_args.get("checkpoint_path") is None:
        if not module_args.get("pretrained"):
            raise ValueError(
                f"depthkit {subcommand} would score an untrained model: pass --ckpt_path RUN.ckpt (a depthkit fit "
                "checkpoint), or weights as model.checkpoint_path or model.pretrained"
            )
        return
    path = locate_weights(module_args.checkpoint_path, "model.checkpoint_path")
    found = read_checkpoint_config(path)
    if found is not None and "model_overrides" in found:
        built = model_config(module_args.model, **dict(module_args.get("model_overrides") or {}))
        hint = f"depthkit {subcommand} scores the model configured: give the config of the model it names"
        check_training_config(found, built, f"model.checkpoint_path {path}", hint)


def _changed_arguments(given, resumed) -> list[str]:
    """`model.<key>: given -> checkpoint's` for each module argument the checkpoint's hyperparameters replaced."""
    a, b = dict(given.items()), dict(resumed.items())  # flattened dotted keys
    return [
        f"model.{k}: {a.get(k)!r} here, {b.get(k)!r} in the run"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def _one_line(err: BaseException) -> str:
    """The message of `err`; for an error re-raised from a DataLoader worker, the worker's own last line; for a
    module that refused its arguments (jsonargparse wraps the error in its union message), the module's own."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    if _PARSE_NOISE[0] in text:
        return condense_parse_error(text)
    return text


_PARSE_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value",
    "Problem with given class_path",
    "Expected a <class 'NoneType'>",
)


def condense_parse_error(message: str) -> str:
    """jsonargparse's message for a bad option, in one line: the dotted option and the innermost reason.

    A module argument fails inside a union (`model` is a class path or None), so the message nests the real key
    and reason under lines about subtypes; e.g. `model.optim.schedule: Expected a typing.Literal['poly', ...].
    Got value: foo` instead of ten lines after the whole usage.
    """
    keys, reason = [], None
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        match = re.match(r'Parser key "([^"]+)":?\s*(.*)$', line)
        if match:
            if not keys or keys[-1] != match.group(1):  # `--trainer FILE` nests "trainer" in "trainer"
                keys.append(match.group(1))
            reason = match.group(2) or reason
        elif line and reason is None and not line.startswith(_PARSE_NOISE):
            reason = line
    reason = reason or message.strip().splitlines()[0]
    if keys and reason.startswith("unrecognized arguments: --"):  # named relative to the section: name it whole
        reason = re.sub(r"--(?=\S)", f"--{'.'.join(keys)}.", reason)
        keys = []
    if re.search(r"\b(optimizer|lr_scheduler)\b", reason):  # e.g. an `optimizer:` section in a YAML config
        reason += "; depthkit modules take their optimizer and schedule from model.optim"
    if re.search(r"arguments are required: \w+\.model\b", reason):  # no model, so most likely no config at all
        reason += " (give a recipe: --config recipes/NAME.yaml, and a --trainer configs/trainer/*.yaml)"
    return f"{'.'.join(keys)}: {reason}" if keys else reason


def _broken_yaml(argv: list[str]) -> str | None:
    """The first config file in `argv` that is not valid YAML, with the parser's reason and position (jsonargparse
    reports the first line of the reason only, and no file)."""
    import yaml

    for arg in argv:
        path = Path(arg.split("=", 1)[-1])
        if path.suffix in (".yaml", ".yml") and path.is_file():
            try:
                yaml.safe_load(path.read_text())
            except yaml.MarkedYAMLError as err:
                if err.problem_mark is None:
                    return f"{path} is not valid YAML: {' '.join(str(err).split())}"
                mark, context = err.problem_mark, ""
                if err.context and err.context_mark is not None:
                    context = f" ({err.context} from line {err.context_mark.line + 1})"
                where = f"line {mark.line + 1}, column {mark.column + 1}"
                return f"{path} is not valid YAML: {where}: {err.problem}{context}"
            except yaml.YAMLError as err:
                return f"{path} is not valid YAML: {' '.join(str(err).split())}"
    return None


def _kill_workers() -> None:
    """Kill this process's children: DataLoader workers ignore SIGTERM (see `ignore_preemption_signals`), so the
    interpreter's exit, which terminates and joins them, would wait forever after a failed run."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=10)


def run_lightning_cli(argv: list[str]) -> int:
    quiet_lightning()
    try:
        build_cli(argv)
    except argparse.ArgumentError as err:
        _kill_workers()
        command = argv[0] if argv else ""
        message = _broken_yaml(argv) if "Problems parsing config" in str(err) else None
        print(f"depthkit {command}: error: {message or condense_parse_error(str(err))} (see depthkit {command} --help)",
              file=sys.stderr)  # fmt: skip
        return 2
    except RunComplete as done:  # a finished run's requeued job: nothing to do, not a failure
        print(f"depthkit {argv[0]}: {done}; nothing to do", file=sys.stderr)
        return 0
    except (ValueError, OSError, MisconfigurationException) as err:
        _kill_workers()
        print(f"depthkit {argv[0] if argv else ''}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:
        _kill_workers()
        if not type(err).__module__.startswith("wandb"):
            raise
        # e.g. online mode without an API key: the logger's own message, not wandb's traceback
        print(f"depthkit {argv[0] if argv else ''}: error: wandb: {_one_line(err)}", file=sys.stderr)
        return 1
    except BaseException:
        _kill_workers()
        raise
    return 0
