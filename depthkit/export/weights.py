"""`depthkit export weights`: release a model's weights in the layout its users load.

- "official": the Depth Anything `.pth` (`pretrained.*`, `depth_head.*`), which the official repositories load
  with `model.load_state_dict(torch.load(path))` once the model is built with the constructor arguments that
  `official_constructor` prints.
- "hf": a transformers folder (`config.json` + `model.safetensors`) for
  `DepthAnythingForDepthEstimation.from_pretrained(folder)`.
- "depthkit": `.safetensors` (or `.pth`) with depthkit's key names, for `create_model(name, checkpoint_path=...)`.

The weights are written under a temporary name, read back into a fresh model through the same loader as
`create_model(checkpoint_path=...)` and compared tensor by tensor with the exported model; only then are they
renamed into place, so a mismatch or a crash leaves nothing at `--out`.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from depthkit.models.checkpoint import (
    HF_CONFIG_NAME,
    HF_WEIGHTS_NAME,
    LAYOUTS,
    inference_config,
    load_checkpoint,
    save_checkpoint,
)
from depthkit.models.registry import ENCODER_CONFIGS, V2_TAPS, model_config, model_for_checkpoint_file

SUFFIXES = {"official": (".pth", ".pt"), "depthkit": (".safetensors", ".pth", ".pt")}


@dataclass(frozen=True)
class WeightsExport:
    """What `export_weights` wrote."""

    path: Path
    """The weights file, or the folder for "hf"."""
    layout: str
    num_tensors: int
    num_bytes: int
    load_hint: str
    """How to load it, as a short Python snippet."""


def check_out(out: str | os.PathLike, layout: str) -> Path:
    """The output path, checked against the layout before any work.

    Raises:
        ValueError: an unknown layout, a file name the layout does not write, or an "hf" folder that is a file.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    path = Path(out).expanduser()
    if layout == "hf":
        if path.is_file() or path.suffix in (".pth", ".pt", ".bin", ".safetensors"):
            raise ValueError(f"--out {path}: the hf layout writes a folder (config.json + model.safetensors)")
    elif path.suffix not in SUFFIXES[layout]:
        raise ValueError(f"--out {path}: the {layout} layout writes a {' or '.join(SUFFIXES[layout])} file")
    elif path.is_dir():
        raise ValueError(f"--out {path} is a folder; the {layout} layout writes a file")
    return path


def export_weights(model, out: str | os.PathLike, *, layout: str = "official") -> WeightsExport:
    """Write `model`'s weights in `layout` to `out`, verified by reading them back (see the module docstring).

    Raises:
        ValueError: a bad `out` for the layout (`check_out`), the official file name of another model, or weights
            that do not read back identical.
    """
    from depthkit.models.depth_model import DepthModel

    path = check_out(out, layout)
    owner = model_for_checkpoint_file(path.name) if layout == "official" else None
    if owner is not None and inference_config(model_config(owner)) != inference_config(model.config):
        raise ValueError(
            f"--out {path.name} is the official file name of {owner}, which this {model.config.name} model is not: "
            "depthkit loads a file of that name as that model; choose another name"
        )
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # the suffix picks the file format
    try:
        with warnings.catch_warnings(record=True) as caught:  # they name the temporary file: name `path`
            warnings.simplefilter("always")
            written = save_checkpoint(model, tmp, layout=layout)
        for warning in caught:
            warnings.warn(str(warning.message).replace(str(tmp), str(path)), warning.category, stacklevel=2)
        reread = load_checkpoint(DepthModel(model.config), tmp)
        expected, got = model.state_dict(), reread.state_dict()
        differ = [k for k, v in expected.items() if not torch.equal(v.detach().cpu(), got[k])]
        if differ:
            raise ValueError(f"{layout} weights did not read back identical: {', '.join(differ[:5])}")
        num_bytes = written.stat().st_size
        if layout == "hf":
            path.mkdir(parents=True, exist_ok=True)
            for name in (HF_WEIGHTS_NAME, HF_CONFIG_NAME):
                os.replace(tmp / name, path / name)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return WeightsExport(path, layout, len(expected), num_bytes, load_hint(model.config, path, layout))


def official_constructor(config) -> str | None:
    """The official code's constructor call for `config`, or None when the official code cannot build it."""
    encoder = inference_config(config).encoder  # the registry's encoders have no stochastic depth
    size = next((s for s, enc in ENCODER_CONFIGS.items() if enc == encoder), None)
    head = config.head
    if size is None or head.use_bn or head.use_clstoken or head.head_hidden != 32:
        return None
    args = f"encoder={size!r}, features={head.features}, out_channels={list(head.out_channels)}"
    depth = config.encoder.depth
    if config.max_depth is not None and config.tap_indices == V2_TAPS[size]:
        return f"DepthAnythingV2({args}, max_depth={config.max_depth:g})  # metric_depth/depth_anything_v2/dpt.py"
    if config.tap_indices == V2_TAPS[size]:
        return f"DepthAnythingV2({args})  # depth_anything_v2/dpt.py"
    if config.max_depth is None and config.tap_indices == tuple(range(depth - 4, depth)):
        v1 = {"encoder": size, "features": head.features, "out_channels": list(head.out_channels)}
        return f"DepthAnything({v1!r})  # Depth-Anything (V1): depth_anything/dpt.py"
    return None


def load_hint(config, path: Path, layout: str) -> str:
    """A short snippet that loads the exported weights."""
    if layout == "depthkit":
        return (
            "from depthkit.models import create_model\n"
            f"model = create_model({config.name!r}, checkpoint_path={str(path)!r})"
        )
    if layout == "hf":
        return (
            "from transformers import DepthAnythingForDepthEstimation\n"
            f"model = DepthAnythingForDepthEstimation.from_pretrained({str(path)!r})"
        )
    constructor = official_constructor(config)
    if constructor is None:
        return (
            f"official key names, but no official constructor builds {config.name} (its encoder or head is not a "
            f"released size); depthkit reads it: create_model({config.name!r}, checkpoint_path={str(path)!r})"
        )
    return f"model = {constructor}\nmodel.load_state_dict(torch.load({str(path)!r}, map_location='cpu'))"
