"""Training: every YAML parses, every recipe type takes a CPU step, learning, resume, DDP, W&B, bad configs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from depthkit.cli import main
from depthkit.train import DepthDataModule, DepthModule
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


def _metrics(run: Path) -> list[dict]:
    (path,) = run.glob("lightning_logs/version_*/metrics.csv")
    return list(csv.DictReader(open(path)))


@pytest.mark.parametrize("recipe", ["tiny_teacher", "tiny_metric", "tiny_student"])
def test_one_step_of_every_recipe_type(recipe, tiny_data, tmp_path):
    run = _fit(tmp_path, tiny_data, recipe, steps=2)
    rows = _metrics(run)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    if recipe == "tiny_student":
        keys = rows[0].keys()
        assert {"train/term/labeled", "train/term/unlabeled", "train/term/feature"} <= set(keys)
    assert any(r.get("perf/images_per_s") for r in rows) and any(r.get("lr-AdamW/encoder") for r in rows)


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
            return sum(
                aligned_metrics(module(b["image"]), b, module.model.meta.output_space)["abs_rel"] for b in val
            ) / len(val)

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
    _fit(
        tmp_path,
        tiny_data,
        "tiny_teacher",
        "--config",
        str(REPO / "configs/overlay/wandb.yaml"),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "wandb_runs"),
        "--model.panel_every_n_steps",
        "1",
        steps=2,
    )
    (run_dir,) = (tmp_path / "wandb_runs" / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb")), "no offline run file"
    panels = list(run_dir.glob("files/media/images/panels/*.png"))
    assert panels, f"no image panels in {run_dir}"


def _teacher_args(tiny_data, tmp_path, *extra: str) -> list[str]:
    recipe = ["--config", str(REPO / "recipes/tiny_teacher.yaml"), "--data.labeled", str(tiny_data / "labeled")]
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
    ],
)
def test_bad_config_fails_before_training(override, message, tiny_data, tmp_path, capsys):
    assert main(_teacher_args(tiny_data, tmp_path, *override)) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_checkpoint_of_another_architecture_is_refused(tiny_data, tmp_path, capsys):
    other = tmp_path / "other.pth"
    torch.save({"encoder.blocks.99.attn.qkv.weight": torch.zeros(1)}, other)
    assert main(_teacher_args(tiny_data, tmp_path, "--model.init_args.checkpoint_path", str(other))) == 1
    assert "blocks.99" in capsys.readouterr().err


def test_two_processes_read_disjoint_shards_and_stay_in_sync(tiny_data, tmp_path):
    """torchrun, 2 CPU processes, gloo: disjoint data per rank, identical parameters after the steps."""
    script = Path(__file__).with_name("ddp_probe.py")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            str(script),
            str(tiny_data / "labeled"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    keys = [set((tmp_path / f"keys_{r}.txt").read_text().split()) for r in range(2)]
    assert keys[0] and keys[1] and not (keys[0] & keys[1])
    params = [torch.load(tmp_path / f"params_{r}.pt") for r in range(2)]
    for k in params[0]:
        torch.testing.assert_close(params[0][k], params[1][k], msg=k)
