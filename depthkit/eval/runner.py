"""Evaluate a model, or a folder of saved predictions, on one benchmark.

    protocol, items = load_benchmark("nyu", "/data/nyu_depth_v2")
    predictor = FolderPredictor("preds/", output_space="affine_disparity")
    result = evaluate(items, predictor, protocol)      # JSON-ready dict: summary, per-image rows, protocol
    print(format_table(result))                         # depthkit.eval.report

Per image: under a KITTI-benchmark crop, cut image and ground truth to its box (`metrics.input_crop`); predict,
resize to ground-truth size (bilinear), build the scored mask (valid, inside the depth range, inside the crop),
align (`depthkit.eval.alignment`), clamp, score (`depthkit.eval.metrics`): `depthkit.eval.scoring.score_image`, which
training's validation calls too. The benchmark's number is the mean over
images; the per-image table is kept. Images with fewer than `MIN_SCORED_PIXELS` scored pixels are listed as
skipped, not scored (Depth Anything V2 `metric_depth/train.py` skips those below 10).

Legend: `pred_HW` prediction at ground-truth size, `target_HW` depth (m), `mask_HW` scored pixels.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Protocol as TypingProtocol

import numpy as np

from depthkit.data.formats import read_depth_raw
from depthkit.devices import torch_device
from depthkit.eval.alignment import FAR_DEPTH_CAP, resolve_alignment
from depthkit.eval.benchmarks import EvalItem, Protocol
from depthkit.eval.metrics import (
    CROPS,
    DEPTH_METRICS,
    KB_CROPS,
    input_crop,
    kb_box,
    mean_over_images,
    pair_accuracy,
    resize_bilinear,
)
from depthkit.eval.scoring import METRIC_SPACES, MIN_SCORED_PIXELS, score_image
from depthkit.spaces import AFFINE_DISPARITY, DISPARITY, check_space

RESULT_VERSION = 2  # 2: protocol.model_input (KITTI: the model is shown the KB box; version 1 fed the whole frame)


class Predictor(TypingProtocol):
    """Anything that turns a batch of samples into predictions in one output space."""

    output_space: str
    batch_size: int
    description: dict

    def predict(self, items: list[EvalItem], samples: list[dict]) -> list[np.ndarray]:
        """Predictions (any size; resized to ground truth) for decoded `samples` of `items`. Under a KB crop the
        samples are already cut to the box (`metrics.input_crop`); a saved prediction may still be of the whole
        frame (`evaluate` cuts it)."""
        ...


class FolderPredictor:
    """Saved predictions, one file per sample, looked up by sample key or by image name.

    For a sample with key `k` and name `n` (its image path relative to the benchmark root, without suffix), the
    first of `<dir>/k.npy`, `<dir>/k.png`, `<dir>/n.npy`, `<dir>/n_16bit.png`, `<dir>/k_16bit.png` is used; the
    `n` forms are what `depthkit predict --save npy,png16` writes when run on the benchmark root. `.npy` holds a
    float `H×W` map; `.png` a 16-bit map. A PNG written by `depthkit predict` carries its decoding in the
    `depthkit` text chunk (min/max for relative maps, scale for metric ones), which is applied and checked.

    Args:
        directory: The folder.
        output_space: The predictions' space (`depthkit.spaces`); it decides the alignment.
        png_scale: Multiplier from plain 16-bit PNG values to the output space's unit. Required for metric depth
            PNGs without depthkit metadata (0.001 for millimetres, 1/256 for KITTI-style); relative spaces
            default to 1 (the alignment absorbs any scale).
    """

    batch_size = 1

    def __init__(self, directory: str | Path, *, output_space: str, png_scale: float | None = None):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"predictions folder not found: {self.directory}")
        self.output_space = check_space(output_space, what="--output-space")
        if png_scale is not None and not (np.isfinite(png_scale) and png_scale > 0):
            raise ValueError(f"--png-scale must be positive, got {png_scale}")
        self.png_scale = png_scale
        self.description = {
            "kind": "predictions",
            "directory": str(self.directory),
            "output_space": self.output_space,
            "png_scale": png_scale,
        }

    def path_for(self, key: str, name: str | None = None) -> Path:
        candidates = [f"{key}.npy", f"{key}.png"]
        if name:
            candidates += [f"{name}.npy", f"{name}_16bit.png"]
        candidates.append(f"{key}_16bit.png")
        for candidate in candidates:
            path = self.directory / candidate
            if path.is_file():
                return path
        raise FileNotFoundError(
            f"no prediction for sample {key!r}: expected {self.directory / key}.npy or .png"
            + (f" (or {self.directory / name}.npy)" if name else "")
        )

    def load(self, key: str, name: str | None = None) -> np.ndarray:
        path = self.path_for(key, name)
        if path.suffix == ".npy":
            # An .npy carries no space; `depthkit predict --save npy,png16` writes its 16-bit PNG beside it, which does.
            sibling = path.with_name(f"{path.stem}_16bit.png")
            if sibling.is_file():
                self._check_space(path, _png_metadata(sibling))
            values = np.load(path)
            values = values.reshape(values.shape[-2:]) if values.ndim == 3 and 1 in values.shape else values
            if values.ndim != 2:
                raise ValueError(f"{path}: a prediction must be H×W, got shape {values.shape}")
            return values.astype(np.float32)
        raw_HW = read_depth_raw(path, "uint16_png").astype(np.float64)
        info = _png_metadata(path)
        if info is not None:
            self._check_space(path, info)
            if "scale" in info:
                return (raw_HW / float(info["scale"])).astype(np.float32)
            lo, hi = float(info["min"]), float(info["max"])
            return (lo + raw_HW / 65535.0 * (hi - lo)).astype(np.float32)
        if self.png_scale is None and self.output_space not in (AFFINE_DISPARITY, DISPARITY):
            raise ValueError(f"{path}: 16-bit PNG predictions in {self.output_space} need --png-scale (m per unit)")
        scale = 1.0 if self.png_scale is None else self.png_scale
        return (raw_HW * scale).astype(np.float32)

    def predict(self, items: list[EvalItem], samples: list[dict]) -> list[np.ndarray]:
        return [self.load(item.key, item.name) for item in items]

    def _check_space(self, path: Path, info: dict | None) -> None:
        """Refuse a prediction that `depthkit predict` wrote in another space than --output-space says."""
        if info is not None and info.get("output_space") != self.output_space:
            written = info.get("output_space")
            raise ValueError(f"{path}: written as {written}, but --output-space is {self.output_space}")


def _png_metadata(path: Path) -> dict | None:
    """The JSON `depthkit` text chunk of a PNG written by `depthkit predict`, or None."""
    import json

    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get("depthkit")
    if text is None:
        return None
    try:
        info = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its depthkit PNG metadata is not JSON ({err})") from err
    if not isinstance(info, dict) or not ("scale" in info or {"min", "max"} <= set(info)):
        raise ValueError(f"{path}: depthkit PNG metadata {text!r} has neither scale nor min/max")
    return info


class ModelPredictor:
    """Runs a `depthkit.models` model's `infer` on each batch of images (predictions at the image's size)."""

    def __init__(self, model, *, name: str, input_size: int = 518, batch_size: int = 8, checkpoint: str | None = None):
        self.model = model
        self.output_space = check_space(model.meta.output_space, what="model.meta.output_space")
        self.input_size = input_size
        self.batch_size = batch_size
        self.description = {
            "kind": "model",
            "model": name,
            "checkpoint": checkpoint,
            "output_space": self.output_space,
            "input_size": input_size,
        }

    def predict(self, items: list[EvalItem], samples: list[dict]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            predictions = self.model.infer(
                [s["image"] for s in samples], input_size=self.input_size, batch_size=self.batch_size
            )
        out = []
        for sample, prediction in zip(samples, predictions, strict=True):
            if prediction.output_space != self.output_space:
                raise ValueError(
                    f"{sample['__key__']}: model predicted {prediction.output_space}, its metadata says "
                    f"{self.output_space}"
                )
            out.append(np.asarray(prediction.values, dtype=np.float32))
        return out


def load_model(name: str | None, *, checkpoint_path: str | None = None, pretrained: bool = True, device: str = "auto"):
    """Build the model to evaluate. The one place eval touches `depthkit.models`' constructor.

    Args:
        name: Registry name (`create_model`); None with a `depthkit fit` checkpoint, which names its model.
        checkpoint_path: Weights to load instead of the pretrained ones (`depthkit.models.load_model`).
        pretrained: Load the registry's pretrained weights when no checkpoint is given.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    """
    try:
        from depthkit.models import load_model as build
    except ImportError as err:
        raise ValueError(f"depthkit.models cannot build models here ({err}); evaluate saved --predictions") from err
    device = torch_device(device)  # before the model loads: a bad --device fails fast
    return build(name, checkpoint_path, pretrained=pretrained).to(device).eval()


