"""Training: every YAML parses, every recipe type takes a CPU step, learning, resume, DDP, W&B, bad configs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import wandb as wandb_module
import yaml
from lightning.pytorch.cli import LightningCLI

from depthkit.cli import main
from depthkit.losses import preset
from depthkit.train import DepthDataModule, DepthModule, OptimConfig
from depthkit.train.cli import build_cli

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
FRAGMENTS = {kind: sorted((REPO / "configs" / kind).glob("*.yaml")) for kind in ("model", "data", "trainer")}


class ParseOnlyCLI(LightningCLI):
    """Parses and type-checks a configuration without building models (full sizes would not fit in a test)."""

    def instantiate_classes(self) -> None:
        pass


def parse(args: list[str]):
    return ParseOnlyCLI(DepthModule, DepthDataModule, subclass_mode_model=True, run=False, args=args).config


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_with_its_trainer(recipe):
    trainer = "cpu" if recipe.stem.startswith("tiny") else ("gpu_fsdp" if "vitg" in recipe.stem else "gpu_ddp")
    config = parse(["--trainer", str(REPO / "configs/trainer" / f"{trainer}.yaml"), "--config", str(recipe)])
    assert config.model.class_path.startswith("depthkit.train.")
    assert config.trainer.max_steps > 0


@pytest.mark.parametrize("fragment", FRAGMENTS["model"], ids=lambda p: p.stem)
def test_every_model_fragment_parses(fragment, tiny_data):
    config = parse(["--model", str(fragment), "--data.labeled", str(tiny_data / "labeled")])
    assert config.model.init_args.loss.objective in ("ssi", "silog")


@pytest.mark.parametrize("fragment", FRAGMENTS["data"] + FRAGMENTS["trainer"], ids=lambda p: p.stem)
def test_every_data_and_trainer_fragment_parses(fragment):
    section = fragment.parent.name
    args = ["--model", str(REPO / "configs/model/tiny_teacher.yaml"), f"--{section}", str(fragment)]
    if section == "trainer":
        args += ["--data.labeled", "unused"]
    parse(args)


def test_wandb_overlay_parses():
    config = parse(
        [
            "--config",
            str(REPO / "configs/overlay/wandb.yaml"),
            "--model",
            str(REPO / "configs/model/tiny_teacher.yaml"),
            "--data.labeled",
            "x",
        ]
    )
    assert config.trainer.logger.init_args.offline is True


@pytest.mark.parametrize("mode, offline", [(None, True), ("online", False), ("offline", True), ("disabled", False)])
def test_wandb_mode_decides_over_the_overlays_offline(mode, offline, monkeypatch):
    from depthkit.train.cli import _wandb_defaults

    if mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", mode)
    overlay, model = REPO / "configs/overlay/wandb.yaml", REPO / "configs/model/tiny_teacher.yaml"
    config = parse(["--config", str(overlay), "--model", str(model), "--data.labeled", "x"])
    config.trainer.default_root_dir = "/runs"
    _wandb_defaults(config.trainer)
    assert config.trainer.logger.init_args.offline is offline  # `disabled`: W&B reads the variable itself
    assert config.trainer.logger.init_args.save_dir == "/runs"


def _fit(tmp_path, data_root, recipe: str, *extra: str, steps: int = 1) -> Path:
    """Run `depthkit fit` in-process on the tiny data; returns the run folder."""
    data = {
        "tiny_teacher": [],
        "tiny_metric": [],
        "tiny_student": [
            "--data.unlabeled",
            str(data_root / "unlabeled"),
            "--data.pseudo_labels",
            str(data_root / "pseudo"),
        ],
    }[recipe]
    args = [
        "fit",
        "--trainer",
        str(REPO / "configs/trainer/cpu.yaml"),
        "--config",
        str(REPO / f"recipes/{recipe}.yaml"),
        "--data.labeled",
        str(data_root / "labeled"),
        "--data.val",
        str(data_root / "val"),
        "--data.num_workers",
        "0",
        *data,
        "--trainer.max_steps",
        str(steps),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        *extra,
    ]
    build_cli(args)
    return tmp_path


def _bare_trainer(tmp_path, **options) -> L.Trainer:
    """A trainer for tests that call `fit` themselves: one step, no logger, checkpoints, bar or summary."""
    bare = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    return L.Trainer(**{"max_steps": 1, "default_root_dir": tmp_path, **bare, **options})


def _metrics(run: Path) -> list[dict]:
    (path,) = run.glob("lightning_logs/version_*/metrics.csv")
    return list(csv.DictReader(open(path)))


def test_fit_shows_its_own_progress_bar_unless_told_otherwise(tiny_data):
    from lightning.pytorch.callbacks import RichProgressBar

    from depthkit.train import ProgressBar

    base = [
        "--trainer",
        str(REPO / "configs/trainer/cpu.yaml"),
        "--config",
        str(REPO / "recipes/tiny_teacher.yaml"),
    ]
    base += ["--data.labeled", str(tiny_data / "labeled"), "--data.val", str(tiny_data / "val")]
    assert type(build_cli(base, run=False).trainer.progress_bar_callback) is ProgressBar  # not "Epoch 0/-2"
    assert build_cli([*base, "--trainer.enable_progress_bar", "false"], run=False).trainer.progress_bar_callback is None
    rich = [*base, "--trainer.callbacks+=lightning.pytorch.callbacks.RichProgressBar"]
    assert type(build_cli(rich, run=False).trainer.progress_bar_callback) is RichProgressBar


@pytest.mark.parametrize("recipe", ["tiny_teacher", "tiny_metric", "tiny_student"])
def test_one_step_of_every_recipe_type(recipe, tiny_data, tmp_path):
    run = _fit(tmp_path, tiny_data, recipe, "--model.panel_every_n_steps", "1", steps=2)
    rows = _metrics(run)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    (log_dir,) = run.glob("lightning_logs/version_*")
    panels = {p.parent.name for p in log_dir.glob("panels/*/step_*.png")}
    if recipe == "tiny_student":
        keys = rows[0].keys()
        assert {"train/term/labeled", "train/term/unlabeled", "train/term/feature"} <= set(keys)
        assert panels == {"train", "train_unlabeled"}  # the pseudo-labeled images too, not the labeled ones alone
    else:
        assert panels == {"train"}
    assert any(r.get("perf/images_per_s") for r in rows) and any(r.get("lr-AdamW/encoder") for r in rows)


def test_metric_training_ignores_depths_the_head_cannot_output():
    """As the official metric fine-tuning: targets beyond max_depth (or below 1 mm) are not trained on; a 20 m head
    would otherwise be pulled towards 500 m forever."""
    module = DepthModule("test_dav2_metric", loss="metric_silog").eval()
    g = torch.Generator().manual_seed(0)
    target_BHW = torch.rand((2, 28, 28), generator=g) * 10 + 1
    far_BHW = torch.rand((2, 28, 28), generator=g) > 0.7
    batch = {
        "image": torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8, generator=g),
        "target": torch.where(far_BHW, 500.0, target_BHW),
        "valid": torch.ones((2, 28, 28), dtype=torch.bool),
        "meta": [{"output_space": "metric_depth"}] * 2,
    }
    with torch.no_grad():
        out, _ = module.labeled_loss(batch)
        expected, _ = module.labeled_loss({**batch, "valid": ~far_BHW})
    torch.testing.assert_close(out["loss"], expected["loss"])


def test_a_student_on_pseudo_labels_alone_takes_a_step(tiny_data, tmp_path):
    """Depth Anything V2's students see no labeled image: the batch is all pseudo-labeled, its loss the mean of the
    unlabeled and feature terms. A supervised module still needs labeled data."""
    run = _fit(tmp_path, tiny_data, "tiny_student", "--data.labeled", "null", steps=3)  # the monitors from step 2
    state = _last_checkpoint(run)
    assert state["global_step"] == 3 and state["DepthDataModule"]["labeled"]["consumed"] == {}
    batch_size = state["datamodule_hyper_parameters"]["batch_size"]
    assert state["DepthDataModule"]["unlabeled"]["consumed"] == {"0": 3 * batch_size}  # the whole batch: no ratio
    rows = _metrics(run)
    assert float(next(r for r in rows if r.get("perf/images_per_s"))["perf/images_per_s"]) > 0
    row = next(r for r in rows if r.get("train/loss"))
    assert not any(k.startswith("train/labeled/") and row[k] for k in row)
    terms = (float(row["train/term/unlabeled"]), float(row["train/term/feature"]))
    assert float(row["train/loss"]) == pytest.approx(sum(terms) / 2, rel=1e-6)
    with pytest.raises(ValueError, match=r"depthkit fit needs data.labeled \(labeled shards\)"):
        _fit(tmp_path / "teacher", tiny_data, "tiny_teacher", "--data.labeled", "null")


def test_student_with_online_teacher_takes_a_step(tiny_data, tmp_path):
    from depthkit.models import create_model, save_checkpoint

    teacher = tmp_path / "teacher.pth"
    save_checkpoint(create_model("test_dav2"), teacher, layout="depthkit")
    run = _fit(
        tmp_path,
        tiny_data,
        "tiny_student",
        "--data.pseudo_labels",
        "null",
        "--model.teacher",
        "test_dav2",
        "--model.teacher_checkpoint",
        str(teacher),
        steps=1,
    )
    assert any(r.get("train/term/unlabeled") for r in _metrics(run))


def test_modules_built_in_python_check_their_arguments_and_data(tiny_data, tmp_path):
    """What `depthkit fit` checks in the configuration, a Python user gets too: config arguments as dicts or a
    preset name, a uint8 batch, data that suit the module (checked in `setup`, before any step)."""
    from depthkit.train import StudentModule

    module = DepthModule("test_dav2", loss="dav2", optim={"encoder_lr": 1e-4, "decoder_lr": 1e-3})
    assert module.loss_config == preset("dav2") and module.optim_config.encoder_lr == 1e-4
    with pytest.raises(ValueError, match="optim: expected a OptimConfig .or a dict of its fields., got int"):
        DepthModule("test_dav2", optim=3)
    with pytest.raises(ValueError, match="expected a uint8 image batch .0-255., as the data module makes"):
        module(torch.rand(1, 3, 28, 28))  # a float [0, 1] batch would be divided by 255 again
    labeled = str(tiny_data / "labeled")
    with pytest.raises(ValueError, match="the student .StudentModule. trains on unlabeled images too"):
        _bare_trainer(tmp_path).fit(StudentModule("test_dav2"), DepthDataModule(labeled, batch_size=2, num_workers=0))
    data = DepthDataModule(labeled, unlabeled=str(tiny_data / "unlabeled"), batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match="DepthModule trains on labeled images only, but data.unlabeled is set"):
        _bare_trainer(tmp_path).fit(module, data)
    from depthkit.train.module import check_module_data

    my_student = type("MyStudent", (StudentModule,), {})  # a subclass is a student too
    check_module_data(my_student, None, "unlabeled", "pseudo", teacher=False)
    with pytest.raises(ValueError, match=r"the student \(MyStudent\) trains on unlabeled images too"):
        check_module_data(my_student, "labeled", None, None, teacher=False)


@pytest.mark.parametrize("stray_eval", [False, True], ids=["frozen_only", "stray_module"])
def test_only_the_frozen_networks_in_eval_mode_go_unwarned(stray_eval, tiny_data, tmp_path):
    """Lightning warns about modules in eval mode at the start of training. The student's frozen DINOv2 and
    teacher are so by design and do not warn; any other module left in eval mode still does."""
    import warnings

    from depthkit.train import StudentModule

    module = StudentModule("test_dav2", teacher="test_dav2", panel_every_n_steps=0)
    if stray_eval:
        module.model.head.eval()
    data = DepthDataModule(
        str(tiny_data / "labeled"), unlabeled=str(tiny_data / "unlabeled"), batch_size=2, crop_size=56, num_workers=0
    )
    trainer = _bare_trainer(tmp_path, accelerator="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, data)
    eval_mode = [str(w.message) for w in caught if "in eval mode" in str(w.message)]
    assert len(eval_mode) == stray_eval, eval_mode


def test_teacher_learns_depth_on_held_out_scenes(tiny_data):
    """A few hundred steps beat the untrained start on held-out scenes, by the evaluation metric (not the loss)."""
    from depthkit.data.stream import ShardStream
    from depthkit.data.transforms import SampleTransform, TransformConfig
    from depthkit.train.config import OptimConfig
    from depthkit.train.module import aligned_metrics

    torch.manual_seed(0)
    module = DepthModule("test_dav2", optim=OptimConfig(encoder_lr=3e-4, decoder_lr=3e-3, schedule="constant"))
    val = list(
        ShardStream(
            tiny_data / "val",
            batch_size=16,
            drop_last=False,
            transform=SampleTransform(TransformConfig(crop_size=56, random_crop=False, hflip=False)),
        )
    )

    def abs_rel() -> float:
        module.eval()
        with torch.no_grad():
            return sum(aligned_metrics(module(b["image"]), b, module.model.meta)["abs_rel"] for b in val) / len(val)

    before = abs_rel()
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-3)
    train = ShardStream(
        tiny_data / "labeled",
        batch_size=8,
        resampled=True,
        shuffle_buffer=32,
        transform=SampleTransform(TransformConfig(crop_size=56)),
    )
    module.train()
    for _, batch in zip(range(250), train, strict=False):
        out, _ = module.labeled_loss(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    after = abs_rel()
    assert after < 0.75 * before, f"AbsRel {before:.3f} -> {after:.3f}"


def test_resume_gives_the_same_losses(tiny_data, tmp_path):
    ckpt = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath",
        str(tmp_path / "ckpts"),
        "--trainer.callbacks.every_n_train_steps",
        "3",
        "--trainer.callbacks.save_top_k",
        "-1",
        "--trainer.val_check_interval",
        "1000",
        "--trainer.limit_val_batches",
        "0",
    ]
    full = _fit(tmp_path / "full", tiny_data, "tiny_teacher", *ckpt, steps=6)
    (mid,) = (tmp_path / "ckpts").glob("*step=3.ckpt")
    resumed = _fit(tmp_path / "resumed", tiny_data, "tiny_teacher", *ckpt, "--ckpt_path", str(mid), steps=6)
    loss = lambda run: {r["step"]: float(r["train/loss"]) for r in _metrics(run) if r.get("train/loss")}  # noqa: E731
    a, b = loss(full), loss(resumed)
    assert sorted(b) == ["3", "4", "5"]
    for step in b:
        assert a[step] == pytest.approx(b[step], rel=1e-5), (step, a[step], b[step])


def _last_checkpoint(run: Path) -> dict:
    (path,) = run.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("recipe", ["tiny_teacher", "tiny_student"])
def test_bf16_mixed_precision_runs_in_autocast_with_fp32_weights(recipe, tiny_data, tmp_path, monkeypatch):
    """`--trainer.precision bf16-mixed` on CPU: the model runs under bf16 autocast, its prediction comes out fp32 (the
    head's last conv), the losses are finite, the weights and AdamW moments stay fp32."""
    seen = set()
    predict = DepthModule.predict_uint8

    def spy(self, image_B3HW, **kwargs):
        out = predict(self, image_B3HW, **kwargs)
        seen.add((torch.is_autocast_enabled("cpu"), (out[0] if isinstance(out, tuple) else out).dtype))
        return out

    monkeypatch.setattr(DepthModule, "predict_uint8", spy)
    run = _fit(tmp_path, tiny_data, recipe, "--trainer.precision", "bf16-mixed", steps=2)
    assert seen == {(True, torch.float32)}
    losses = torch.tensor([float(r["train/loss"]) for r in _metrics(run) if r.get("train/loss")])
    assert len(losses) == 2 and torch.isfinite(losses).all()
    state = _last_checkpoint(run)
    assert {v.dtype for v in state["state_dict"].values() if v.is_floating_point()} == {torch.float32}
    moments = [v for s in state["optimizer_states"][0]["state"].values() for k, v in s.items() if k != "step"]
    assert moments and {v.dtype for v in moments} == {torch.float32}


def test_gradient_accumulation_counts_optimizer_steps(tiny_data, tmp_path):
    """`accumulate_grad_batches=2`: two batches per optimizer step; `max_steps`, `global_step`, AdamW and the LR
    schedule (warmup included) count optimizer steps, as `OptimConfig` says."""
    from depthkit.train.config import OptimConfig

    steps = 3
    run = _fit(tmp_path, tiny_data, "tiny_teacher", "--trainer.accumulate_grad_batches", "2", steps=steps)
    state = _last_checkpoint(run)
    batch_size = state["datamodule_hyper_parameters"]["batch_size"]
    assert state["DepthDataModule"]["labeled"]["consumed"] == {"0": 2 * steps * batch_size}
    assert state["global_step"] == steps and state["lr_schedulers"][0]["last_epoch"] == steps
    assert {int(s["step"]) for s in state["optimizer_states"][0]["state"].values()} == {steps}
    optim = OptimConfig(**state["hyper_parameters"]["optim"])
    lrs = {int(r["step"]): float(r["lr-AdamW/encoder"]) for r in _metrics(run) if r.get("lr-AdamW/encoder")}
    assert lrs == pytest.approx({k: optim.encoder_lr * optim.lr_factor(k, steps) for k in range(steps)})


def _fit_with_a_signal(monkeypatch, tmp_path, tiny_data, hook: str, when, signum, *extra: str, steps: int):
    """`depthkit fit` of the tiny teacher in-process, whose `hook` step sends `signum` to this process where
    `when(module, batch_idx)`; returns the exit status and the `preempted.ckpt` it saved."""
    step = getattr(DepthModule, hook)

    def signalled(self, batch, batch_idx):
        if when(self, batch_idx):
            os.kill(os.getpid(), signum)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(DepthModule, hook, signalled)
    previous = signal.signal(signum, lambda *_: None)  # never the default action (exit) in the test process
    try:
        with pytest.raises(SystemExit) as stop:
            _fit(tmp_path, tiny_data, "tiny_teacher", *extra, steps=steps)
    finally:
        signal.signal(signum, previous)
    return stop.value.code, torch.load(tmp_path / "preempted.ckpt", map_location="cpu", weights_only=False)


def test_preemption_waits_for_the_end_of_a_gradient_accumulation(tiny_data, tmp_path, monkeypatch):
    """A signal at the first of two accumulated batches saves after the second, at the optimizer step: the gradients
    of a half-done accumulation would be in no checkpoint."""
    accumulate = ["--trainer.accumulate_grad_batches", "2"]
    code, state = _fit_with_a_signal(
        monkeypatch, tmp_path, tiny_data, "training_step", lambda _, i: i == 2, signal.SIGUSR1, *accumulate, steps=5
    )
    assert code == 128 + signal.SIGUSR1
    batch_size = state["datamodule_hyper_parameters"]["batch_size"]
    assert state["global_step"] == 2 and state["DepthDataModule"]["labeled"]["consumed"] == {"0": 4 * batch_size}


def test_a_signal_in_the_sanity_check_saves_after_the_first_step(tiny_data, tmp_path, monkeypatch):
    """Lightning's own handler would end the run there with status 0 and no checkpoint."""
    in_sanity_check = lambda module, _: module.trainer.sanity_checking  # noqa: E731
    code, state = _fit_with_a_signal(
        monkeypatch, tmp_path, tiny_data, "validation_step", in_sanity_check, signal.SIGTERM, steps=5
    )
    assert code == 128 + signal.SIGTERM and state["global_step"] == 1


def test_a_signal_during_the_last_step_lets_the_run_finish(tiny_data, tmp_path, monkeypatch):
    """Saved as preempted at max_steps, the run exited 138 without a last.ckpt, was requeued, and its requeued
    resume found nothing to train (exit 1): a finished run ended as two failed jobs."""
    step = DepthModule.training_step

    def signalled(self, batch, batch_idx):
        if batch_idx == 2:  # the last of 3 steps
            os.kill(os.getpid(), signal.SIGUSR1)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(DepthModule, "training_step", signalled)
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        run = _fit(tmp_path, tiny_data, "tiny_teacher", "--data.val", "null", steps=3)  # returns: no SystemExit
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert _last_checkpoint(run)["global_step"] == 3 and not (tmp_path / "preempted.ckpt").exists()


def test_a_sharded_checkpoint_replaces_the_last_one(tmp_path):
    """A sharded checkpoint is a folder: os.replace onto the last preemption's folder failed (Errno 39), the second
    preemption exited 1 and its checkpoint stayed in preempted.ckpt.partial."""
    from depthkit.train.callbacks import _replace

    def sharded(name, step):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "meta.pt").write_text(str(step))
        (folder / "__0_0.distcp").write_text("shard")
        return folder

    path = sharded("preempted.ckpt", 4)
    _replace(sharded("preempted.ckpt.partial", 8), path)
    assert (path / "meta.pt").read_text() == "8" and sorted(p.name for p in tmp_path.iterdir()) == ["preempted.ckpt"]
    path_file = tmp_path / "single.ckpt"
    path_file.write_text("4")
    _replace(sharded("single.ckpt.partial", 8), path_file)  # a file replaced by a folder, and back
    assert (path_file / "meta.pt").read_text() == "8"
    (tmp_path / "single.ckpt.partial").write_text("12")
    _replace(tmp_path / "single.ckpt.partial", path_file)
    assert path_file.read_text() == "12" and sorted(p.name for p in tmp_path.iterdir()) == [
        "preempted.ckpt",
        "single.ckpt",
    ]


