"""ONNX Runtime inference for depthkit exports, with numpy, PIL and onnxruntime only: a deployment needs no torch.

    from depthkit.export.runtime import OnnxDepthModel
    model = OnnxDepthModel("dav2_vits.onnx")           # reads name, output space, normalization from the graph
    pred = model.infer(image_uint8_HWC)                 # Prediction(values=H x W float32, output_space=...)
    depth_BHW = model(image_BCHW)                       # raw graph call on a normalized float32 batch

`infer` is `DepthModel.infer` in numpy: keep the aspect ratio, short side to `input_size` with both sides rounded to
multiples of the patch size (`official_resize_hw` from the torch-free `depthkit.models.sizing`, shared with the torch
path), bicubic resize (a = -0.75, half-pixel centres, no antialiasing, no clamping: torch's `bicubic` and OpenCV's
INTER_CUBIC), normalization with the graph's `mean` / `std`, batches of same-size images, and the prediction resized
back to the original size (bilinear, align_corners=True). Everything is float32, so it matches the torch path to
float rounding (the tolerance is in docs/export.md).

Sizes that are not multiples of the patch size: `infer` never makes them (it resizes). A raw call may pass any
H, W >= 1; the graph itself zero-pads the normalized input at the bottom and right to the next multiple and crops the
output back to H x W (`non_multiple_policy` "pad", see `depthkit.export.exporter`). A graph exported without dynamic
height and width takes only its traced size: `__call__` refuses other sizes with a `ValueError`, and `infer` resizes
every image to that size (aspect ratio not kept). With only one of them dynamic, `infer` resizes to the static side
and sizes the other by the image's aspect ratio.

Shape legend: B batch, C channels, H/W an image's original size, h/w the network input size.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from depthkit.export.metadata import INPUT_NAME, GraphMeta, from_props
from depthkit.models.sizing import official_resize_hw

BICUBIC_A = -0.75  # torch's bicubic and OpenCV's INTER_CUBIC

RUNTIME_REQUIREMENTS = ("onnxruntime", "numpy", "pillow", "matplotlib", "tqdm")
"""All that `OnnxDepthModel` and `depthkit predict --onnx` import besides depthkit and the standard library (with
their own dependencies): a deployment installs `pip install --no-deps depthkit` and these. A test checks the list."""


@dataclass(frozen=True)
class Prediction:
    """One image's prediction at its original size (the fields of `depthkit.models.Prediction`)."""

    values: np.ndarray
    """float32 `H x W`."""
    output_space: str
    """The space of `values` (see `depthkit.spaces`)."""


# --------------------------------------------------------------------------------------------- preprocessing


def to_float_hwc(image) -> np.ndarray:
    """One image as float32 RGB `H x W x 3` in [0, 1].

    Accepts a uint8 (or float in [0, 1]) numpy array `H x W`, `H x W x 1`, `H x W x 3` or `H x W x 4` (alpha is
    dropped), or a PIL image (converted to RGB). A float image outside [0, 1] (or with NaN) is a `ValueError`.
    """
    if not isinstance(image, np.ndarray):
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise ValueError(f"unsupported image type {type(image).__name__}; pass a numpy array or a PIL image")
        from depthkit.models.predict import pil_to_rgb

        image = pil_to_rgb(image)
    array = image[:, :, None] if image.ndim == 2 else image
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"a numpy image must be H x W x C with C 1, 3 or 4, got shape {image.shape}")
    if 0 in array.shape[:2]:
        raise ValueError(f"empty image of shape {image.shape}")
    array = array[:, :, :3]
    if array.dtype == np.uint8:
        image_HWC = array.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(array.dtype, np.floating):
        from depthkit.models.predict import check_unit_range

        image_HWC = array.astype(np.float32)
        check_unit_range(float(image_HWC.min()), float(image_HWC.max()))
    else:
        raise ValueError(f"image dtype {array.dtype} is not uint8 or float")
    if image_HWC.shape[2] == 1:
        image_HWC = np.repeat(image_HWC, 3, axis=2)
    return image_HWC


def _cubic_taps(in_len: int, out_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights (both `4 x out_len`) of torch's bicubic, align_corners=False, no antialias."""
    scale = np.float32(in_len) / np.float32(out_len)
    src = scale * (np.arange(out_len, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    first = np.floor(src)
    t = (src - first).astype(np.float32)
    a = np.float32(BICUBIC_A)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)]).astype(np.float32)
    index = np.clip(first.astype(np.int64)[None] + np.arange(-1, 3)[:, None], 0, in_len - 1)
    return index, weights


