"""ONNX export of a `DepthModel`: dynamic batch, height and width, metadata, checker, atomic write, verification.

    from depthkit.export import export_onnx
    result = export_onnx(model, "dav2_vits.onnx")      # verifies against PyTorch before the file appears

Exporter: torch's TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`). The dynamo exporter needs
`onnxscript`, which depthkit does not depend on; the TorchScript one is still shipped by torch 2.14 and handles
every op here. Default opset 17 (`LayerNormalization` is a single op from 17; TensorRT >= 8.6, ONNX Runtime and
most mobile converters take it); 14-20 work.

What the graph computes (`PaddedDepthModel`): the normalized `B x 3 x H x W` input is zero-padded at the bottom
and right to the next multiple of the patch size (a no-op for multiples; zero is the mean colour after
normalization), run through the model, and the `B x H x W` output cropped back to H x W. So any H, W >= 1 run, the
output always has the input's size, and multiples of the patch size give exactly `model(image)`. Other sizes are
not what `DepthModel.infer` would predict (it resizes); `depthkit.export.runtime.OnnxDepthModel.infer` resizes the
same way, so it never pads. With `--fp16` the weights and compute are float16 and the graph casts its float32 input
and output, so callers feed float32 either way.

Why the graph stays dynamic: every size-dependent step is computed from the input's shape in the graph. The DPT
head's resizes take `size=` from tensor shapes (traced as `Shape` -> `Resize`). DINOv2's position-embedding resize
is the exception: `F.interpolate(..., scale_factor=((h + 0.1) / s, ...), mode="bicubic")` gets a traced scale that
the exporter cannot take, and tracing would freeze the size branch. During export only, `traceable_pos_embed`
replaces it with the same bicubic resize written as two interpolation matrices built from `h` and `w` in the graph
(`W_h @ grid @ W_w^T`; a test checks it against `DinoV2Encoder.interpolate_pos_embed` at many grids, the native grid
included), then the model is restored.

Shape legend: B batch, C channels, H/W image size, h/w patch grid, s the position-embedding grid side, D width.
"""

from __future__ import annotations

import contextlib
import math
import os
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from depthkit.export.metadata import AXES, INPUT_NAME, GraphMeta, to_props

if TYPE_CHECKING:  # pragma: no cover
    from depthkit.export.verification import VerifyReport

DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 14, 20  # 14: scaled_dot_product_attention; 20: the TorchScript exporter's newest
MAX_GRAPH_BYTES = 2**31 - 1  # protobuf's limit; bigger graphs need ONNX external data, which is not written yet


# --------------------------------------------------------------------------------------------- the graph


class PaddedDepthModel(nn.Module):
    """The function an export computes: pad to multiples of the patch size, predict, crop (see the module docstring).

    Args:
        model: The `DepthModel` (its parameters already in `dtype`).
        dtype: The model's compute dtype; input and output stay float32.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.patch_size = model.meta.patch_size

    def forward(self, image_BCHW: torch.Tensor) -> torch.Tensor:
        height, width = image_BCHW.shape[-2], image_BCHW.shape[-1]
        pad_h = (self.patch_size - height % self.patch_size) % self.patch_size
        pad_w = (self.patch_size - width % self.patch_size) % self.patch_size
        padded_BCHW = F.pad(image_BCHW, (0, pad_w, 0, pad_h))  # zeros = the mean colour
        pred_BHW = self.model(padded_BCHW.to(self.dtype))
        return pred_BHW[:, :height, :width].float()


def _cubic_kernel(x: torch.Tensor, a: float) -> torch.Tensor:
    """Keys' cubic convolution kernel at distances `x` >= 0 (zero from 2 on)."""
    near = ((a + 2) * x - (a + 3)) * x * x + 1  # x <= 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < x < 2
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros(())))


def _cubic_weights(t: torch.Tensor, a: float = -0.75) -> list[torch.Tensor]:
    """Bicubic weights of the taps at floor - 1, floor, floor + 1, floor + 2 for fractional offsets `t`."""
    return [_cubic_kernel(d, a) for d in (t + 1, t, 1 - t, 2 - t)]


def _bicubic_matrix(out_len, in_len: int, scale: torch.Tensor) -> torch.Tensor:
    """`out_len x in_len` matrix of torch's bicubic (align_corners=False, clamped borders) at a given scale.

    `out_len` may be a traced size; the matrix is built from it in the graph.
    """
    dst = torch.arange(out_len, dtype=torch.float32)
    src = (dst + 0.5) / scale - 0.5
    first = torch.floor(src)
    cols_1s = torch.arange(in_len, dtype=torch.float32)[None]
    matrix_ns = torch.zeros(())
    for k, weight in enumerate(_cubic_weights(src - first)):
        index = torch.clamp(first + (k - 1), 0, in_len - 1)
        matrix_ns = matrix_ns + weight[:, None] * (index[:, None] == cols_1s).to(torch.float32)
    return matrix_ns


