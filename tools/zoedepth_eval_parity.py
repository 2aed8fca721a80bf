"""Check `depthkit eval` against ZoeDepth's metric evaluation (Depth Anything V1 `metric_depth/`), on synthetic data.

    git clone https://github.com/LiheYoung/Depth-Anything
    python tools/zoedepth_eval_parity.py --official Depth-Anything [--datasets kitti,nyu] [--tolerance 1e-5]

`compute_metrics` and `DATASETS_CONFIG` are imported from your clone (`metric_depth/zoedepth/utils/misc.py` and
`config.py`); this tool downloads nothing and contains none of ZoeDepth's code. Missing optional packages that
`misc.py` imports at module level but `compute_metrics` never uses (scipy, matplotlib, requests, torchvision) are
stubbed.

A fake benchmark layout is written to a temporary folder (uint16 PNG ground truth, 0 = invalid: KITTI sparse, in
1/256 m, at several frame sizes; NYU dense with holes, in mm, 480x640; exact range-boundary values), with metric
predictions saved as .npy: one at ground-truth size with multiplicative noise, one at a lower resolution with
out-of-range, inf and nan values (exercises the bilinear resize and the clamp). Then:

  depthkit: what `depthkit eval --predictions DIR --output-space metric_depth --dataset kitti|nyu` does,
            load_benchmark -> FolderPredictor -> evaluate, with each dataset's default protocol (KITTI: kb_garg).
  ZoeDepth: the PNG decoded as `data_mono.py` does (float32 / 256 or / 1000); for KITTI its eval loader's
            `do_kb_crop` (bottom 352 rows, centred 1216 columns) is applied to the ground truth and to the
            prediction (a low-resolution one first resized to the full frame, bilinear with align_corners=True,
            as a model run on the whole frame would give it), then `compute_metrics(gt, pred,
            config=DATASETS_CONFIG[dataset])` (Garg crop on the 352x1216 box; NYU: Eigen crop), mean over images.

The predictions are of the whole frame, so this checks the scoring; that a model run by `depthkit eval` is shown the
KB box, as ZoeDepth's eval loader crops the image, is tested in tests/eval/test_eval_runner.py.

Prints the metrics side by side per dataset and prediction kind, and the maximum relative difference (summary
and per image); exits 1 above `--tolerance` (ZoeDepth works in float32, depthkit in float64).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np

ZOE_NAMES = {"delta1": "a1", "delta2": "a2", "delta3": "a3", "log10": "log_10"}
KITTI_SHAPES = [(375, 1242), (375, 1242), (352, 1216), (370, 1224), (376, 1241)]
NYU_IMAGES = 4
STUBBABLE = ("scipy", "matplotlib", "matplotlib.cm", "requests", "torchvision", "torchvision.transforms")


def load_zoedepth(repo: Path):
    """(compute_metrics, DATASETS_CONFIG) from a clone of LiheYoung/Depth-Anything."""
    root = repo / "metric_depth"
    if not (root / "zoedepth" / "utils" / "misc.py").is_file():
        raise SystemExit(
            f"--official {repo}: metric_depth/zoedepth/utils/misc.py not found; pass a clone of "
            "https://github.com/LiheYoung/Depth-Anything"
        )
    for name in STUBBABLE:  # imported at module level by misc.py, unused by compute_metrics
        try:
            importlib.import_module(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.__getattr__ = lambda attr: None  # `from scipy import ndimage` and the like
            sys.modules[name] = stub
    sys.path.insert(0, str(root))
    from zoedepth.utils.config import DATASETS_CONFIG
    from zoedepth.utils.misc import compute_metrics

    return compute_metrics, DATASETS_CONFIG


# ----------------------------------------------------------------------------------------------------------------
# synthetic data
# ----------------------------------------------------------------------------------------------------------------


def smooth_field(rng, h: int, w: int, lo: float, hi: float) -> np.ndarray:
    """Dense plausible depth in [lo, hi]: a low-frequency random field, nearer towards the bottom rows."""
    import torch

    coarse = torch.from_numpy(rng.uniform(0, 1, size=(8, 16)).astype(np.float32))[None, None]
    field = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0, 0].numpy()
    field = (field - field.min()) / (field.max() - field.min() + 1e-9)
    x = np.clip(0.6 * field + 0.4 * np.linspace(1.0, 0.2, h, dtype=np.float32)[:, None], 0, 1)
    return lo * (hi / lo) ** x.astype(np.float64)


def make_sample(rng, h: int, w: int, dataset: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """uint16 raw ground truth (0 = invalid) and the predictions {kind: float32 map}."""
    import torch

    kitti = dataset == "kitti"
    scale, lo, hi, density = (256.0, 2.0, 95.0, 0.25) if kitti else (1000.0, 0.5, 12.0, 0.9)
    dense = smooth_field(rng, h, w, lo, hi)
    valid = rng.uniform(size=(h, w)) < density
    if kitti:
        valid[: int(0.3 * h)] = False  # no LiDAR returns in the sky
    raw = np.round(dense * scale).clip(0, 65535).astype(np.uint16)
    raw[~valid] = 0
    probes = rng.choice(np.flatnonzero(valid), size=200, replace=False)
    raw.flat[probes[:100]] = 20480 if kitti else 10000  # exactly the maximum depth (80 m, 10 m)
    raw.flat[probes[100:]] = 1  # the smallest non-zero depth
    base = np.where(raw > 0, raw / scale, dense)
    preds = {"gt_size": (base * rng.lognormal(0.0, 0.12, size=(h, w))).astype(np.float32)}
    lh, lw = (h // 2 + 7, w // 2 - 5) if kitti else (h // 2 + 3, w // 2 + 11)
    low = torch.nn.functional.interpolate(
        torch.from_numpy(dense.astype(np.float32))[None, None], size=(lh, lw), mode="bilinear", align_corners=True
    )[0, 0].numpy() * rng.lognormal(0.05, 0.2, size=(lh, lw)).astype(np.float32)
    bad = rng.choice(lh * lw, size=400, replace=False)
    low.flat[bad[:100]] = 200.0 if kitti else 30.0
    low.flat[bad[100:200]] = -1.0
    low.flat[bad[200:300]] = 1e-6
    low.flat[bad[300:350]] = np.inf
    low.flat[bad[350:]] = np.nan
    preds["low_res"] = low.astype(np.float32)
    return raw, preds


def write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def build(dataset: str, root: Path, rng) -> list[dict]:
    """Write the fake layout that depthkit's reader expects; return [{rgb_rel, depth_path, preds}]."""
    samples = []
    if dataset == "kitti":
        lines = []
        for i, (h, w) in enumerate(KITTI_SHAPES):
            drive = f"2011_09_26_drive_{i + 1:04d}_sync"
            rgb_rel = f"2011_09_26/{drive}/image_02/data/{i:010d}.png"
            depth_rel = f"{drive}/proj_depth/groundtruth/image_02/{i:010d}.png"
            raw, preds = make_sample(rng, h, w, dataset)
            write_png(root / "raw" / rgb_rel, np.zeros((h, w, 3), np.uint8))
            depth_path = root / "data_depth_annotated" / "val" / depth_rel
            write_png(depth_path, raw)
            lines.append(f"{rgb_rel} {depth_rel} 721.5377")
            samples.append({"rgb_rel": rgb_rel, "depth_path": depth_path, "preds": preds})
        (root / "eigen_test_files_with_gt.txt").write_text("\n".join(lines) + "\n")
    else:
        for i in range(NYU_IMAGES):
            test = root / "official_splits" / "test" / f"scene_{i}"
            raw, preds = make_sample(rng, 480, 640, dataset)
            write_png(test / f"rgb_{i:05d}.jpg", np.zeros((480, 640, 3), np.uint8))
            depth_path = test / f"sync_depth_{i:05d}.png"
            write_png(depth_path, raw)
            samples.append({"rgb_rel": f"scene_{i}/rgb_{i:05d}.jpg", "depth_path": depth_path, "preds": preds})
    return samples