def _thumbnail(array: np.ndarray, max_side: int = 320) -> np.ndarray:
    step = max(1, int(np.ceil(max(array.shape[:2]) / max_side)))
    return np.ascontiguousarray(array[::step, ::step])


def _progress(done: int, total: int, started: float, enabled: bool) -> None:
    if enabled and (done == total or done % max(1, total // 10) == 0):
        print(f"[eval] {done}/{total} images, {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


def _protocol_dict(protocol: Protocol, min_depth: float, max_depth: float, crop: str) -> dict:
    out = asdict(protocol)
    # What the model is shown: the KB crops cut the frame to its box first (`metrics.input_crop`).
    model_input = "kb_box" if crop in KB_CROPS else "full_frame"
    out.update(min_depth=min_depth, max_depth=max_depth, crop=crop, model_input=model_input)
    return out


def evaluate(
    items: list[EvalItem],
    predictor: Predictor,
    protocol: Protocol,
    *,
    alignment: str | None = None,
    metric_space: str = "depth",
    min_depth: float | None = None,
    max_depth: float | None = None,
    crop: str | None = None,
    num_worst: int = 0,
    progress: bool = False,
) -> dict:
    """Score predictions on a benchmark's items; returns the JSON-ready result.

    Args:
        items: From `load_benchmark` (already limited, if wanted).
        predictor: `FolderPredictor`, `ModelPredictor` or any `Predictor`.
        protocol: The benchmark's row of `PROTOCOLS`.
        alignment: "auto"/None for the protocol's choice, or an entry of `alignment.ALIGNMENTS`.
        metric_space: "depth" (MiDaS, Marigold, BTS: metrics on aligned depth) or "disparity" (metrics on
            aligned disparity against 1/gt, which the Depth Anything authors say they used for relative depth:
            LiheYoung/Depth-Anything issue 174).
        min_depth: Override of the protocol's minimum depth.
        max_depth: Override of the protocol's maximum depth.
        crop: Override of the protocol's crop.
        num_worst: Keep this many worst images (by AbsRel) under the `"_worst"` key for a figure.
        progress: Print progress to stderr.
    """
    if metric_space not in METRIC_SPACES:
        raise ValueError(f"metric_space={metric_space!r}; expected one of {', '.join(METRIC_SPACES)}")
    if not items:
        raise ValueError(f"{protocol.name}: no samples to evaluate")
    min_depth = protocol.min_depth if min_depth is None else float(min_depth)
    max_depth = protocol.max_depth if max_depth is None else float(max_depth)
    crop = protocol.crop if crop is None else crop
    if crop not in CROPS:
        raise ValueError(f"crop={crop!r}; expected one of {', '.join(CROPS)}")
    if min_depth <= 0:  # depth is clamped to it, and log metrics take its logarithm
        raise ValueError(f"--min-depth must be > 0 (metres), got {min_depth}")
    if not min_depth < max_depth:
        raise ValueError(f"depth range {min_depth}..{max_depth} is empty (--min-depth / --max-depth)")
    overrides = {
        k: v
        for k, v, default in (
            ("min_depth", min_depth, protocol.min_depth),
            ("max_depth", max_depth, protocol.max_depth),
            ("crop", crop, protocol.crop),
        )
        if v != default
    }
    space = predictor.output_space
    result = {
        "version": RESULT_VERSION,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": protocol.name,
        "protocol": _protocol_dict(protocol, min_depth, max_depth, crop),
        "overrides": overrides,
        "predictions": predictor.description,
        "num_images": len(items),
    }
    started = time.monotonic()
    if protocol.kind == "pairs":
        if alignment not in (None, "auto", "none"):
            raise ValueError(f"{protocol.name} scores point-pair order; alignment {alignment!r} does not apply")
        result["alignment"] = {"name": "none", "reason": "pair order is invariant to any monotonic alignment"}
        result["metric_space"] = "order"
        rows = _evaluate_pairs(items, predictor, started, progress)
        num_correct = sum(r["num_correct"] for r in rows)
        num_pairs = sum(r["num_pairs"] for r in rows)
        result["summary"] = {
            "pair_accuracy": num_correct / num_pairs if num_pairs else float("nan"),
            "num_pairs": num_pairs,
            "mean_image_accuracy": mean_over_images(rows, ("accuracy",))["accuracy"],
        }
        result["groups"] = _group_summaries(rows, ("accuracy",), pooled=True)
        result["num_scored"], result["num_skipped"] = len(rows), 0
        result["per_image"] = rows
        result["elapsed_s"] = round(time.monotonic() - started, 3)
        return result

    name, reason = resolve_alignment(alignment, output_space=space, default_relative=protocol.relative_alignment)
    cap = max_depth if np.isfinite(max_depth) else FAR_DEPTH_CAP
    result["alignment"] = {"name": name, "reason": reason, "depth_cap": cap}
    result["metric_space"] = metric_space
    rows, worst, stretched = [], [], None
    for start in range(0, len(items), max(1, predictor.batch_size)):
        batch = items[start : start + max(1, predictor.batch_size)]
        samples = [input_crop(item.load(), crop) for item in batch]
        for item, sample, pred in zip(batch, samples, predictor.predict(batch, samples), strict=True):
            target_HW = sample["target"]
            full_hw = sample.get("uncropped_hw")
            gap = _log_aspect_gap(pred.shape, full_hw) if full_hw is not None else np.inf
            if gap < _log_aspect_gap(pred.shape, target_HW.shape):
                # A saved prediction of the whole frame (at any resolution): at the frame's size, then its KB box.
                pred = (pred if pred.shape == full_hw else resize_bilinear(pred, full_hw))[kb_box(full_hw)]
            if not stretched and _aspect_differs(pred.shape, target_HW.shape):
                stretched = item.key
            pred_HW = resize_bilinear(pred, target_HW.shape)
            score = score_image(
                pred_HW,
                target_HW,
                sample["valid"],
                alignment=name,
                output_space=space,
                min_depth=min_depth,
                max_depth=max_depth,
                crop=crop,
                metric_space=metric_space,
            )
            row = {"key": item.key, "group": item.group, "num_pixels": score.num_pixels}
            if score.metrics is None:
                row["status"] = f"skipped: {row['num_pixels']} scored pixels (< {MIN_SCORED_PIXELS})"
                rows.append(row)
                continue
            scores, fit = score.metrics, score.fit
            row.update(status="ok", scale=fit.scale, shift=fit.shift, degenerate=fit.degenerate, **scores)
            rows.append(row)
            if num_worst > 0 and (len(worst) < num_worst or scores["abs_rel"] > worst[-1]["abs_rel"]):
                worst.append(_worst_entry(scores["abs_rel"], item.key, sample, score.depth_HW, score.mask_HW))
                worst.sort(key=lambda w: -w["abs_rel"])
                del worst[num_worst:]
        _progress(min(start + len(batch), len(items)), len(items), started, progress)
    if stretched is not None:
        print(
            f"warning: predictions are stretched to their ground truth's aspect ratio (first: {stretched}); a "
            "transposed or cropped prediction?",
            file=sys.stderr,
        )
    scored = [r for r in rows if r["status"] == "ok"]
    result["num_scored"] = len(scored)
    result["num_skipped"] = len(rows) - len(scored)
    result["summary"] = mean_over_images(scored)
    result["groups"] = _group_summaries(scored, DEPTH_METRICS)
    result["per_image"] = rows
    result["elapsed_s"] = round(time.monotonic() - started, 3)
    if num_worst > 0:
        result["_worst"] = worst  # thumbnails for report.worst_figure_png; not written to JSON
    return result


def _log_aspect_gap(shape_a: tuple[int, int], shape_b: tuple[int, int]) -> float:
    """|log| of the ratio of two H x W shapes' aspect ratios (0 for the same aspect)."""
    return abs(float(np.log((shape_a[1] / shape_a[0]) / (shape_b[1] / shape_b[0]))))


def _aspect_differs(shape_a: tuple[int, int], shape_b: tuple[int, int], tolerance: float = 0.02) -> bool:
    """Whether two H x W shapes' aspect ratios differ by more than `tolerance` (relative): a resize between them
    stretches the picture. A low-resolution prediction of the same frame differs by rounding only."""
    return _log_aspect_gap(shape_a, shape_b) > np.log1p(tolerance)


def _worst_entry(abs_rel: float, key: str, sample: dict, depth_HW: np.ndarray, mask_HW: np.ndarray) -> dict:
    """Thumbnails of one image for the worst-images figure (kept small: ETH3D frames are 24 M pixels)."""
    target_hw = _thumbnail(np.where(mask_HW, sample["target"], np.nan))
    pred_hw = _thumbnail(depth_HW)
    return {
        "key": key,
        "abs_rel": abs_rel,
        "image": _thumbnail(sample["image"]),
        "target": target_hw,
        "pred": pred_hw,
        "error": np.abs(pred_hw - target_hw) / target_hw,
    }


def _evaluate_pairs(items: list[EvalItem], predictor: Predictor, started: float, progress: bool) -> list[dict]:
    larger_is_closer = predictor.output_space in (AFFINE_DISPARITY, DISPARITY)
    rows = []
    for start in range(0, len(items), max(1, predictor.batch_size)):
        batch = items[start : start + max(1, predictor.batch_size)]
        samples = [item.load() for item in batch]
        for item, sample, pred in zip(batch, samples, predictor.predict(batch, samples), strict=True):
            pred_HW = resize_bilinear(pred, sample["image"].shape[:2])
            num_correct, num_pairs = pair_accuracy(pred_HW, sample["pairs"], larger_is_closer=larger_is_closer)
            accuracy = num_correct / num_pairs if num_pairs else None
            rows.append(
                {
                    "key": item.key,
                    "group": item.group,
                    "num_pairs": num_pairs,
                    "num_correct": num_correct,
                    "accuracy": accuracy,
                    "status": "ok",
                }
            )
        _progress(min(start + len(batch), len(items)), len(items), started, progress)
    return rows


def _group_summaries(rows: list[dict], keys: tuple[str, ...], *, pooled: bool = False) -> dict:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("group"):
            groups.setdefault(row["group"], []).append(row)
    if len(groups) < 2 and not pooled:
        return {}
    out = {}
    for group, members in sorted(groups.items()):
        summary = {"num_images": len(members), **mean_over_images(members, keys)}
        if pooled:
            num_pairs = sum(r["num_pairs"] for r in members)
            summary["pair_accuracy"] = sum(r["num_correct"] for r in members) / num_pairs if num_pairs else None
        out[group] = summary
    return out