def test_an_epoch_run_of_unknown_length_refuses_a_decaying_schedule(tiny_data, tmp_path):
    """The stream has no epoch length: the cosine would silently stay at its peak."""
    epochs = ["--trainer.max_steps", "-1", "--trainer.max_epochs", "1", "--data.resampled", "false"]
    with pytest.raises(ValueError, match=r"model.optim.schedule 'cosine' needs the run's length"):
        _fit(tmp_path, tiny_data, "tiny_teacher", *epochs)


@pytest.mark.parametrize("recipe", ["tiny_teacher", "tiny_student"])
def test_true_half_precision_casts_the_input_to_the_weights(recipe, tiny_data, tmp_path):
    """ "bf16-true" casts the weights, not the batch: the uint8 images become the weights' dtype."""
    run = _fit(tmp_path, tiny_data, recipe, "--trainer.precision", "bf16-true", steps=1)
    state = _last_checkpoint(run)
    assert state["global_step"] == 1
    assert {v.dtype for k, v in state["state_dict"].items() if v.is_floating_point()} == {torch.bfloat16}


def test_compile_wraps_the_forward_once():
    """Lightning calls `configure_model` before every fit, validate and test; the forward is compiled only once."""
    module = DepthModule("test_dav2", compile=True)
    module.configure_model()
    compiled = module.model.forward
    module.configure_model()
    assert module.model.forward is compiled