def _bicubic_aa_matrix(out_len, in_len: int, scale: torch.Tensor) -> torch.Tensor:
    """`out_len x in_len` matrix of torch's antialiased bicubic (`antialias=True`: PIL's filter, a = -0.5, widened by
    the downscale factor, rows normalized; taps outside the input dropped, not clamped) at a given scale."""
    dst = torch.arange(out_len, dtype=torch.float32)
    stretch = torch.clamp(1 / scale, min=1.0)  # the filter's width in input pixels, over its width at scale 1
    offset_ns = (torch.arange(in_len, dtype=torch.float32)[None] + 0.5 - (dst[:, None] + 0.5) / scale) / stretch
    weight_ns = _cubic_kernel(offset_ns.abs(), a=-0.5)
    return weight_ns / weight_ns.sum(dim=1, keepdim=True)


def traceable_pos_embed(encoder: nn.Module, grid_h, grid_w) -> torch.Tensor:
    """`DinoV2Encoder.interpolate_pos_embed` without Python branches on sizes or a traced `scale_factor`.

    Same result (to float rounding): the native grid (h = w = s) returns the stored embedding, any other grid the
    DINOv2 bicubic resize with `scale_factor = (h + offset) / s` (output size h, source positions from that
    scale). Both cases are one expression: the resize matrices blend to the identity on the native grid.

    Returns:
        `1 x (1 + h*w) x D`.
    """
    pos_embed_1TD = encoder.pos_embed
    side = int(math.sqrt(pos_embed_1TD.shape[1] - 1))
    dtype = pos_embed_1TD.dtype
    pos_embed_1TD = pos_embed_1TD.float()
    grid_ssD = pos_embed_1TD[0, 1:].reshape(side, side, -1)  # s x s x D
    grid_h_f = torch.as_tensor(grid_h).to(torch.float32)
    grid_w_f = torch.as_tensor(grid_w).to(torch.float32)
    offset = encoder.config.interpolate_offset
    scale_h = (grid_h_f + offset) / side if offset else grid_h_f / side
    scale_w = (grid_w_f + offset) / side if offset else grid_w_f / side
    native = ((grid_h_f == side) & (grid_w_f == side)).to(torch.float32)
    cols_1s = torch.arange(side, dtype=torch.float32)[None]
    eye_hs = (torch.arange(grid_h, dtype=torch.float32)[:, None] == cols_1s).to(torch.float32)
    eye_ws = (torch.arange(grid_w, dtype=torch.float32)[:, None] == cols_1s).to(torch.float32)
    bicubic = _bicubic_aa_matrix if encoder.config.interpolate_antialias else _bicubic_matrix
    resize_hs = native * eye_hs + (1 - native) * bicubic(grid_h, side, scale_h)  # h x s
    resize_ws = native * eye_ws + (1 - native) * bicubic(grid_w, side, scale_w)  # w x s
    grid_hwD = torch.einsum("hs,stD,wt->hwD", resize_hs, grid_ssD, resize_ws)
    grid_1ND = grid_hwD.reshape(1, -1, grid_ssD.shape[-1])  # 1 x N x D, row-major
    return torch.cat([pos_embed_1TD[:, :1], grid_1ND], dim=1).to(dtype)


@contextlib.contextmanager
def traceable(model: nn.Module):
    """Within the block, the model's encoder resizes its position embedding with `traceable_pos_embed`."""
    encoder = model.encoder
    encoder.interpolate_pos_embed = types.MethodType(traceable_pos_embed, encoder)
    try:
        yield model
    finally:
        del encoder.interpolate_pos_embed  # back to the class's method


# --------------------------------------------------------------------------------------------- export


def parse_dynamic(text: str | Sequence[str]) -> tuple[str, ...]:
    """ "batch,height,width" (any subset; "none" or "" for a static graph) -> axes in canonical order."""
    if isinstance(text, str):
        items = [] if text.strip().lower() in ("", "none") else [t.strip() for t in text.split(",") if t.strip()]
    else:
        items = list(text)
    bad = [t for t in items if t not in AXES]
    if bad:
        raise ValueError(f"--dynamic {text!r}: expected a comma-separated subset of {','.join(AXES)} (or none)")
    return tuple(a for a in AXES if a in items)


