"""Verification of an ONNX export against PyTorch: ONNX Runtime vs the eager model, on random and real inputs.

Each case feeds the same normalized input to the exported graph (ONNX Runtime, CPU) and to the float32 eager
model wrapped as the graph is (`exporter.PaddedDepthModel`: pad to multiples of the patch size, crop), and
measures

    max_abs = max |onnx - torch|,   max_rel = max_abs / max |torch|

over the whole case (a batch). Relative to the largest output rather than per pixel, because outputs near zero
(far pixels of a disparity map) make per-pixel ratios meaningless; and rather than to the output's range, because
float16 rounding is proportional to the magnitude: a (random-weight) map with a large offset and a small range
fails any range-relative fp16 tolerance while being as exact as float16 allows. Trained depth and disparity maps
span from near zero to their maximum, where the two measures agree. A case fails when `max_rel` exceeds the
tolerance of the graph's precision (`TOLERANCES`); an fp16 graph is compared with the float32 model, so its
tolerance covers float16 rounding through every block.

Inputs, at every size (`default_verify_sizes`: the export size, a landscape and a portrait size, and one size that
is not a multiple of the patch size, so the padding runs too; only the dynamic axes vary):
- random: standard normal in the normalized space, a batch of 2 when the batch axis is dynamic;
- real: photos (default `grace_hopper.jpg`, which ships with matplotlib), resized to the size (bicubic, aspect not
  kept) and normalized with the model's mean / std, batch 1.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from depthkit.export.metadata import GraphMeta

TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2}  # max |onnx - torch| / max |torch|; see docs/export.md


class VerificationError(ValueError):
    """The exported graph does not match the PyTorch model within tolerance."""


@dataclass(frozen=True)
class VerifyCase:
    """One input fed to both."""

    source: str
    """"random" or "image <name>"."""
    shape: tuple[int, int, int, int]
    """The input's B x 3 x H x W."""
    max_abs: float
    """max |onnx - torch|."""
    max_rel: float
    """max_abs / scale."""
    scale: float
    """max |torch|."""