@pytest.mark.slow
def test_compiled_model_takes_the_same_steps(tiny_data, tmp_path):
    """`compile: true` through TorchInductor (C++ on CPU): about 3 min cold on a shared 2-core CPU, seconds once
    Inductor's cache holds the kernels. Same losses as eager."""
    from torch._dynamo.utils import counters

    no_val = ("--data.val", "null")
    eager = _fit(tmp_path / "eager", tiny_data, "tiny_teacher", *no_val, steps=2)
    counters.clear()
    compiled = _fit(tmp_path / "compiled", tiny_data, "tiny_teacher", *no_val, "--model.compile", "true", steps=2)
    assert counters["stats"]["unique_graphs"] >= 1
    loss = lambda run: [float(r["train/loss"]) for r in _metrics(run) if r.get("train/loss")]  # noqa: E731
    assert loss(compiled) == pytest.approx(loss(eager), rel=1e-4)


def test_grad_checkpointing_recomputes_the_blocks_and_keeps_the_gradients():
    image = torch.randint(0, 256, (2, 3, 28, 42), dtype=torch.uint8)
    grads, calls = [], []
    for enabled in (False, True):
        torch.manual_seed(0)
        module = DepthModule("test_dav2", grad_checkpointing=enabled)
        calls.append(0)
        module.model.encoder.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__(-1, calls[-1] + 1))
        module(image).square().mean().backward()
        grads.append({n: p.grad for n, p in module.model.named_parameters() if p.grad is not None})
    assert calls == [1, 2]  # checkpointed: the block runs again in the backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_checkpoint_of_a_module_built_in_python_opens_with_weights_only(tiny_data, tmp_path):
    """Hyperparameters then hold config dataclasses: they are allowlisted for torch's safe (weights-only) loading."""
    module = DepthModule("test_dav2", loss=preset("dav2"), optim=OptimConfig(encoder_lr=1e-4))
    data = DepthDataModule(str(tiny_data / "labeled"), batch_size=2, crop_size=28, num_workers=0)
    trainer = _bare_trainer(tmp_path)
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    state = torch.load(tmp_path / "run.ckpt", weights_only=True)
    assert state["hyper_parameters"]["optim"] == OptimConfig(encoder_lr=1e-4)
    assert DepthModule.load_from_checkpoint(tmp_path / "run.ckpt").optim_config.encoder_lr == 1e-4


def test_checkpoint_rebuilds_its_model_without_the_yaml(tiny_data, tmp_path):
    run = _fit(tmp_path, tiny_data, "tiny_teacher", steps=1)
    (ckpt,) = run.glob("lightning_logs/version_*/checkpoints/*.ckpt")
    module = DepthModule.load_from_checkpoint(ckpt, map_location="cpu")
    assert module.model.meta.name == "test_dav2"
    from depthkit.models import create_model

    model = create_model("test_dav2", checkpoint_path=ckpt)  # the models package reads Lightning checkpoints too
    for (k, v), w in zip(model.state_dict().items(), module.model.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, msg=k)


