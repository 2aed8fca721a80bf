"""Reports of an evaluation result: the printed table, JSON + CSV files, worst-images figure, W&B table.

Files are written atomically (a temporary name in the same folder, then a rename), so an interrupted run never
leaves a half-written result that looks complete. For `--out results.json`:

- `results.json`: everything (protocol, alignment and why, summary, groups, per-image rows).
- `results_summary.csv`: one row for the benchmark and one per group.
- `results_per_image.csv`: the per-image table.
- `results_worst.png`: the worst images, when asked for.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np

from depthkit._files import write_bytes_atomic
from depthkit.eval.metrics import DEPTH_METRICS


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Path):
        return str(value)
    return value


def _csv_bytes(rows: list[dict]) -> bytes:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _jsonable(row.get(k)) for k in columns})
    return buffer.getvalue().encode()


def summary_rows(result: dict) -> list[dict]:
    """The summary CSV's rows: the whole benchmark, then each group."""
    common = {
        "dataset": result["dataset"],
        "alignment": result["alignment"]["name"],
        "metric_space": result["metric_space"],
    }
    rows = [{**common, "group": "all", "num_images": result["num_scored"], **result["summary"]}]
    for group, summary in result.get("groups", {}).items():
        rows.append({**common, "group": group, **summary})
    return rows


def output_paths(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".json" else out
    return {
        "json": stem.with_name(stem.name + ".json"),
        "summary_csv": stem.with_name(stem.name + "_summary.csv"),
        "per_image_csv": stem.with_name(stem.name + "_per_image.csv"),
        "worst_png": stem.with_name(stem.name + "_worst.png"),
    }


def write_results(result: dict, out: str | Path) -> list[Path]:
    """Write the JSON, summary CSV, per-image CSV (and the figure when the result kept worst images)."""
    paths = output_paths(out)
    write_bytes_atomic(paths["json"], (json.dumps(_jsonable(result), indent=2) + "\n").encode())
    write_bytes_atomic(paths["summary_csv"], _csv_bytes(summary_rows(result)))
    write_bytes_atomic(paths["per_image_csv"], _csv_bytes(result["per_image"]))
    written = [paths["json"], paths["summary_csv"], paths["per_image_csv"]]
    if result.get("_worst"):
        write_bytes_atomic(paths["worst_png"], worst_figure_png(result["_worst"]))
        written.append(paths["worst_png"])
    else:  # an earlier run's figure beside these results would show another run's images
        paths["worst_png"].unlink(missing_ok=True)
    return written


def _range(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:g}"


def format_table(result: dict) -> str:
    """A plain-text report: what was scored and how, then the metrics (mean over images)."""
    protocol, alignment = result["protocol"], result["alignment"]
    lines = [
        f"dataset      {result['dataset']}  ({protocol['source']})",
        f"predictions  {result['predictions'].get('model') or result['predictions'].get('directory')} "
        f"[{result['predictions']['output_space']}]",
        f"alignment    {alignment['name']}: {alignment['reason']}",
    ]
    if protocol["kind"] == "depth":
        lines.append(
            f"protocol     depth {_range(protocol['min_depth'])}..{_range(protocol['max_depth'])} m, "
            f"crop {protocol['crop']}, predictions clamped at {alignment['depth_cap']:g} m, "
            f"metrics in {result['metric_space']} space"
        )
    if result.get("overrides"):
        lines.append(
            "overrides    "
            + ", ".join(f"{k}={_range(v) if isinstance(v, float) else v}" for k, v in result["overrides"].items())
        )
    expected = protocol.get("num_expected")
    count = f"images       {result['num_scored']} scored, {result['num_skipped']} skipped"
    limit = result.get("limit")
    if expected and result["num_images"] != expected:
        count += f"  (the standard split has {expected}: not comparable to published numbers)"
    elif expected and result["num_skipped"]:
        count += f"  (published means are over all {expected}: not comparable to published numbers)"
    elif limit is not None and result["num_images"] >= limit:  # a set without a known size, cut by --limit
        count += f"  (--limit {limit}: part of the set, not comparable to published numbers)"
    lines.append(count)
    summary = result["summary"]
    if protocol["kind"] == "pairs":
        lines.append(f"pair accuracy {summary['pair_accuracy']:.4f} over {summary['num_pairs']} pairs")
        for group, s in result.get("groups", {}).items():
            accuracy = "-" if s["pair_accuracy"] is None else f"{s['pair_accuracy']:.4f}"
            lines.append(f"  {group:<24} {accuracy} ({s['num_images']} images)")
        return "\n".join(lines)
    groups = result.get("groups", {})
    width = max([24, *map(len, groups)])
    header = "group".ljust(width) + " " + " ".join(f"{m:>9}" for m in DEPTH_METRICS) + "  images"
    lines += ["", header, _metric_line("all", summary, result["num_scored"], width)]
    for group, s in groups.items():
        lines.append(_metric_line(group, s, s["num_images"], width))
    return "\n".join(lines)


def _metric_line(name: str, values: dict, num_images: int, width: int) -> str:
    cells = " ".join(f"{values[m]:9.4f}" if values.get(m) is not None else f"{'-':>9}" for m in DEPTH_METRICS)
    return f"{name:<{width}} {cells}  {num_images}"


def worst_figure_png(worst: list[dict]) -> bytes:
    """The worst images as a PNG: input, ground truth, aligned prediction, AbsRel error (Agg, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height, width = worst[0]["image"].shape[:2]
    fig = Figure(figsize=(12, len(worst) * (3.0 * height / width + 0.4)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(worst), 4, squeeze=False)
    for row, entry in zip(axes, worst, strict=True):
        target = entry["target"]
        finite = target[np.isfinite(target)]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (None, None)
        panels = (
            (entry["image"], {}, f"{entry['key'][:40]}"),
            (target, {"cmap": "magma_r", "vmin": vmin, "vmax": vmax}, "ground truth (m)"),
            (entry["pred"], {"cmap": "magma_r", "vmin": vmin, "vmax": vmax}, "aligned prediction (m)"),
            (entry["error"], {"cmap": "inferno", "vmin": 0.0, "vmax": 0.5}, f"AbsRel {entry['abs_rel']:.3f}"),
        )
        for ax, (data, kwargs, title) in zip(row, panels, strict=True):
            ax.imshow(data, **kwargs)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def log_wandb(result: dict, *, project: str = "depthkit", mode: str = "offline", folder=None) -> None:
    """Log the summary and the per-image table to Weights & Biases (offline unless `mode` says otherwise), with the
    run's files under `folder` (the results folder; else the working directory)."""
    try:
        import wandb
    except ImportError as err:
        raise ValueError("--wandb needs the wandb package") from err
    config = {
        "dataset": result["dataset"],
        "alignment": result["alignment"]["name"],
        "metric_space": result["metric_space"],
        "predictions": _jsonable(result["predictions"]),
        "protocol": _jsonable(result["protocol"]),
    }
    run = wandb.init(project=project, mode=mode, job_type="eval", config=config, dir=folder)
    try:
        rows = [_jsonable(r) for r in result["per_image"]]
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        summary = {f"eval/{k}": v for k, v in _jsonable(result["summary"]).items()}
        # A W&B key names an artifact: a manifest's path ("../data/m.csv") is no valid name, its stem is.
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(result["dataset"])).stem).strip("_.") or "dataset"
        run.log({f"eval/{name}_per_image": table, **summary})
    finally:
        run.finish()