# ----------------------------------------------------------------------------------------------------------------
# the two evaluations
# ----------------------------------------------------------------------------------------------------------------


def run_depthkit(dataset: str, root: Path, pred_dir: Path) -> dict:
    from depthkit.eval.benchmarks import load_benchmark
    from depthkit.eval.runner import FolderPredictor, evaluate

    protocol, items = load_benchmark(dataset, root)
    result = evaluate(items, FolderPredictor(pred_dir, output_space="metric_depth"), protocol, alignment=None)
    if result["alignment"]["name"] != "none" or result["num_skipped"]:
        raise SystemExit(f"{dataset}: unexpected alignment {result['alignment']} or skipped images")
    return result


def run_zoedepth(zoe, dataset: str, depth_path: Path, pred: np.ndarray) -> dict[str, float]:
    """ZoeDepth's evaluation of one image: data_mono.py decoding and do_kb_crop, then compute_metrics."""
    import torch
    from PIL import Image

    from depthkit.eval.metrics import DEPTH_METRICS

    compute_metrics, datasets_config = zoe
    config = types.SimpleNamespace(**datasets_config[dataset])
    gt = np.asarray(Image.open(depth_path), dtype=np.float32) / (1000.0 if dataset == "nyu" else 256.0)
    pred_t = torch.from_numpy(np.array(pred, dtype=np.float32))[None, None]
    if config.do_kb_crop:
        height, width = gt.shape
        top, left = int(height - 352), int((width - 1216) / 2)
        if pred_t.shape[-2:] != gt.shape:  # the model's output for the whole frame, at ground-truth size
            pred_t = torch.nn.functional.interpolate(pred_t, size=gt.shape, mode="bilinear", align_corners=True)
        gt = gt[top : top + 352, left : left + 1216]
        pred_t = pred_t[..., top : top + 352, left : left + 1216].contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compute_metrics(torch.from_numpy(np.ascontiguousarray(gt))[None, None], pred_t, config=config)
    return {name: float(out[ZOE_NAMES.get(name, name)]) for name in DEPTH_METRICS}