def test_wandb_offline_run_holds_metrics_and_panels(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb = ["--config", str(REPO / "configs/overlay/wandb.yaml")]
    _fit(
        tmp_path,
        tiny_data,
        "tiny_teacher",
        *wandb,
        "--model.panel_every_n_steps",
        "1",
        "--trainer.val_check_interval",
        "2",
        steps=2,
    )
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")  # under default_root_dir, not the working directory
    assert list(run_dir.glob("run-*.wandb")), "no offline run file"
    panels = list(run_dir.glob("files/media/images/panels/*.png"))
    assert panels, f"no image panels in {run_dir}"
    (table,) = run_dir.glob("files/media/table/val/per_image_*.table.json")  # the validation at the end of fit
    table = json.loads(table.read_text())
    assert table["columns"] == ["key", "abs_rel", "delta1"] and len(table["data"]) >= 2
    # Each run's config.yaml beside its own checkpoints: a second run in the same folder overwrites nothing.
    # The run's config holds the trainer's settings, beside the module's and the data's arguments.
    config = wandb_module.run.config
    assert config["trainer"]["max_steps"] == 2 and config["optim"]["encoder_lr"] == 2e-4
    wandb_module.finish()  # a new process starts a new run; in this one, the logger would resume the active run
    _fit(tmp_path, tiny_data, "tiny_teacher", *wandb, "--model.optim.encoder_lr", "0.001", steps=1)
    configs = sorted(tmp_path.glob("depthkit/*/config.yaml"), key=lambda p: p.stat().st_mtime)
    assert len(configs) == 2 and all((c.parent / "checkpoints/last.ckpt").is_file() for c in configs)
    assert [yaml.safe_load(c.read_text())["model"]["init_args"]["optim"]["encoder_lr"] for c in configs] == [2e-4, 1e-3]
    # A resumed fit continues its checkpoint's W&B run (it began a new, unlinked one), in the same run folder.
    first = configs[0].parent
    assert torch.load(first / "checkpoints/last.ckpt", weights_only=False)["depthkit"]["wandb_run_id"] == first.name
    wandb_module.finish()
    resume = ["--ckpt_path", str(first / "checkpoints/last.ckpt"), "--model.panel_every_n_steps", "1"]
    _fit(tmp_path, tiny_data, "tiny_teacher", *wandb, *resume, steps=3)
    assert len(list(tmp_path.glob("depthkit/*/config.yaml"))) == 2
    assert torch.load(first / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 3


def _teacher_args(tiny_data, tmp_path, *extra: str) -> list[str]:
    recipe = ["--config", str(REPO / "recipes/tiny_teacher.yaml"), "--data.labeled", str(tiny_data / "labeled")]
    recipe += ["--data.val", str(tiny_data / "val")]  # the recipe's own shards are not here: checked first
    return [
        "fit",
        "--trainer",
        str(REPO / "configs/trainer/cpu.yaml"),
        *recipe,
        "--trainer.default_root_dir",
        str(tmp_path),
        *extra,
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.init_args.model", "dav9_vitz"], "dav9_vitz"),
        (["--data.labeled", "/nonexistent/shards"], "data.labeled"),
        (["--data.ratio", "[1, 0]"], "ratio"),
        (["--data.val", "null", "--trainer.max_steps", "-5"], "max_steps"),
        (["--data.unlabeled", "{unlabeled}"], "DepthModule trains on labeled images only, but data.unlabeled is set"),
    ],
)
def test_bad_config_fails_before_training(override, message, tiny_data, tmp_path, capsys):
    override = [o.format(unlabeled=tiny_data / "unlabeled") for o in override]
    assert main(_teacher_args(tiny_data, tmp_path, *override)) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.glob("**/*.ckpt"))


def _student_args(tiny_data, tmp_path, *extra: str) -> list[str]:
    args = ["fit", "--trainer", str(REPO / "configs/trainer/cpu.yaml")]
    args += ["--config", str(REPO / "recipes/tiny_student.yaml"), "--data.labeled", str(tiny_data / "labeled")]
    args += ["--data.val", "null"]
    return [*args, "--trainer.default_root_dir", str(tmp_path), *extra]


def test_a_student_without_its_unlabeled_data_is_refused_before_training(tiny_data, tmp_path, capsys):
    unlabeled = ["--data.unlabeled", str(tiny_data / "unlabeled")]
    assert main(_student_args(tiny_data, tmp_path, "--data.unlabeled", "null", "--data.pseudo_labels", "null")) == 1
    assert "the student (StudentModule) trains on unlabeled images too: set data.unlabeled" in capsys.readouterr().err
    assert main(_student_args(tiny_data, tmp_path, *unlabeled, "--data.pseudo_labels", "null")) == 1
    assert "need targets: set data.pseudo_labels (pseudo-label shards) or model.teacher" in capsys.readouterr().err
    pseudo = ["--data.pseudo_labels", str(tiny_data / "pseudo")]
    assert main(_student_args(tiny_data, tmp_path, *unlabeled, *pseudo, "--data.ratio", "[4, 1]")) == 1
    err = capsys.readouterr().err
    assert "data.ratio [4, 1] with data.batch_size 2 gives 0.5 unlabeled images a step" in err, err
    assert main(_student_args(tiny_data, tmp_path, *unlabeled, *pseudo, "--trainer.max_steps", "0")) == 1
    assert "trainer.max_steps 0 trains nothing" in capsys.readouterr().err
    labeled_as_pseudo = ["--data.pseudo_labels", str(tiny_data / "labeled")]  # it failed at the first batch
    assert main(_student_args(tiny_data, tmp_path, *unlabeled, *labeled_as_pseudo)) == 1
    assert "holds labeled shards (its index.json), not pseudo-labels" in capsys.readouterr().err
    assert not tmp_path.exists() or not list(tmp_path.iterdir()), "refused before the trainer made a log folder"


def test_checkpoint_of_another_architecture_is_refused(tiny_data, tmp_path, capsys):
    other = tmp_path / "other.pth"
    torch.save({"encoder.blocks.99.attn.qkv.weight": torch.zeros(1)}, other)
    assert main(_teacher_args(tiny_data, tmp_path, "--model.init_args.checkpoint_path", str(other))) == 1
    assert "blocks.99" in capsys.readouterr().err


def test_ckpt_path_must_be_a_run_of_the_same_module_and_model(tiny_data, tmp_path, capsys):
    """Lightning would put a teacher run's arguments into a student, or a relative teacher's into a metric model."""
    run = _fit(tmp_path / "teacher", tiny_data, "tiny_teacher", steps=1)
    (ckpt,) = run.glob("lightning_logs/version_*/checkpoints/last.ckpt")

    def refused(recipe: str, ckpt_path, *extra: str) -> str:
        args = ["fit", "--trainer", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(REPO / recipe)]
        args += ["--data.labeled", str(tiny_data / "labeled"), *extra, "--ckpt_path", str(ckpt_path)]
        assert main([*args, "--trainer.default_root_dir", str(tmp_path / "other")]) == 1
        return capsys.readouterr().err

    assert "is a run of test_dav2 (head.activation: 'relu' there, 'sigmoid' here" in refused(
        "recipes/tiny_metric.yaml", ckpt
    )
    student = ["--data.unlabeled", str(tiny_data / "unlabeled"), "--data.pseudo_labels", str(tiny_data / "pseudo")]
    err = refused("recipes/tiny_student.yaml", ckpt, *student)
    assert "is a DepthModule run; this config trains a StudentModule" in err
    # At the run's last step too: another module's run is refused, not taken for a complete one (exit 0).
    err = refused("recipes/tiny_student.yaml", ckpt, *student, "--trainer.max_steps", "1")
    assert "is a DepthModule run; this config trains a StudentModule" in err
    # Lightning resumes with the run's module arguments: a changed one would be dropped without a word.
    err = refused("recipes/tiny_teacher.yaml", ckpt, "--data.val", "null", "--model.optim.encoder_lr", "0.1")
    assert "changes model.init_args.optim.encoder_lr: 0.1 here, 0.0002 in the run" in err
    weights = tmp_path / "weights.pth"
    torch.save({"head.x": torch.zeros(1)}, weights)
    assert "is not a `depthkit fit` checkpoint" in refused("recipes/tiny_teacher.yaml", weights)
    weights.write_text("a,b\n")
    assert "is not a checkpoint (not a torch zip file)" in refused("recipes/tiny_teacher.yaml", weights)
    assert "is a folder, not a checkpoint" in refused("recipes/tiny_teacher.yaml", tmp_path)
    # A sharded checkpoint (FSDP2 save_distributed_checkpoint): the state that is not tensors lies in meta.pt.
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    torch.save({k: v for k, v in state.items() if k not in ("state_dict", "optimizer_states")}, sharded / "meta.pt")
    assert "is a DepthModule run; this config trains a StudentModule" in refused(
        "recipes/tiny_student.yaml", sharded, *student
    )
    # Lightning takes a run's module arguments from files only: a folder's come from its meta.pt, and are checked
    # the same way (a changed learning rate was built into the module, while the optimizer kept the old one).
    err = refused("recipes/tiny_teacher.yaml", sharded, "--data.val", "null", "--model.optim.encoder_lr", "0.1")
    assert "changes model.init_args.optim.encoder_lr: 0.1 here, 0.0002 in the run" in err
    home = tmp_path / "home"  # a `~` the shell did not expand: Lightning's file check missed it the same way
    (home / "runs").mkdir(parents=True)
    (home / "runs" / "t.ckpt").symlink_to(ckpt)
    os.environ["HOME"], old_home = str(home), os.environ.get("HOME")
    try:
        err = refused(
            "recipes/tiny_teacher.yaml", "~/runs/t.ckpt", "--data.val", "null", "--model.optim.encoder_lr", "0.1"
        )
    finally:
        os.environ["HOME"] = old_home or ""
    assert "changes model.init_args.optim.encoder_lr: 0.1 here, 0.0002 in the run" in err
    (sharded / "meta.pt").unlink()
    assert "is a folder, not a checkpoint (nor a sharded one" in refused("recipes/tiny_teacher.yaml", sharded)
    assert not (tmp_path / "other").exists(), "refused before any work"


