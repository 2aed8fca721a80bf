"""`make demo`: the whole pipeline end to end on CPU with tiny models on generated data, and a report.

    python -m depthkit.demo --out demo_out [--fresh] [--steps 1200]

Stages (each is skipped when its output exists, unless --fresh): synthesize labeled / unlabeled / held-out shards;
train a tiny teacher; pseudo-label the unlabeled shards with it; train a tiny student (labeled:unlabeled 1:2,
strong augmentation, CutMix, feature alignment) for the same number of optimizer steps; evaluate teacher, student
and a vertical-ramp baseline on held-out scenes and the teacher on ../shared/data/rgbd; export the student to ONNX
and verify it; write `report.md` with figures.

The demo is honest: on held-out scenes, with one protocol (per-image least-squares scale and shift in disparity
space, aligned disparity clamped at the scenes' far cap), the teacher's AbsRel must be at most half the ramp's
(the ramp is exact on a flat ground, so beating it means the model learned walls and objects), and the student's
within 20% of the teacher's. It exits non-zero, loudly, when either fails.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_RGBD = REPO.parent / "shared" / "data" / "rgbd" / "manifest.csv"
MODEL = "tiny_dav2"  # test_dav2 is too small to learn more than the floor's ramp in CPU minutes
IMAGE_SIZE = (96, 128)
CROP = 84
FAR_CAP_M = 20.0


class Stages:
    """Skips a stage whose output exists, unless `--fresh` or an earlier stage ran (its inputs changed)."""

    def __init__(self, fresh: bool):
        self.redo = fresh

    def __call__(self, name: str, done: Path) -> bool:
        if done.exists() and not self.redo:
            print(f"[demo] {name}: done already ({done}); skipping", flush=True)
            return False
        print(f"[demo] {name} ...", flush=True)
        self.redo = True
        return True


def run(args: list[str]) -> None:
    print("  $ depthkit " + " ".join(args), flush=True)
    # Offline whatever the shell says: WANDB_MODE decides over a config's `offline`, and the demo never uploads.
    env = {**os.environ, "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "-m", "depthkit.cli", *args], env=env)
    if result.returncode != 0:
        raise SystemExit(f"[demo] FAILED: depthkit {' '.join(args[:2])} exited with {result.returncode}")


def fit(out: Path, recipe: str, name: str, steps: int, extra: list[str]) -> Path:
    run_dir = out / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    # Two loggers: CSV (read back for the report) and W&B offline (the dashboard, `wandb sync` later).
    loggers = run_dir.parent / f"{name}_loggers.yaml"
    loggers.parent.mkdir(parents=True, exist_ok=True)
    loggers.write_text(
        "trainer:\n  logger:\n"
        "    - class_path: depthkit.train.CSVLogger\n"
        f"      init_args: {{save_dir: '{run_dir}', name: csv}}\n"
        "    - class_path: lightning.pytorch.loggers.WandbLogger\n"
        f"      init_args: {{project: depthkit-demo, name: {name}, offline: true, save_dir: '{out}'}}\n"  # out/wandb
    )
    run(
        [
            "fit",
            "--trainer",
            str(REPO / "configs/trainer/cpu.yaml"),
            "--config",
            str(REPO / f"recipes/{recipe}.yaml"),
            "--config",
            str(loggers),
            "--trainer.max_steps",
            str(steps),
            "--trainer.default_root_dir",
            str(run_dir),
            "--trainer.enable_progress_bar",
            "true",
            "--trainer.log_every_n_steps",
            str(min(10, steps)),  # per-step logging of a tiny model costs the demo most of a minute
            "--model.init_args.panel_every_n_steps",
            "300",
            "--trainer.callbacks.every_n_train_steps",
            str(steps),
            "--trainer.callbacks.dirpath",
            str(run_dir / "checkpoints"),
            "--model.init_args.model",
            MODEL,
            "--model.init_args.optim.encoder_lr",
            "1e-3",  # from scratch, so no reason to keep the encoder slower than the head
            "--data.crop_size",
            str(CROP),
            "--data.batch_size",
            "8",
            "--data.num_workers",
            "1",
            *extra,
        ]
    )
    ckpts = sorted(run_dir.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise SystemExit(f"[demo] FAILED: no checkpoint under {run_dir}")
    final = out / f"{name}.ckpt"
    shutil.copy(ckpts[-1], final)
    return final


def held_out_scores(out: Path, checkpoints: dict[str, Path]) -> dict[str, dict]:
    """AbsRel / delta1 of each model and of the vertical ramp on the held-out scenes, one protocol."""
    import numpy as np
    import torch

    from depthkit.data.stream import ShardStream
    from depthkit.data.transforms import SampleTransform, TransformConfig
    from depthkit.eval.alignment import align_to_depth
    from depthkit.eval.metrics import depth_metrics
    from depthkit.models import create_model

    transform = SampleTransform(TransformConfig(crop_size=CROP, random_crop=False, hflip=False))
    batches = list(ShardStream(out / "data/heldout", batch_size=16, drop_last=False, transform=transform))
    ramp_HW = np.broadcast_to(np.arange(CROP, dtype=np.float64)[:, None], (CROP, CROP))  # disparity grows downwards
    predictors = {"ramp": lambda b: np.broadcast_to(ramp_HW, (len(b["key"]), CROP, CROP))}
    for name, ckpt in checkpoints.items():
        model = create_model(MODEL, checkpoint_path=ckpt).eval()

        def predict(b, model=model):
            with torch.no_grad():
                return model(model.normalize(b["image"].float() / 255)).numpy()

        predictors[name] = predict
    scores = {}
    for name, predict in predictors.items():
        rows = []
        for b in batches:
            pred_BHW = predict(b)
            for i in range(len(b["key"])):
                target_HW, mask_HW = b["target"][i].numpy(), b["valid"][i].numpy()
                depth_HW, _ = align_to_depth(
                    pred_BHW[i],
                    target_HW,
                    mask_HW,
                    alignment="lsq_disparity",
                    output_space="affine_disparity",
                    min_depth=1e-3,
                    max_depth=FAR_CAP_M,
                )
                rows.append(depth_metrics(depth_HW, target_HW, mask_HW))
        scores[name] = {k: float(np.mean([r[k] for r in rows])) for k in ("abs_rel", "delta1", "rmse")}
        scores[name]["num_images"] = len(rows)
    return scores


def sample_figure(out: Path, checkpoints: dict[str, Path], path: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from depthkit.colors import colorize
    from depthkit.data.stream import ShardStream
    from depthkit.data.transforms import SampleTransform, TransformConfig
    from depthkit.models import create_model

    transform = SampleTransform(TransformConfig(crop_size=CROP, random_crop=False, hflip=False))
    batch = next(iter(ShardStream(out / "data/heldout", batch_size=4, transform=transform)))
    rows = []
    models = {n: create_model(MODEL, checkpoint_path=c).eval() for n, c in checkpoints.items()}
    for i in range(4):
        valid = batch["valid"][i].numpy()
        disparity = np.where(valid, 1 / np.maximum(batch["target"][i].numpy(), 1e-3), 0)
        tiles = [batch["image"][i].permute(1, 2, 0).numpy(), colorize(disparity, valid)]
        for model in models.values():
            with torch.no_grad():
                pred = model(model.normalize(batch["image"][i : i + 1].float() / 255))[0].numpy()
            tiles.append(colorize(pred))
        rows.append(np.concatenate(tiles, 1))
    image = np.concatenate(rows, 0)
    Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.NEAREST).save(path)


def loss_figure(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, run_dir in runs.items():
        (metrics,) = run_dir.glob("csv/version_*/metrics.csv")
        rows = [r for r in csv.DictReader(open(metrics)) if r.get("train/loss")]
        ax.plot([int(r["step"]) for r in rows], [float(r["train/loss"]) for r in rows], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train/loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--fresh", action="store_true", help="start over")
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps of teacher and student each")
    args = parser.parse_args(argv)
    if not (REPO / "recipes").is_dir():  # an installed wheel: the recipes and configs are files of the repository
        parser.error(f"the demo runs from a clone of depthkit (it trains with its recipes/ and configs/): {REPO}")
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = out / "data"
    h, w = IMAGE_SIZE

    stage = Stages(args.fresh)
    if stage("1/7 synthesize shards", data / "heldout" / "index.json"):
        for name, num, seed, extra in (
            ("labeled", 512, 0, []),
            ("unlabeled", 512, 1, ["--unlabeled"]),
            ("heldout", 96, 2, []),
        ):
            run(
                [
                    "synth",
                    "--out",
                    str(data / name),
                    "--num",
                    str(num),
                    "--size",
                    str(h),
                    str(w),
                    "--seed",
                    str(seed),
                    "--shard-size",
                    "64",
                    "--workers",
                    "2",
                    "--overwrite",
                    *extra,
                ]
            )

    teacher = out / "teacher.ckpt"
    if stage("2/7 train the teacher", teacher):
        fit(
            out,
            "tiny_teacher",
            "teacher",
            args.steps,
            ["--data.labeled", str(data / "labeled"), "--data.val", str(data / "heldout")],
        )

    pseudo = data / "pseudo"
    if stage("3/7 pseudo-label the unlabeled shards", pseudo / "index.json"):
        shutil.rmtree(pseudo, ignore_errors=True)  # labels of an earlier teacher must not mix in
        run(
            [
                "pseudo-label",
                "--checkpoint",
                str(teacher),
                "--model",
                MODEL,
                "--input",
                str(data / "unlabeled"),
                "--output",
                str(pseudo),
                "--resolution",
                str(CROP),
                "--batch-size",
                "16",
            ]
        )

    student = out / "student.ckpt"
    if stage("4/7 train the student", student):
        fit(
            out,
            "tiny_student",
            "student",
            args.steps,
            [
                "--data.labeled",
                str(data / "labeled"),
                "--data.val",
                str(data / "heldout"),
                "--data.unlabeled",
                str(data / "unlabeled"),
                "--data.pseudo_labels",
                str(pseudo),
                "--data.batch_size",
                "3",  # 3 labeled + 6 pseudo-labeled per step: about the teacher's 8 images, and the demo's time
            ],
        )

    print("[demo] 5/7 evaluate", flush=True)
    scores = held_out_scores(out, {"teacher": teacher, "student": student})
    if SHARED_RGBD.is_file():
        run(
            [
                "eval",
                "--model",
                MODEL,
                "--checkpoint",
                str(teacher),
                "--dataset",
                str(SHARED_RGBD),
                "--out",
                str(out / "eval_rgbd_teacher.json"),
            ]
        )
        real_data = "Real data (teacher on ../shared/data/rgbd, tiny model, for format sanity only): "
        real_data += "`eval_rgbd_teacher.json`."
    else:
        (out / "eval_rgbd_teacher.json").unlink(missing_ok=True)  # an earlier run's, of another teacher
        real_data = f"Real data: skipped, no {SHARED_RGBD} (the sample data beside the clone)."
        print(f"[demo] {real_data}", flush=True)

    onnx, release = out / "student.onnx", out / "student_official.pth"
    if stage("6/7 export the student: ONNX (verified) and weights for the official code", release):
        run(["export", "onnx", "--checkpoint", str(student), "--out", str(onnx)])
        run(["export", "weights", "--checkpoint", str(student), "--layout", "official", "--out", str(release)])

    print("[demo] 7/7 report", flush=True)
    sample_figure(out, {"teacher": teacher, "student": student}, out / "samples.png")
    loss_figure({"teacher": out / "runs/teacher", "student": out / "runs/student"}, out / "loss_curves.png")
    ramp, t, s = scores["ramp"]["abs_rel"], scores["teacher"]["abs_rel"], scores["student"]["abs_rel"]
    checks = {
        "teacher AbsRel <= 0.5 x ramp AbsRel": t <= 0.5 * ramp,
        "student AbsRel within 20% of the teacher's": s <= 1.2 * t,
    }
    protocol = (
        "per-image least-squares scale and shift in disparity space, aligned disparity clamped at the "
        f"far cap ({FAR_CAP_M:g} m), metrics at the {CROP}x{CROP} centre crop of {scores['ramp']['num_images']} "
        "held-out synthetic scenes"
    )
    lines = [
        "# depthkit demo report",
        "",
        f"Teacher and student: `{MODEL}` (tiny ViT + DPT), {args.steps} optimizer steps each, on CPU.",
        "",
        f"Protocol: {protocol}.",
        "",
        "| model | AbsRel | delta1 | RMSE (m) |",
        "| --- | --- | --- | --- |",
        *[f"| {n} | {v['abs_rel']:.4f} | {v['delta1']:.4f} | {v['rmse']:.3f} |" for n, v in scores.items()],
        "",
        "Checks:",
        *[f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()],
        "",
        real_data,
        "",
        "![samples](samples.png)",
        "",
        "input | ground-truth disparity | teacher | student",
        "",
        "![losses](loss_curves.png)",
        "",
        f"Student ONNX: `{onnx.name}` (verified against PyTorch at export). Student weights in the official Depth "
        f"Anything layout: `{release.name}` (`depthkit export weights`: read back and compared before kept).",
        "",
        f"Total time: {time.perf_counter() - start:.0f} s. W&B offline runs: `{out / 'wandb'}` (`wandb sync`).",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4 : 12 + len(scores)]))
    if not all(checks.values()):
        print("[demo] FAILED: " + "; ".join(n for n, ok in checks.items() if not ok), file=sys.stderr)
        return 1
    print(f"[demo] done: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