@dataclass(frozen=True)
class VerifyReport:
    """All cases of one verification, and the tolerance they were held to."""

    cases: tuple[VerifyCase, ...]
    precision: str
    tolerance: float

    @property
    def max_rel(self) -> float:
        return max(c.max_rel for c in self.cases)

    @property
    def passed(self) -> bool:
        return all(c.max_rel <= self.tolerance for c in self.cases)

    def format(self) -> str:
        """A table of the cases, and the verdict."""
        lines = [f"{'input':<28} {'B x C x H x W':>17} {'max |torch|':>12} {'max abs err':>12} {'max rel err':>12}"]
        for c in self.cases:
            flag = "" if c.max_rel <= self.tolerance else "  FAIL"
            shape = " x ".join(str(v) for v in c.shape)
            lines.append(f"{c.source[:28]:<28} {shape:>17} {c.scale:12.4g} {c.max_abs:12.3e} {c.max_rel:12.3e}{flag}")
        num_zero = sum(c.scale == 0 for c in self.cases)
        if num_zero:
            lines.append(f"warning: PyTorch's output is all zero in {num_zero} case(s): they check nothing")
        verdict = "passed" if self.passed else "FAILED"
        lines.append(
            f"verification {verdict}: {len(self.cases)} cases, max relative error {self.max_rel:.3e} "
            f"(tolerance {self.tolerance:.0e}, {self.precision})"
        )
        return "\n".join(lines)


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def default_verify_sizes(size_hw: tuple[int, int], patch: int, dynamic: Sequence[str]) -> list[tuple[int, int]]:
    """Sizes to verify at: the export size, landscape, portrait and a non-multiple of the patch size.

    Only the dynamic axes vary; a static graph is verified at its size only.
    """
    height, width = size_hw
    candidates = [
        (height, width),
        (_round_to(0.75 * height, patch), _round_to(1.25 * width, patch)),  # landscape
        (_round_to(1.25 * height, patch), _round_to(0.6 * width, patch)),  # portrait
        (_round_to(0.75 * height, patch) + patch // 2 - 2, width + 3),  # not multiples: padded in the graph
    ]
    sizes: list[tuple[int, int]] = []
    for h, w in candidates:
        size = (h if "height" in dynamic else height, w if "width" in dynamic else width)
        if size not in sizes:
            sizes.append(size)
    return sizes


def default_images() -> list[tuple[str, np.ndarray]]:
    """A real photo that ships with matplotlib (Grace Hopper, 512 x 600), as (name, uint8 H x W x 3)."""
    import matplotlib.cbook

    from depthkit.models.predict import read_image

    path = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    return [(path.name, read_image(path))]


def named_images(images: Sequence | None) -> list[tuple[str, np.ndarray]]:
    """(name, RGB array) of each image: a file path (read, a bad file named), an array, or a (name, array) pair."""
    if images is None:
        return default_images()
    from depthkit.models.predict import read_image

    named = []
    for i, image in enumerate(images):
        if isinstance(image, tuple):
            named.append(image)
        elif isinstance(image, str | os.PathLike):
            try:
                named.append((Path(image).name, read_image(Path(image))))
            except Exception as err:  # noqa: BLE001 - PIL raises many types; say which image
                raise ValueError(f"verification image {image}: {type(err).__name__}: {err}") from None
        else:
            named.append((f"#{i}", np.asarray(image)))
    return named


def check_meta(meta: GraphMeta, model) -> None:
    """A `VerificationError` unless the graph's metadata is the model's."""
    expected = (model.meta.name, model.meta.output_space, model.meta.patch_size, model.meta.max_depth)
    found = (meta.name, meta.output_space, meta.patch_size, meta.max_depth)
    close = np.allclose(meta.mean, model.meta.mean, rtol=0, atol=1e-7) and np.allclose(
        meta.std, model.meta.std, rtol=0, atol=1e-7
    )
    if expected != found or not close:
        raise VerificationError(
            f"graph metadata {found} mean={meta.mean} std={meta.std} is not the model's {expected} "
            f"mean={model.meta.mean} std={model.meta.std}"
        )


@torch.no_grad()
def verify_onnx(
    model,
    onnx_path: str | os.PathLike,
    *,
    sizes: Sequence[tuple[int, int]],
    images: Sequence | None = None,
    precision: str = "fp32",
    batch: int | None = None,
    seed: int = 0,
    tolerance: float | None = None,
) -> VerifyReport:
    """Run the graph in ONNX Runtime (CPU) and the model in PyTorch on the same inputs; compare.

    Args:
        model: The `DepthModel` that was exported (a float32 CPU copy is used as the reference).
        onnx_path: The graph.
        sizes: (H, W) input sizes; need not be multiples of the patch size.
        images: Real images (uint8 `H x W x 3` arrays, file paths or `named_images` pairs); default
            `default_images()`.
        precision: The graph's precision, "fp32" or "fp16": picks the tolerance.
        batch: Batch size of the random inputs; default the graph's static batch, or 2 for a dynamic one.
        seed: Seed of the random inputs.
        tolerance: Override `TOLERANCES[precision]`.

    Returns:
        A `VerifyReport` (check `.passed`); a `VerificationError` if the metadata does not match the model.
    """
    from depthkit.export.exporter import PaddedDepthModel
    from depthkit.export.runtime import OnnxDepthModel
    from depthkit.models.preprocess import resize_image, to_float_chw

    if precision not in TOLERANCES:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(TOLERANCES)}")
    session = OnnxDepthModel(onnx_path)
    check_meta(session.meta, model)
    if batch is None:
        batch = session.input_shape[0] if isinstance(session.input_shape[0], int) else 2
    param = next(model.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu" or model.training:
        model = copy.deepcopy(model).float().cpu().eval()  # the caller's model is left as it is
    reference = PaddedDepthModel(model)
    generator = torch.Generator().manual_seed(seed)
    inputs: list[tuple[str, torch.Tensor]] = []
    named = named_images(images)
    for index, (height, width) in enumerate(sizes):
        inputs.append(("random", torch.randn(batch, 3, height, width, generator=generator)))
        name, image = named[index % len(named)]
        image_13HW = resize_image(to_float_chw(image), (height, width))[None]
        inputs.append((f"image {name}", reference.model.normalize(image_13HW)))
    cases = []
    for source, image_BCHW in inputs:
        expected_BHW = reference(image_BCHW).numpy()
        got_BHW = session(image_BCHW.numpy())
        if got_BHW.shape != expected_BHW.shape:
            raise VerificationError(
                f"{source} input {tuple(image_BCHW.shape)}: ONNX output {got_BHW.shape}, PyTorch {expected_BHW.shape}"
            )
        max_abs = float(np.max(np.abs(got_BHW.astype(np.float64) - expected_BHW)))
        scale = float(np.max(np.abs(expected_BHW)))
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        cases.append(VerifyCase(source, tuple(image_BCHW.shape), max_abs, max_rel, scale))
    return VerifyReport(tuple(cases), precision, TOLERANCES[precision] if tolerance is None else tolerance)