def _tiny_teacher_args() -> list[str]:
    return ["--trainer", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(REPO / "recipes/tiny_teacher.yaml")]


@pytest.mark.parametrize("option", [["--optimizer", "Adam"], ["--lr_scheduler.class_path=StepLR"]])
def test_lightning_optimizer_options_are_refused_with_a_pointer(option, tmp_path, capsys):
    """LightningCLI's own optimizer would replace the module's two learning rates with one, silently."""
    args = ["fit", *_tiny_teacher_args()]
    assert main([*args, *option, "--trainer.default_root_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "depthkit modules build their optimizer" in err and "--model.optim.encoder_lr" in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_bare_command_points_at_the_recipes(capsys):
    assert main(["fit"]) == 2
    assert "give a recipe: --config recipes/NAME.yaml" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "code", "message"),
    [
        (["--model.optim.schedule", "foo"], 2, "model.optim.schedule: Expected a typing.Literal['poly', 'cosine', "),
        (["--data.batch_size", "x"], 2, "data.batch_size: Expected a <class 'int'>. Got value: x"),
        (["--nope", "3"], 2, "unrecognized arguments: --nope 3"),
        (["--trainer", "nothere.yaml"], 2, 'error: trainer: Unable to load config "nothere.yaml"'),
        (["--model.optim.encoder_lr", "-1"], 1, "optim: learning rates must be positive"),  # the module's own check
        (["--model.model", "test_dav3"], 1, "model.model: unknown model 'test_dav3'; registered: "),
        (["--model.optim.encoder_lrr", "1e-3"], 2, "error: unrecognized arguments: --model.optim.encoder_lrr=1e-3"),
        (
            ["--trainer.devices", "0"],
            1,
            "trainer (accelerator=cpu, devices=0, num_nodes=1, strategy=auto, precision=32-true): `Trainer(",
        ),
    ],
)
def test_a_bad_option_is_one_line_naming_it(option, code, message, tiny_data, tmp_path, capsys):
    """Not the whole usage, nor jsonargparse's nested union message: the option and the reason."""
    args = ["fit", *_tiny_teacher_args(), "--data.labeled", str(tiny_data / "labeled"), "--data.val", "null"]
    assert main([*args, *option, "--trainer.default_root_dir", str(tmp_path)]) == code
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert line.startswith("depthkit fit: error: ") and message in line