def parse_size(text: str) -> tuple[int, int]:
    """ "HxW" (or one number for a square) -> (H, W), both >= 1."""
    try:
        parts = [int(p) for p in text.lower().replace("*", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise ValueError(f"size {text!r}: expected HxW (e.g. 518x518) with positive integers")
    return parts[0], parts[1]


def graph_meta(model: nn.Module, *, precision: str, dynamic: Sequence[str], size_hw: tuple[int, int]) -> GraphMeta:
    """The metadata an export of `model` records."""
    import depthkit

    return GraphMeta.from_model_meta(
        model.meta,
        precision=precision,
        dynamic_axes=tuple(dynamic),
        input_size_hw=tuple(size_hw),
        depthkit_version=depthkit.__version__,
    )


def check_onnx_out(path: str | os.PathLike) -> Path:
    """The `--out` of an ONNX export, checked before any work: a `.onnx` file name that is not a folder."""
    path = Path(path).expanduser()
    if path.suffix != ".onnx":
        raise ValueError(f"--out {path}: the file name must end in .onnx")
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; give the .onnx file to write")
    return path


def load_model(
    *, checkpoint: str | os.PathLike | None = None, model: str | None = None, weights: str | os.PathLike | None = None
) -> nn.Module:
    """The model to export, in eval mode on the CPU (`depthkit.models.load_model`).

    Args:
        checkpoint: Weights to load: a training checkpoint (`.ckpt` from `depthkit fit`, which names its model and
            the overrides it was trained with; read with `weights_only=True`, so no code in the file runs) or any
            file `create_model(checkpoint_path=...)` reads, then with `model`.
        model: A registered model name; optional with a training checkpoint (it must then match).
        weights: Another name for `checkpoint` (the `--model NAME --weights PATH` spelling).

    Raises:
        ValueError: No model at all, both `checkpoint` and `weights`, a checkpoint that does not name its model
            without `model`, or weights that do not load.
        FileNotFoundError: A path that does not exist, or no local official weights.
    """
    from depthkit.models import load_model as build

    if checkpoint is not None and weights is not None:
        raise ValueError("--checkpoint and --weights both give the weights: pass one")
    path, flag = (checkpoint, "--checkpoint") if checkpoint is not None else (weights, "--weights")
    if path is None:
        if model is None:
            raise ValueError(
                "give the model as --checkpoint PATH (a `depthkit fit` checkpoint names its model) or --model NAME "
                "[--checkpoint PATH]"
            )
        try:
            return build(model)  # the official weights from the local folder
        except FileNotFoundError as err:  # the registry's hint names the Python API; name this command's flag
            raise FileNotFoundError(f"{err}; here: --model {model} --checkpoint PATH") from None
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{flag} not found: {path}")
    return build(model, path)  # an unreadable file is a ValueError naming it (`read_checkpoint`)


@dataclass(frozen=True)
class ExportResult:
    """What `export_onnx` wrote and how it checked it."""

    path: Path
    """The `.onnx` file."""
    meta: GraphMeta
    """Its metadata."""
    verification: VerifyReport | None
    """How it compared with PyTorch; None with `verify=False`."""


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic: str | Sequence[str] = AXES,
    size_hw: tuple[int, int] | None = None,
    fp16: bool = False,
    verify: bool = True,
    verify_sizes: Sequence[tuple[int, int]] | None = None,
    verify_images: Sequence | None = None,
    log: Callable[[str], None] | None = print,
) -> ExportResult:
    """Export a `DepthModel` to ONNX, check it, optionally verify it against PyTorch, and write it atomically.

    The graph is written under a temporary name, checked with `onnx.checker` (full check), verified, and only then
    renamed to `path`; a failed verification leaves it as `<path stem>.failed.onnx` for inspection and raises.

    Args:
        model: The `DepthModel` (any device / dtype; a float32 CPU copy is exported, the model is not changed).
        path: The `.onnx` file to write.
        opset: ONNX opset, 14-20.
        dynamic: Axes that may vary at run time: a subset of ("batch", "height", "width"), or "batch,height,width".
        size_hw: The example input size the graph is traced at; the only size of a graph without dynamic height
            and width. Default: the encoder's pre-training size (518 x 518 for the real models).
        fp16: float16 weights and compute (input and output stay float32).
        verify: Compare ONNX Runtime with PyTorch (`verification.verify_onnx`) before the file appears.
        verify_sizes: (H, W) sizes to verify at (default `verification.default_verify_sizes`).
        verify_images: Real images for the verification (uint8 `H x W x 3` arrays, paths or `named_images` pairs),
            read before the export; default a photo that ships with matplotlib.
        log: Where progress and the verification table go (None: silent).

    Returns:
        An `ExportResult`.

    Raises:
        ValueError: Bad options, a graph over 2 GB, a failed ONNX check, or a failed verification
            (`verification.VerificationError`).
    """
    import copy

    import onnx

    from depthkit.export import verification

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset} is not supported; use {MIN_OPSET}-{MAX_OPSET} (default {DEFAULT_OPSET})")
    dynamic = parse_dynamic(dynamic)
    patch = model.meta.patch_size
    if size_hw is None:
        side = model.config.encoder.img_size
        size_hw = (side, side)
    size_hw = (int(size_hw[0]), int(size_hw[1]))
    if size_hw[0] % patch or size_hw[1] % patch:
        raise ValueError(f"export size {size_hw[0]}x{size_hw[1]} is not a multiple of the patch size {patch}")
    for h, w in verify_sizes or ():
        for axis, got, fixed in (("height", h, size_hw[0]), ("width", w, size_hw[1])):
            if axis not in dynamic and got != fixed:
                raise ValueError(
                    f"verify size {h}x{w}: the graph's {axis} is static ({fixed}, the export size "
                    f"{size_hw[0]}x{size_hw[1]}); verify at that {axis}, or make {axis} dynamic"
                )
    images = verification.named_images(verify_images) if verify else None  # read first: a bad one is named now
    precision = "fp16" if fp16 else "fp32"
    dtype = torch.float16 if fp16 else torch.float32
    num_bytes = sum(p.numel() for p in model.parameters()) * (2 if fp16 else 4)
    if num_bytes > MAX_GRAPH_BYTES:
        raise ValueError(
            f"{model.meta.name} has {num_bytes / 2**30:.1f} GiB of {precision} weights; ONNX graphs over 2 GB need "
            "external data files, which depthkit export does not write yet"
        )
    path = check_onnx_out(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    reference = copy.deepcopy(model).float().cpu().eval()  # the caller's model is left as it is
    export_model = copy.deepcopy(reference).to(dtype) if fp16 else reference  # `traceable` restores it
    graph = PaddedDepthModel(export_model, dtype).eval()
    batch = 2 if "batch" in dynamic else 1
    example_BCHW = torch.randn(batch, 3, *size_hw, generator=torch.Generator().manual_seed(0))
    output_name = model.meta.output_space
    axis_names = {0: "batch", 2: "height", 3: "width"}
    dynamic_axes = {
        INPUT_NAME: {i: n for i, n in axis_names.items() if n in dynamic},
        output_name: {(0 if i == 0 else i - 1): n for i, n in axis_names.items() if n in dynamic},  # B x H x W
    }
    meta = graph_meta(model, precision=precision, dynamic=dynamic, size_hw=size_hw)
    tmp = _tmp_path(path)
    if log:
        log(f"exporting {meta.name} ({precision}, opset {opset}, dynamic: {','.join(dynamic) or 'none'}) to {path}")
    try:
        with traceable(export_model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on the size checks: they are not part of the graph
            torch.onnx.export(
                graph,
                (example_BCHW,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[output_name],
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        for key, value in to_props(meta).items():
            proto.metadata_props.add(key=key, value=value)
        proto.doc_string = f"depthkit {meta.depthkit_version} export of {meta.name}; see depthkit/export/metadata.py"
        # The output's declared shape: named dynamic axes, sizes for static ones (the tracer leaves them all symbolic).
        output_dims = proto.graph.output[0].type.tensor_type.shape.dim
        declared = (("batch", batch), ("height", size_hw[0]), ("width", size_hw[1]))
        for dim, (name, static) in zip(output_dims, declared, strict=True):
            if name in dynamic:
                dim.dim_param = name
            else:
                dim.dim_value = static
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as err:
            raise ValueError(f"the exported graph fails the ONNX checker: {err}") from None
        onnx.save(proto, str(tmp))
        report = None
        if verify:
            sizes = verify_sizes or verification.default_verify_sizes(size_hw, patch, dynamic)
            failed = path.with_name(path.stem + ".failed.onnx")

            def keep_failed(reason: str) -> verification.VerificationError:
                os.replace(tmp, failed)
                return verification.VerificationError(f"{reason}; the graph is kept as {failed} for inspection")

            try:
                report = verification.verify_onnx(
                    reference, tmp, sizes=sizes, images=images, precision=precision, batch=batch
                )
            except verification.VerificationError as err:  # metadata or output shapes not the model's
                raise keep_failed(str(err)) from None
            except Exception as err:
                if not type(err).__module__.startswith("onnxruntime"):
                    raise
                message = " ".join(str(err).split())  # ONNX Runtime's error: the graph does not run at a size
                raise keep_failed(f"the exported graph does not run ({type(err).__name__}: {message[:500]})") from None
            if log:
                log(report.format())
            if not report.passed:
                raise keep_failed(
                    f"ONNX Runtime differs from PyTorch beyond the {precision} tolerance "
                    f"(max relative error {report.max_rel:.2e} > {report.tolerance:.0e})"
                )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if log:
        log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return ExportResult(path=path, meta=meta, verification=report)