def resize_bicubic(image_HWC: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of a float32 `H x W x C` image, as `depthkit.models.preprocess.resize_image` (values may
    overshoot [0, 1], as in the official pipeline). Separable: rows first, then columns."""
    height, width = image_HWC.shape[:2]
    out_h, out_w = size_hw
    if (height, width) == (out_h, out_w):
        return image_HWC
    index_4h, weight_4h = _cubic_taps(height, out_h)
    rows_hWC = sum(weight_4h[k][:, None, None] * image_HWC[index_4h[k]] for k in range(4))  # h x W x C
    index_4w, weight_4w = _cubic_taps(width, out_w)
    return sum(weight_4w[k][None, :, None] * rows_hWC[:, index_4w[k]] for k in range(4)).astype(np.float32)


def _linear_taps(in_len: int, out_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices i0, i1 and weight of i1 for torch's bilinear with align_corners=True."""
    scale = np.float32(in_len - 1) / np.float32(out_len - 1) if out_len > 1 else np.float32(0.0)
    src = scale * np.arange(out_len, dtype=np.float32)
    i0 = np.minimum(src.astype(np.int64), in_len - 1)
    i1 = np.minimum(i0 + 1, in_len - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(values_hw: np.ndarray, size_HW: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (align_corners=True) of a float32 `h x w` map, as the official `infer_image` resizes back."""
    height, width = values_hw.shape
    if (height, width) == tuple(size_HW):
        return values_hw
    r0, r1, rw = _linear_taps(height, size_HW[0])
    c0, c1, cw = _linear_taps(width, size_HW[1])
    rows_Hw = values_hw[r0] * (1 - rw)[:, None] + values_hw[r1] * rw[:, None]
    return (rows_Hw[:, c0] * (1 - cw)[None] + rows_Hw[:, c1] * cw[None]).astype(np.float32)


# --------------------------------------------------------------------------------------------- the model


def _providers(device: str) -> list:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "auto":  # CUDA when this onnxruntime has it (onnxruntime-gpu), else the CPU
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" or device.startswith("cuda:"):
        if "CUDAExecutionProvider" not in available:
            raise ValueError(f"device {device!r}: no CUDAExecutionProvider in onnxruntime ({', '.join(available)})")
        device_id = int(device.split(":", 1)[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    raise ValueError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")


class OnnxDepthModel:
    """A depthkit ONNX export in an ONNX Runtime session; the torch-free twin of `DepthModel` for inference.

    Args:
        path: The `.onnx` file written by `depthkit export onnx`.
        device: "cpu" (default), "cuda" or "cuda:N" (needs onnxruntime-gpu), or "auto" (CUDA when available).
        num_threads: ONNX Runtime intra-op threads (None: its default, one per core).
    """

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu", num_threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = int(num_threads)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=_providers(device))
        except ValueError:
            raise
        except Exception as err:  # onnxruntime raises its own types for a file that is not a valid model
            raise ValueError(f"{self.path} does not load in ONNX Runtime: {type(err).__name__}: {err}") from None
        self.meta: GraphMeta = from_props(self.session.get_modelmeta().custom_metadata_map, str(self.path))
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or len(outputs) != 1:
            raise ValueError(f"{self.path}: expected one input {INPUT_NAME!r} and one output, got {len(outputs)}")
        self.output_name = outputs[0].name
        self.input_shape = tuple(inputs[0].shape)  # ints for static axes, names for dynamic ones

    @property
    def static_size_hw(self) -> tuple[int, int] | None:
        """The only (H, W) the graph takes when height and width are not dynamic; else None."""
        height, width = self.input_shape[2:]
        return (height, width) if isinstance(height, int) and isinstance(width, int) else None

    def normalize(self, image01_BCHW: np.ndarray) -> np.ndarray:
        """(image - mean) / std with the graph's normalization, float32."""
        mean_13 = np.asarray(self.meta.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std_13 = np.asarray(self.meta.std, dtype=np.float32).reshape(1, 3, 1, 1)
        return ((image01_BCHW.astype(np.float32, copy=False) - mean_13) / std_13).astype(np.float32, copy=False)

    def __call__(self, image_BCHW: np.ndarray) -> np.ndarray:
        """Run the graph on a normalized float32 `B x 3 x H x W` batch; returns `B x H x W` in the output space.

        H and W need not be multiples of the patch size: the graph pads and crops (see the module docstring).
        """
        image_BCHW = np.asarray(image_BCHW)
        if image_BCHW.ndim != 4 or image_BCHW.shape[1] != 3 or 0 in image_BCHW.shape:
            raise ValueError(f"expected a normalized image batch B x 3 x H x W, got shape {image_BCHW.shape}")
        for axis, (got, want) in enumerate(zip(image_BCHW.shape, self.input_shape, strict=True)):
            if isinstance(want, int) and got != want:
                raise ValueError(
                    f"{self.path.name} was exported with a static {('batch', 'channels', 'height', 'width')[axis]} "
                    f"of {want}, got {got} (input shape {image_BCHW.shape}); re-export with --dynamic"
                )
        feed = {INPUT_NAME: np.ascontiguousarray(image_BCHW, dtype=np.float32)}
        return self.session.run([self.output_name], feed)[0]

    def network_size(self, height: int, width: int, input_size: int = 518) -> tuple[int, int]:
        """The network input size `infer` uses for an image: the official rule when height and width are dynamic,
        the graph's size when both are static; with one static, that side, and the other by the image's aspect
        ratio (a multiple of the patch size, at least one patch)."""
        static_h, static_w = (side if isinstance(side, int) else None for side in self.input_shape[2:])
        if static_h is None and static_w is None:
            return official_resize_hw(height, width, input_size, self.meta.patch_size)
        patch = self.meta.patch_size
        if static_h is None:
            static_h = max(patch, round(height * static_w / width / patch) * patch)
        elif static_w is None:
            static_w = max(patch, round(width * static_h / height / patch) * patch)
        return static_h, static_w

    def infer(self, images, input_size: int = 518, batch_size: int = 8) -> Prediction | list[Prediction]:
        """Official preprocessing, batched graph runs and resize back: `DepthModel.infer` without torch.

        Args:
            images: One image or a list: uint8 `H x W x 3` numpy arrays (greyscale / RGBA are converted) or PIL
                images; sizes may differ.
            input_size: Short-side target size (518 is what Depth Anything was trained at); ignored by a graph
                with a static height or width (see `network_size`).
            batch_size: Most images per graph run (a graph with a static batch runs them one at a time).

        Returns:
            A `Prediction` for a single image, a list of them (in input order) for a list.
        """
        single = not isinstance(images, list | tuple)
        items = [images] if single else list(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(self.input_shape[0], int):
            batch_size = self.input_shape[0]
        images_HWC = [to_float_hwc(image) for image in items]
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, image_HWC in enumerate(images_HWC):
            groups[self.network_size(*image_HWC.shape[:2], input_size)].append(index)
        results: list[Prediction | None] = [None] * len(items)
        for size_hw, indices in groups.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                batch_BHWC = np.stack([resize_bicubic(images_HWC[i], size_hw) for i in chunk])  # B x h x w x 3
                pred_Bhw = self(self.normalize(batch_BHWC.transpose(0, 3, 1, 2)))
                for i, pred_hw in zip(chunk, pred_Bhw, strict=True):
                    values = resize_bilinear(pred_hw.astype(np.float32, copy=False), images_HWC[i].shape[:2])
                    results[i] = Prediction(values=values, output_space=self.meta.output_space)
        return results[0] if single else results


def build_predictor(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    input_size: int = 518,
    batch_size: int = 8,
    device: str = "cpu",
):
    """A function from a list of uint8 RGB images to `Prediction`s, for `depthkit predict --onnx`.

    Args:
        path: The graph.
        model: If given, the model name the graph must hold (a `ValueError` otherwise).
        input_size: Short-side target size.
        batch_size: Most images per graph run.
        device: "cpu", "cuda", "cuda:N" or "auto" (CUDA when this onnxruntime has it).
    """
    session = OnnxDepthModel(path, device=device)
    if model is not None and model != session.meta.name:
        raise ValueError(f"--model {model} does not match {session.path.name}, an export of {session.meta.name}")

    def predict(images):
        return session.infer(images, input_size=input_size, batch_size=batch_size)

    return predict