def rel(a: float, b: float) -> float:
    return 0.0 if a == b else abs(a - b) / max(abs(b), 1e-300)


def check(zoe, dataset: str, workdir: Path, rng) -> float:
    from depthkit.data.manifest import sample_key
    from depthkit.eval.metrics import DEPTH_METRICS

    root = workdir / dataset
    samples = build(dataset, root, rng)
    worst = 0.0
    for kind in samples[0]["preds"]:
        pred_dir = workdir / f"preds_{dataset}_{kind}"
        pred_dir.mkdir(parents=True)
        for s in samples:
            np.save(pred_dir / f"{sample_key(s['rgb_rel'])}.npy", s["preds"][kind])
        result = run_depthkit(dataset, root, pred_dir)
        rows = [r for r in result["per_image"] if r["status"] == "ok"]
        zoe_rows = [run_zoedepth(zoe, dataset, s["depth_path"], s["preds"][kind]) for s in samples]
        zoe_mean = {k: float(np.mean([z[k] for z in zoe_rows])) for k in DEPTH_METRICS}
        summary = result["summary"]
        protocol = result["protocol"]
        print(
            f"\n{dataset} / {kind} ({len(samples)} images; depthkit crop {protocol['crop']}, "
            f"range {protocol['min_depth']}..{protocol['max_depth']}; scored pixels {[r['num_pixels'] for r in rows]})"
        )
        print(f"  {'metric':<9} {'depthkit':>14} {'ZoeDepth':>14} {'rel diff':>9}")
        for k in DEPTH_METRICS:
            print(f"  {k:<9} {summary[k]:>14.8g} {zoe_mean[k]:>14.8g} {rel(summary[k], zoe_mean[k]):>9.1e}")
        summary_max = max(rel(summary[k], zoe_mean[k]) for k in DEPTH_METRICS)
        image_max = max(rel(r[k], z[k]) for r, z in zip(rows, zoe_rows, strict=True) for k in DEPTH_METRICS)
        print(f"  max rel diff: summary {summary_max:.2e}, per image {image_max:.2e}")
        worst = max(worst, summary_max, image_max)
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, type=Path, help="a clone of LiheYoung/Depth-Anything")
    parser.add_argument("--datasets", default="kitti,nyu", help="comma-separated: kitti,nyu")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="maximum relative difference")
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()
    datasets = args.datasets.split(",")
    unknown = [d for d in datasets if d not in ("kitti", "nyu")]
    if unknown:
        parser.error(f"--datasets: unknown {unknown}; choose from kitti, nyu")
    zoe = load_zoedepth(args.official.resolve())
    rng = np.random.default_rng(args.seed)
    worst = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in datasets:
            worst[dataset] = check(zoe, dataset, Path(tmp), rng)
    print()
    for dataset, value in worst.items():
        print(f"{dataset}: max rel diff {value:.2e}")
    ok = max(worst.values()) <= args.tolerance
    print(f"{'PASS' if ok else 'FAIL'}: worst {max(worst.values()):.2e} (tolerance {args.tolerance:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