def test_validate_refuses_weights_trained_as_another_model(tiny_data, tmp_path, capsys):
    """fit may start a metric model from a relative teacher's weights; validate / test would score them wrongly."""
    run = _fit(tmp_path, tiny_data, "tiny_teacher", steps=1)
    (ckpt,) = run.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    args = ["validate", "--trainer", str(REPO / "configs/trainer/cpu.yaml")]
    args += ["--config", str(REPO / "recipes/tiny_metric.yaml"), "--data.val", str(tiny_data / "val")]
    args += ["--trainer.default_root_dir", str(tmp_path / "validate"), "--model.checkpoint_path", str(ckpt)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"model.checkpoint_path {ckpt} was trained as test_dav2" in err and "depthkit validate scores" in err, err
    assert not (tmp_path / "validate").exists()


def test_a_malformed_yaml_is_named_with_the_reason_and_position(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: [3\n")
    assert main(["fit", *_tiny_teacher_args(), "--config", str(bad)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    expected = "line 3, column 1: expected ',' or ']', but got '<stream end>'"
    expected += " (while parsing a flow sequence from line 2)"
    assert line.startswith(f"depthkit fit: error: {bad} is not valid YAML: {expected}"), line


def test_resuming_the_last_run_and_its_length(tiny_data, tmp_path, capsys):
    """`--ckpt_path last` resumes the newest run under the root (Lightning would look in the new run's empty
    folder and start over); a max_steps at or below the checkpoint's step is refused, another one is warned of."""
    args = _teacher_args(tiny_data, tmp_path, "--data.val", "null", "--data.num_workers", "0")
    assert main([*args, "--ckpt_path", "last"]) == 1
    assert f"--ckpt_path last: no checkpoints/last.ckpt of a run under {tmp_path}" in capsys.readouterr().err
    assert main([*args, "--trainer.max_steps", "2"]) == 0
    capsys.readouterr()
    # A finished run's requeued job (SLURM) resumes its last.ckpt: nothing to do, and not a failure.
    assert main([*args, "--trainer.max_steps", "2", "--ckpt_path", "last"]) == 0
    assert "is at step 2 = trainer.max_steps: the run is complete; nothing to do" in capsys.readouterr().err
    assert main([*args, "--trainer.max_steps", "1", "--ckpt_path", "last"]) == 1
    assert "is at step 2: trainer.max_steps 1 leaves nothing to train" in capsys.readouterr().err
    with pytest.warns(
        UserWarning, match="its learning-rate schedule spans 2 steps, trainer.max_steps 3 makes it"
    ) as seen:
        assert main([*args, "--trainer.max_steps", "3", "--ckpt_path", "last"]) == 0
    assert not [w for w in seen if "exists and is not empty" in str(w.message)]  # its own folder: no warning
    # The resumed run continues its folder: one metrics.csv, the checkpoints together, its first config kept.
    (run,) = tmp_path.glob("lightning_logs/version_*")
    assert torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3
    steps = [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train/loss")]
    assert steps == [0, 1, 2], steps
    assert (run / "config.yaml").is_file() and (run / "config.resume_1.yaml").is_file()


def test_a_resume_from_an_older_checkpoint_branches_into_a_new_folder(tiny_data, tmp_path):
    """Continuing the folder would have overwritten the run's later metrics and its newer last.ckpt."""
    import shutil

    args = _teacher_args(tiny_data, tmp_path, "--data.val", "null", "--data.num_workers", "0")
    assert main([*args, "--trainer.max_steps", "2"]) == 0
    run = tmp_path / "lightning_logs/version_0"
    shutil.copy(run / "checkpoints/last.ckpt", tmp_path / "step2.ckpt")
    assert main([*args, "--trainer.max_steps", "4", "--ckpt_path", "last"]) == 0  # the run goes on in its folder
    assert main([*args, "--trainer.max_steps", "3", "--ckpt_path", str(tmp_path / "step2.ckpt")]) == 0
    assert torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4
    steps = [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train/loss")]
    assert steps == [0, 1, 2, 3], steps
    branch = tmp_path / "lightning_logs/version_1"
    assert torch.load(branch / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3


def test_no_logger_drops_the_learning_rate_monitor(tiny_data, tmp_path):
    """The trainer fragments log learning rates; `--trainer.logger false` has nothing to log them to."""
    _fit(tmp_path, tiny_data, "tiny_teacher", "--trainer.logger", "false", steps=1)
    assert (tmp_path / "checkpoints/last.ckpt").is_file()


def test_test_subcommand_scores_the_test_shards(tiny_data, tmp_path, capsys):
    # Trained with an override the test command does not repeat: a test scores the run as it was trained.
    run = _fit(tmp_path, tiny_data, "tiny_teacher", "--model.optim.encoder_lr", "0.001", steps=1)
    (ckpt,) = run.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    args = ["test", *_tiny_teacher_args()]
    # The training shards need not be there: a test runs on another machine than the training did.
    args += ["--data.labeled", str(tmp_path / "elsewhere"), "--data.val", "null", "--data.test", str(tiny_data / "val")]
    args += ["--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path / "test")]
    assert main(args) == 1  # no weights at all: random ones would be scored
    assert "depthkit test would score an untrained model: pass --ckpt_path" in capsys.readouterr().err
    assert main([*args, "--ckpt_path", str(ckpt)]) == 0
    (metrics,) = (tmp_path / "test").glob("lightning_logs/version_*/metrics.csv")
    (row,) = [r for r in csv.DictReader(open(metrics)) if r.get("test/abs_rel")]
    assert 0 < float(row["test/abs_rel"]) < 10 and 0 <= float(row["test/delta1"]) <= 1


def test_a_missing_data_option_or_path_is_named_before_anything_is_built(tiny_data, tmp_path, capsys):
    base = [*_tiny_teacher_args(), "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path / "run")]
    assert main(["fit", *base, "--data.labeled", str(tmp_path / "typo")]) == 1
    assert f"data.labeled: shard not found: {tmp_path / 'typo'}" in capsys.readouterr().err
    assert main(["fit", *base, "--data.labeled", str(tiny_data / "labeled"), "--data.val", str(tmp_path / "nope")]) == 1
    assert f"data.val: shard not found: {tmp_path / 'nope'}" in capsys.readouterr().err
    assert main(["fit", *base, "--data.labeled", "null"]) == 1
    assert "depthkit fit needs data.labeled" in capsys.readouterr().err
    weights = ["--model.checkpoint_path", str(tmp_path / "weights.pth")]  # never read: the data is checked first
    assert main(["test", *base, *weights, "--data.test", "null"]) == 1
    assert "depthkit test needs data.test" in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "refused before the trainer made a log folder"


def test_a_data_error_in_a_worker_ends_the_run_in_one_line(tiny_data, tmp_path):
    """Workers ignore SIGTERM (preemption is the main process's); a failed run must still exit, not wait on them."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.tar").write_bytes(b"not a tar file at all" * 40)
    args = _teacher_args(
        tiny_data, tmp_path, "--data.labeled", str(bad), "--data.val", "null", "--data.num_workers", "1"
    )
    done = subprocess.run(
        [sys.executable, "-m", "depthkit.cli", *args, "--trainer.enable_progress_bar", "false"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"depthkit fit: error: shard {bad / 'a.tar'}: corrupt or unreadable tar"), last
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("name", "slurm"), [("SIGTERM", False), ("SIGUSR1", False), ("SIGUSR1", True)])
def test_preemption_saves_a_checkpoint_that_resumes_the_run(name, slurm, tiny_data, tmp_path):
    """`depthkit fit` in a subprocess, signalled mid-run as SLURM does (every process, DataLoader workers too): it
    saves `<default_root_dir>/preempted.ckpt` and exits with 128 + the signal; `--ckpt_path` then finishes the run.
    Under SLURM (a task of an emulated srun), SIGUSR1 requeues the job, and Lightning's auto-requeue handler saves
    no second checkpoint (`hpc_ckpt_1.ckpt`)."""
    signum, max_steps, batch_size = getattr(signal, name), 40, 2
    small = ["--data.val", "null", "--data.crop_size", "28", "--data.batch_size", str(batch_size)]
    small += ["--trainer.max_steps", str(max_steps), "--trainer.enable_progress_bar", "false"]
    run, resumed, log = tmp_path / "run", tmp_path / "resumed", tmp_path / "log.txt"
    run.mkdir()
    ckpt = run / "preempted.ckpt"
    ckpt.write_bytes(b"an earlier preemption")
    stale = ckpt.stat().st_ino
    # Lightning stages checkpoints in $TMPDIR; from another filesystem its final move rewrites the old file in place.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": "/dev/shm" if Path("/dev/shm").is_dir() else str(tmp_path)}
    if slurm:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.txt"}\n')
        (bin_dir / "scontrol").chmod(0o755)
        env |= {"PATH": f"{bin_dir}:{env['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "depthkit"}
        env |= {"SLURM_NODELIST": "127.0.0.1", "SLURM_NTASKS": "1", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "1"}
        env |= {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}

    def fit(root: Path, *extra: str) -> subprocess.Popen:
        args = _teacher_args(tiny_data, root, *small, *extra)
        with open(log, "a") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "depthkit.cli", *args], stdout=out, stderr=out, env=env, start_new_session=True
            )

    proc = fit(run, "--model.panel_every_n_steps", "5")
    try:
        deadline = time.monotonic() + 120
        while not (run / "lightning_logs/version_0/panels/train/step_00000010.png").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signum)
        assert proc.wait(timeout=20) == 128 + signum, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert ckpt.stat().st_ino != stale, "the checkpoint was rewritten in place, not renamed into place"
    assert [p.name for p in run.iterdir() if p.is_file()] == ["preempted.ckpt"]
    if slurm:
        assert (tmp_path / "scontrol.txt").read_text() == "requeue 4242\n"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    step = state["global_step"]
    assert 10 <= step < max_steps
    assert state["optimizer_states"] and state["lr_schedulers"][0]["last_epoch"] == step
    assert state["DepthDataModule"]["labeled"]["consumed"] == {"0": step * batch_size}

    # The same command plus --ckpt_path, as a requeued job runs it (a changed module argument would be refused).
    resume = fit(resumed, "--model.panel_every_n_steps", "5", "--ckpt_path", str(ckpt))
    assert resume.wait(timeout=120) == 0, log.read_text()[-3000:]
    steps = [int(r["step"]) for r in _metrics(resumed) if r.get("train/loss")]
    assert steps == list(range(step, max_steps))
    (last,) = resumed.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == max_steps and final["lr_schedulers"][0]["last_epoch"] == max_steps
    assert final["DepthDataModule"]["labeled"]["consumed"] == {"0": max_steps * batch_size}


# Subprocesses import this checkout and use one thread each (2 cores run up to 4 of them).
PROCESS_ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _launch(*command: str) -> str:
    """Run a launcher (torchrun, `fabric run`) to its end; fail with the tail of its stderr; return its output."""
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **PROCESS_ENV}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def _torchrun(*args: str, port: int) -> str:
    """Run `python -m torch.distributed.run` with 2 CPU processes (gloo)."""
    return _launch(
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *args
    )


@pytest.fixture(scope="module")
def two_process_runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """The student, 3 steps on 2 processes, with DDP, FSDP2 and FSDP2 gathering bf16 weights (`parallel_probe.py`)."""
    runs = {}
    for port, strategy in enumerate(("ddp", "fsdp2", "fsdp2_bf16"), start=29517):
        runs[strategy] = tmp_path_factory.mktemp(strategy)
        probe = str(Path(__file__).with_name("parallel_probe.py"))
        _torchrun(probe, str(tiny_data), str(runs[strategy]), strategy, "student", port=port)
    return runs


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_read_disjoint_shards_and_stay_in_sync(strategy, two_process_runs):
    """Under DDP each rank holds its own copy, so equal parameters mean synchronized gradients. Under FSDP2 the full
    state dict is gathered from the one sharded copy and is equal by construction: what checks FSDP2's training is
    `test_fsdp2_shards_every_network_and_trains_as_ddp_does`."""
    run = two_process_runs[strategy]
    keys = [set((run / f"keys_{r}.txt").read_text().split()) for r in range(2)]
    assert keys[0] and keys[1] and not (keys[0] & keys[1])
    params = [torch.load(run / f"params_{r}.pt") for r in range(2)]
    for k in params[0]:
        torch.testing.assert_close(params[0][k], params[1][k], msg=k)


def test_lightnings_per_batch_sigterm_broadcast_is_left_to_preemption(two_process_runs):
    """Lightning broadcasts a SIGTERM flag from rank 0 before every batch as a device tensor it reads back: on GPUs
    a host-device sync each step. `Preemption` agrees on signals through gloo, so the broadcast is replaced."""
    for strategy in ("ddp", "fsdp2"):
        assert {(two_process_runs[strategy] / f"sigterm_broadcast_{r}.txt").read_text() for r in range(2)} == {
            "_agreed_elsewhere"
        }


def test_fsdp2_shards_every_network_and_trains_as_ddp_does(two_process_runs):
    """Each rank holds about half of every parameter (student, frozen encoder), and the steps equal DDP's."""
    local = {s: [torch.load(run / f"local_{r}.pt") for r in range(2)] for s, run in two_process_runs.items()}
    assert all(f == 1.0 for f in local["ddp"][0].values())
    for name, fraction in local["fsdp2"][0].items():
        total = fraction + local["fsdp2"][1][name]
        assert total == pytest.approx(1.0), name  # the two shards together hold the whole parameter
    big = [n for n, f in local["fsdp2"][0].items() if "blocks" in n and n.endswith("weight")]
    assert big and all(local["fsdp2"][0][n] == 0.5 for n in big)
    assert any(n.startswith("frozen_encoder.blocks") for n in big)
    ddp, fsdp = (torch.load(two_process_runs[s] / "params_0.pt") for s in ("ddp", "fsdp2"))
    assert ddp.keys() == fsdp.keys()
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-5, atol=1e-7, msg=k)


def test_fsdp2_bf16_weights_run_in_bf16_and_the_prediction_in_fp32(two_process_runs):
    dtypes = {s: json.loads((two_process_runs[s] / "dtypes_0.json").read_text()) for s in ("fsdp2", "fsdp2_bf16")}
    assert dtypes["fsdp2"] == {"block": "torch.float32", "prediction": "torch.float32"}
    assert dtypes["fsdp2_bf16"] == {"block": "torch.bfloat16", "prediction": "torch.float32"}
    fp32, bf16 = (_logged(two_process_runs[s], "train/loss") for s in ("fsdp2", "fsdp2_bf16"))
    assert sorted(bf16) == sorted(fp32) == [0, 1, 2]
    assert bf16[0] == pytest.approx(fp32[0], rel=5e-3)  # the same weights at step 0, computed in bf16
    params = torch.load(two_process_runs["fsdp2_bf16"] / "params_0.pt")
    assert all(p.dtype == torch.float32 for p in params.values())  # the optimizer steps fp32 shards


def test_fsdp2_preempted_on_one_rank_resumes_as_the_uninterrupted_run(two_process_runs, tiny_data, tmp_path):
    """The FSDP2 student of `two_process_runs`, again: SIGUSR1 reaches rank 1 only during step 2; the ranks agree,
    both take part in the save and exit. Resumed from that checkpoint, the run logs the uninterrupted run's last
    loss and ends with its parameters (model, optimizer and both ranks' data positions restored)."""
    probe = [str(Path(__file__).with_name("parallel_probe.py")), str(tiny_data)]
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29521", *probe]
    run += [str(tmp_path / "stopped"), "fsdp2", "student", "preempt"]
    stopped = subprocess.run(run, capture_output=True, text=True, env={**os.environ, **PROCESS_ENV}, timeout=300)
    # Both ranks passed the barrier after the save. The exit status each reports (128 + SIGUSR1: the single-process
    # tests check it) is not checked here: torchrun names the first rank it sees end, and tears the other down.
    assert stopped.returncode != 0
    ckpt = tmp_path / "stopped" / "preempted.ckpt"
    assert stopped.stderr.count(f"received SIGUSR1: saved {ckpt} at step 2, exiting") == 2, stopped.stderr[-3000:]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2 and state["optimizer_states"]
    assert not any(k.startswith("frozen_encoder.") for k in state["state_dict"])  # one file, the student only
    assert sorted(state["DepthDataModule"]["unlabeled"]["consumed"]) == ["0", "1"]  # both ranks' positions
    _torchrun(*probe, str(tmp_path / "resumed"), "fsdp2", "student", f"resume={ckpt}", port=29520)
    _assert_resumed_as(two_process_runs["fsdp2"], tmp_path / "resumed", rtol=1e-6, atol=1e-8)


def _assert_resumed_as(full_run: Path, resumed_run: Path, *, rtol: float, atol: float) -> None:
    """The probe's run resumed at step 2 logs the uninterrupted run's last loss and ends with its parameters."""
    full, resumed = (_logged(run, "train/loss") for run in (full_run, resumed_run))
    assert sorted(resumed) == [2] and resumed[2] == pytest.approx(full[2], rel=rtol)
    params = [torch.load(run / "params_0.pt") for run in (full_run, resumed_run)]
    for k in params[0]:
        torch.testing.assert_close(params[1][k], params[0][k], rtol=rtol, atol=atol, msg=k)


def test_a_ddp_checkpoint_resumes_under_fsdp2(two_process_runs, tiny_data, tmp_path):
    """A DDP run's optimizer state is keyed by position in its parameter groups, which leave frozen parameters
    out; Lightning named the positions after all parameters, so under FSDP2 every moment from the first frozen one
    on went to the wrong parameter (or failed on a shape: 14 vs 16). Preempted under DDP, resumed under FSDP2, the
    run ends as the uninterrupted DDP run."""
    probe = [str(Path(__file__).with_name("parallel_probe.py")), str(tiny_data)]
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523", *probe]
    run += [str(tmp_path / "stopped"), "ddp", "student", "preempt"]
    stopped = subprocess.run(run, capture_output=True, text=True, env={**os.environ, **PROCESS_ENV}, timeout=300)
    ckpt = tmp_path / "stopped" / "preempted.ckpt"
    assert ckpt.is_file(), stopped.stderr[-3000:]
    assert isinstance(next(iter(torch.load(ckpt, weights_only=False)["optimizer_states"][0]["state"])), int)
    _torchrun(*probe, str(tmp_path / "resumed"), "fsdp2", "student", f"resume={ckpt}", port=29524)
    _assert_resumed_as(two_process_runs["ddp"], tmp_path / "resumed", rtol=1e-5, atol=1e-7)


def _srun(command: list[str], *, nodes: int, tasks_per_node: int, port: int, env: dict | None = None) -> list[str]:
    """Start `command` as SLURM's `srun` does: one process per task, each with the SLURM_* variables srun sets, from
    which Lightning's SLURM environment takes ranks, nodes and the main address. Returns the tasks' outputs."""
    ntasks = nodes * tasks_per_node
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "depthkit", "SLURM_NODELIST": "127.0.0.1"}
    slurm |= {"SLURM_NTASKS": str(ntasks), "SLURM_NNODES": str(nodes), "SLURM_NTASKS_PER_NODE": str(tasks_per_node)}
    base = {**os.environ, **PROCESS_ENV, "MASTER_PORT": str(port), **slurm}
    procs = []
    for task in range(ntasks):
        ids = {"SLURM_PROCID": task, "SLURM_LOCALID": task % tasks_per_node, "SLURM_NODEID": task // tasks_per_node}
        task_env = {**base, **(env or {}), **{k: str(v) for k, v in ids.items()}}
        procs.append(
            subprocess.Popen(command, env=task_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    return outputs


@pytest.mark.parametrize("launcher", ["fabric", "srun"])
def test_launchers_start_two_ranks_without_code_changes(launcher, tiny_data, tmp_path):
    """`fabric run` (Lightning's launcher) and SLURM's `srun` (emulated) start `depthkit fit` (FSDP2) on 2 CPU
    processes (torchrun: the other multi-process tests)."""
    fit = [
        "fit",
        "--trainer",
        str(REPO / "configs/trainer/cpu.yaml"),
        "--config",
        str(REPO / "recipes/tiny_teacher.yaml"),
    ]
    fit += ["--trainer.strategy", "fsdp2", "--trainer.devices", "2", "--trainer.max_steps", "3"]
    fit += ["--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]
    fit += ["--data.labeled", str(tiny_data / "labeled"), "--data.val", "null", "--data.num_workers", "0"]
    if launcher == "fabric":
        fabric = [str(Path(sys.executable).with_name("fabric")), "run", "--accelerator", "cpu", "--devices", "2"]
        outputs = [_launch(*fabric, "--main-port", "29522", str(REPO / "depthkit/cli.py"), *fit)]
    else:
        outputs = _srun([sys.executable, "-m", "depthkit.cli", *fit], nodes=1, tasks_per_node=2, port=29523)
    members = sorted(line.split("MEMBER: ")[1] for o in outputs for line in o.splitlines() if "MEMBER: " in line)
    assert members == ["1/2", "2/2"]
    state = _last_checkpoint(tmp_path)
    assert state["global_step"] == 3
    assert sorted(state["DepthDataModule"]["labeled"]["consumed"]) == ["0", "1"]  # both ranks trained, in one group


def test_hybrid_shard_shards_within_a_node_and_replicates_across_nodes(tiny_data, tmp_path):
    """FSDP2 with `hybrid_shard` on 2 nodes x 2 processes (srun, emulated): each process holds half of a block's
    weights, and after the steps the two nodes hold the same shards though they read different data."""
    probe = [sys.executable, str(Path(__file__).with_name("parallel_probe.py")), str(tiny_data), str(tmp_path)]
    _srun([*probe, "hsdp", "teacher"], nodes=2, tasks_per_node=2, port=29524, env={"PROBE_NUM_NODES": "2"})
    keys = [set((tmp_path / f"keys_{r}.txt").read_text().split()) for r in range(4)]
    assert all(keys) and sum(map(len, keys)) == len(set().union(*keys))  # 4 ranks, disjoint data
    local = torch.load(tmp_path / "local_0.pt")
    blocks = [n for n in local if ".blocks." in n and n.endswith("weight")]
    assert blocks and all(local[n] == 0.5 for n in blocks)
    shards = [torch.load(tmp_path / f"shards_{r}.pt") for r in range(4)]
    for name in blocks:
        torch.testing.assert_close(shards[2][name], shards[0][name], rtol=0, atol=0, msg=name)  # node 1 = node 0
        torch.testing.assert_close(shards[3][name], shards[1][name], rtol=0, atol=0, msg=name)
        assert not torch.equal(shards[0][name], shards[1][name])  # two different halves
    params = [torch.load(tmp_path / f"params_{r}.pt") for r in range(4)]
    for k in params[0]:
        torch.testing.assert_close(params[3][k], params[0][k], rtol=0, atol=0, msg=k)


def _logged(run: Path, key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in _metrics(run) if r.get(key)}


@pytest.mark.parametrize("recipe", ["tiny_teacher", "tiny_student"])
def test_sparse_logging_writes_the_same_values_at_the_logging_steps(recipe, tiny_data, tmp_path):
    """Training steps between two logging steps skip `self.log` (it is costly): the logger still gets every term
    at every `log_every_n_steps`-th step, with the values an every-step run logs there."""
    every = _fit(tmp_path / "every", tiny_data, recipe, steps=4)
    sparse = _fit(tmp_path / "sparse", tiny_data, recipe, "--trainer.log_every_n_steps", "2", steps=4)
    keys = {k for r in _metrics(every) for k, v in r.items() if v and k.startswith(("train/", "perf/", "data/"))}
    assert "train/loss" in keys and "perf/images_per_s" in keys
    for key in keys:
        dense, few = _logged(every, key), _logged(sparse, key)
        assert sorted(few) == [1, 3], (key, few)
        if not key.startswith("perf/"):
            assert few == pytest.approx({step: dense[step] for step in few}, rel=1e-6), key


def test_relative_weights_paths_are_also_found_in_the_checkpoint_folder(tmp_path, monkeypatch):
    """Recipes say `encoder_checkpoint: checkpoints/<official name>`: from another working directory, the file in
    $DEPTHKIT_HOME/checkpoints is taken; a path found nowhere is named with both places looked in."""
    from depthkit.models import create_model, save_checkpoint

    torch.manual_seed(3)
    home = tmp_path / "home"
    (home / "checkpoints").mkdir(parents=True)
    source = create_model("test_dav2")
    save_checkpoint(source, home / "checkpoints" / "enc.pth")  # official layout: the encoder is `pretrained.*`
    monkeypatch.setenv("DEPTHKIT_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    module = DepthModule("test_dav2", encoder_checkpoint="checkpoints/enc.pth")
    expected = source.encoder.state_dict()
    for key, value in module.model.encoder.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    with pytest.raises(FileNotFoundError, match=r"model.encoder_checkpoint: checkpoints/none.pth not found \(looked"):
        DepthModule("test_dav2", encoder_checkpoint="checkpoints/none.pth")


def test_on_host_copies_the_scalars_once_and_keeps_their_names_and_values():
    from depthkit.train.module import on_host

    values = {"loss": torch.tensor(0.5, requires_grad=True) * 2, "term/a": torch.tensor(3.0, dtype=torch.bfloat16)}
    host = on_host(values)
    assert list(host) == ["loss", "term/a"]
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 and not v.requires_grad for v in host.values())
    assert host["loss"].item() == 1.0 and host["term/a"].item() == 3.0
    assert on_host({}) == {}


class _NoWaitingBetween(L.Callback):
    """Turns torch's CUDA sync debug mode to "error" from the start of step `first` to the start of step `last`."""

    def __init__(self, first: int, last: int):
        self.first, self.last, self.checked = first, last, 0

    def on_train_batch_start(self, trainer, *args):
        strict = self.first <= trainer.global_step < self.last
        torch.cuda.set_sync_debug_mode("error" if strict else "default")
        self.checked += strict

    def on_train_end(self, trainer, *args):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("student", [False, True], ids=["teacher", "student"])
def test_steps_between_logging_steps_never_wait_for_the_gpu(student, tiny_data, tmp_path):
    """A step that waits for the GPU (`.item()`, a copy to the host) keeps the host from preparing the next batch
    while the GPU computes: `depthkit fit` then trails a hand-written loop (`benchmarks/train_step.py`). Between two
    logging steps nothing in the loop may wait, Lightning's progress-bar bookkeeping included (steps 5-8 here; steps
    4 and 9 log). The loaders pin the batches, so that Lightning's copies to the device do not wait either."""
    from lightning.pytorch.loggers import CSVLogger

    from depthkit.train import StudentModule, ThroughputMonitor
    from depthkit.train.callbacks import ProgressBar

    if student:
        module = StudentModule("test_dav2", panel_every_n_steps=0)
        data = DepthDataModule(
            str(tiny_data / "labeled"),
            unlabeled=str(tiny_data / "unlabeled"),
            pseudo_labels=str(tiny_data / "pseudo"),
            batch_size=2,
            crop_size=56,
            num_workers=0,
        )
    else:
        module = DepthModule("test_dav2", panel_every_n_steps=0)
        data = DepthDataModule(str(tiny_data / "labeled"), batch_size=2, crop_size=56, num_workers=0)
    strict = _NoWaitingBetween(5, 9)
    trainer = _bare_trainer(
        tmp_path,
        accelerator="cuda",
        devices=1,
        max_steps=11,
        log_every_n_steps=5,
        logger=CSVLogger(tmp_path),
        enable_progress_bar=True,
        callbacks=[ProgressBar(), ThroughputMonitor(), strict],
    )
    trainer.fit(module, data)
    assert strict.checked == 4
    loader = data.train_dataloader()  # batches for a CUDA device come in pinned memory (asynchronous copies)
    assert all(dl.pin_memory for dl in (loader.iterables.values() if student else [loader]))
    assert {4, 9} <= set(_logged(tmp_path, "train/loss"))


@pytest.mark.parametrize("strong_augment", [True, False])
def test_the_students_photometric_augmentation_can_be_turned_off(tiny_data, strong_augment):
    """`data.strong_augment false` (Depth-Anything-V2#207: V2's small students need no colour jitter or blur)."""
    data = DepthDataModule(
        unlabeled=str(tiny_data / "unlabeled"), batch_size=4, crop_size=28, num_workers=0, cutmix_p=0.0,
        strong_augment=strong_augment,
    )  # fmt: skip
    data.setup("fit")
    batch = next(iter(data.train_dataloader().iterables["unlabeled"]))
    # Without jitter nor CutMix the student's input is the plain crop, carried once (no `image_strong` copy).
    assert ("image_strong" in batch) == strong_augment
    if strong_augment:
        assert not torch.equal(batch["image_strong"], batch["image"])


def test_a_run_off_the_recipes_global_batch_warns_with_the_setting_that_restores_it(tiny_data):
    """Paper recipes assume 8 GPUs; on 2 with accumulation 2 the batch per optimizer step halves silently."""
    from types import SimpleNamespace

    data = DepthDataModule(str(tiny_data / "labeled"), batch_size=4, crop_size=28, num_workers=0, global_batch_size=32)
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    data.trainer = SimpleNamespace(accumulate_grad_batches=2, global_rank=0, world_size=2, strategy=cpu)
    data.setup("fit")
    with pytest.warns(UserWarning, match=r"assumes 32 images .* this run takes 16 .*Set data.batch_size 8 or "):
        data.train_dataloader()
    data = DepthDataModule(str(tiny_data / "labeled"), batch_size=8, crop_size=28, num_workers=0, global_batch_size=32)
    data.trainer = SimpleNamespace(accumulate_grad_batches=2, global_rank=0, world_size=2, strategy=cpu)
    data.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.train_dataloader()


def test_a_resume_on_other_loader_workers_is_refused_in_the_main_process_with_the_fix(tiny_data):
    """It failed inside a DataLoader worker, after start-up, and named no setting."""
    data = DepthDataModule(str(tiny_data / "labeled"), batch_size=2, crop_size=28, num_workers=0, val=None)
    data.load_state_dict({"labeled": {"epoch": 0, "total_workers": 2, "consumed": {"0": 4, "1": 4}}})
    data.setup("fit")
    with pytest.raises(
        ValueError, match=r"ran on 2 global loader workers .* this run on 1 x 1: .*--data.num_workers 2"
    ):
        data.train_dataloader()
    data = DepthDataModule(str(tiny_data / "labeled"), batch_size=2, crop_size=28, num_workers=2, val=None)
    data.load_state_dict({"labeled": {"epoch": 0, "total_workers": 2, "consumed": {"0": 4, "1": 4}}})
    data.setup("fit")
    assert data.train_dataloader() is not None


def test_an_unknown_teacher_names_its_option():
    from depthkit.train import StudentModule

    with pytest.raises(ValueError, match="model.teacher: unknown model 'dav9_vitz'"):
        StudentModule("test_dav2", teacher="dav9_vitz")


def test_a_position_saved_over_other_shards_warns(tiny_data, tmp_path):
    """The position is a count per loader worker: over another shard list it skips other samples than it read."""
    data = DepthDataModule(str(tiny_data / "labeled"), batch_size=2, crop_size=28, num_workers=0, val=None)
    data.setup("fit")
    data.train_dataloader()
    saved = data.state_dict()
    assert saved["labeled"]["shards"] and saved["unlabeled"]["shards"] is None
    saved["labeled"] |= {"total_workers": 1, "consumed": {"0": 4}}
    elsewhere = tmp_path / "staged"  # the same shards in another folder (a job's scratch copy): the same data
    elsewhere.symlink_to(tiny_data / "labeled")
    same = DepthDataModule(str(elsewhere), batch_size=2, crop_size=28, num_workers=0, val=None)
    same.load_state_dict(saved)
    same.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.train_dataloader()
    fewer = DepthDataModule(
        str(tiny_data / "labeled" / "synth-00000[0-3].tar"), batch_size=2, crop_size=28, num_workers=0, val=None
    )
    fewer.load_state_dict(saved)
    fewer.setup("fit")
    with pytest.warns(
        UserWarning, match=r"data.labeled: the checkpoint's position was saved over other shards \(4 now\)"
    ):
        fewer.train_dataloader()
    old = DepthDataModule(str(tiny_data / "labeled"), batch_size=2, crop_size=28, num_workers=0, val=None)
    old.load_state_dict({"labeled": {k: v for k, v in saved["labeled"].items() if k != "shards"}})
    old.setup("fit")
    with pytest.warns(UserWarning, match=r"saved by a depthkit that drew shards with replacement"):
        old.train_dataloader()


def test_encoder_weights_load_into_an_overridden_encoder(tmp_path):
    """`encoder_checkpoint` with `model_overrides` (a DINOv2-reg encoder): the plain registered encoder was built to
    check the file, and refused the register tokens as unexpected keys."""
    from depthkit.models import create_encoder

    overrides = {"num_register_tokens": 4, "interpolate_offset": 0.0, "interpolate_antialias": True}
    reg = create_encoder("test_dav2", **overrides)
    path = tmp_path / "dinov2_reg.pth"
    torch.save(reg.state_dict(), path)
    module = DepthModule("test_dav2", model_overrides=overrides, encoder_checkpoint=str(path))
    for key, value in reg.state_dict().items():
        torch.testing.assert_close(module.model.encoder.state_dict()[key], value, msg=key)
