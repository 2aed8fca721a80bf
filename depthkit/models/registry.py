"""Model registry: one small function per variant returns its `DepthModelConfig`.

Names are `<family>_<size>`; `pretrained=True` loads the official file named here from the local folder:

- `dav2_vits`, `dav2_vitb`, `dav2_vitl`, `dav2_vitg`: Depth Anything V2, taps [2,5,8,11] / [2,5,8,11] /
  [4,11,17,23] / [9,19,29,39], affine_disparity; `depth_anything_v2_{size}.pth` (Giant's is not released).
- `dav1_vits`, `dav1_vitb`, `dav1_vitl`: Depth Anything V1, taps the last four blocks, affine_disparity;
  `depth_anything_{size}14.pth`.
- `dav2_metric_{vits,vitb,vitl}`: V2 metric, indoor (Hypersim), metric_depth = sigmoid * 20 m;
  `depth_anything_v2_metric_hypersim_{size}.pth`.
- `dav2_metric_outdoor_{vits,vitb,vitl}`: V2 metric, outdoor (Virtual KITTI 2), sigmoid * 80 m;
  `depth_anything_v2_metric_vkitti_{size}.pth`.
- `test_dav2`, `test_dav1`, `test_dav2_metric`: tiny (D=32, 4 or 6 blocks, 5x5 position grid) for CPU tests; no
  official file.
- `tiny_dav2`: a little wider (D=48, DPT features 16) for `make demo`: it learns the synthetic scenes' walls and
  objects within a few CPU minutes, where `test_dav2` stops at the floor's ramp. No official file.

`dav2_metric_{size}` is the official metric architecture with the official constructor's default `max_depth=20`;
pass `max_depth=...` to change it (any override of a config field works, see `create_model`). Weights trained
as another model than the one built are refused (a metric file of 80 m into a 20 m model would scale every
output); to start from them on purpose, `load_checkpoint(model, path, check_config=False)`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from depthkit.models.config import DepthModelConfig, DPTHeadConfig, EncoderConfig
from depthkit.models.dinov2 import ENCODER_CONFIGS, DinoV2Encoder, encoder_config
from depthkit.spaces import METRIC_DEPTH

_MODELS: dict[str, Callable[[], DepthModelConfig]] = {}
_CHECKPOINT_FILES: dict[str, str] = {}

HEADS = {
    "vits": DPTHeadConfig(features=64, out_channels=(48, 96, 192, 384)),
    "vitb": DPTHeadConfig(features=128, out_channels=(96, 192, 384, 768)),
    "vitl": DPTHeadConfig(features=256, out_channels=(256, 512, 1024, 1024)),
    "vitg": DPTHeadConfig(features=384, out_channels=(1536, 1536, 1536, 1536)),
    "test": DPTHeadConfig(features=8, out_channels=(8, 16, 24, 32), head_hidden=8),
}
V2_TAPS = {"vits": (2, 5, 8, 11), "vitb": (2, 5, 8, 11), "vitl": (4, 11, 17, 23), "vitg": (9, 19, 29, 39)}
ENCODER_FILES = {size: f"dinov2_{size}14_pretrain.pth" for size in ("vits", "vitb", "vitl", "vitg")}


def register_model(fn: Callable[[], DepthModelConfig] | None = None, *, checkpoint: str | None = None):
    """Register a config function under its own name; `checkpoint` is its official weights file name."""

    def wrap(f: Callable[[], DepthModelConfig]) -> Callable[[], DepthModelConfig]:
        if f.__name__ in _MODELS:
            raise ValueError(f"model {f.__name__!r} is registered twice")
        _MODELS[f.__name__] = f
        if checkpoint is not None:
            _CHECKPOINT_FILES[f.__name__] = checkpoint
        return f

    return wrap(fn) if fn is not None else wrap


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    import fnmatch

    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def checkpoint_filename(name: str) -> str | None:
    """The official weights file name of a registered model (None for the test variants)."""
    _check_name(name)
    return _CHECKPOINT_FILES.get(name)


def config_overrides(config: DepthModelConfig) -> dict | None:
    """The overrides that rebuild `config` from its registered name (`model_config(config.name, **overrides)`), or
    None when none do (an unregistered name, or a config built by hand)."""
    from depthkit.models.checkpoint import config_diffs

    if config.name not in _MODELS:
        return None
    overrides = {field.rsplit(".", 1)[-1]: value for field, _, value in config_diffs(model_config(config.name), config)}
    try:
        rebuilt = model_config(config.name, **overrides)
    except ValueError:
        return None
    return overrides if rebuilt == config else None


def model_for_checkpoint_file(filename: str) -> str | None:
    """The registered model whose official weights file is named `filename` (None if no model's is)."""
    return next((name for name, official in _CHECKPOINT_FILES.items() if official == filename), None)


def _check_name(name: str) -> None:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")


def model_config(name: str, **overrides) -> DepthModelConfig:
    """The registered config of `name`, with `overrides` applied.

    An override names a field of `DepthModelConfig` (`max_depth=80.0`, `tap_indices=...`), of `EncoderConfig`
    (`drop_path_rate=0.1`) or of `DPTHeadConfig` (`use_clstoken=True`).
    """
    _check_name(name)
    config = _MODELS[name]()
    top = {f.name for f in dataclasses.fields(DepthModelConfig)}
    enc_fields = {f.name for f in dataclasses.fields(EncoderConfig)}
    head_fields = {f.name for f in dataclasses.fields(DPTHeadConfig)}
    top_o = {k: v for k, v in overrides.items() if k in top}
    enc_o = {k: v for k, v in overrides.items() if k in enc_fields and k not in top}
    head_o = {k: v for k, v in overrides.items() if k in head_fields and k not in top and k not in enc_fields}
    unknown = sorted(set(overrides) - set(top_o) - set(enc_o) - set(head_o))
    if unknown:
        valid = ", ".join(sorted((top | enc_fields | head_fields) - {"name", "encoder", "head"}))
        raise ValueError(f"unknown override(s) {unknown} for {name}; valid: {valid}")
    if enc_o:
        top_o["encoder"] = dataclasses.replace(top_o.get("encoder", config.encoder), **enc_o)
    if head_o:
        top_o["head"] = dataclasses.replace(top_o.get("head", config.head), **head_o)
    return dataclasses.replace(config, **top_o)


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    **overrides,
):
    """Build a registered `DepthModel`, optionally with weights. Nothing is ever downloaded.

    Args:
        name: A registered name (`list_models()`), e.g. "dav2_vits".
        pretrained: Load the official weights from the local checkpoint folder (`checkpoint.checkpoint_dir()`:
            `$DEPTHKIT_HOME/checkpoints`, default `~/.cache/depthkit/checkpoints`), under the official file name.
        checkpoint_path: A checkpoint to load instead (official `.pth`, depthkit `.pth`/`.safetensors`, or a
            transformers folder / `model.safetensors`); with `pretrained=True`, a folder to look in for the
            official file, or that file.
        **overrides: Config fields to change (see `model_config`).

    Returns:
        The `DepthModel`, on the current default device, in train mode.
    """
    from depthkit.models import checkpoint as ckpt
    from depthkit.models.depth_model import DepthModel

    model = DepthModel(model_config(name, **overrides))
    if pretrained:
        filename = checkpoint_filename(name)
        if filename is None:
            raise FileNotFoundError(
                f"{name} has no official weights; give your own (commands: --checkpoint PATH; Python: "
                "checkpoint_path=...)"
            )
        ckpt.load_checkpoint(model, ckpt.find_pretrained(filename, name, checkpoint_path))
    elif checkpoint_path is not None:
        ckpt.load_checkpoint(model, checkpoint_path)
    return model


def load_model(name: str | None = None, checkpoint_path: str | os.PathLike | None = None, *, pretrained: bool = True):
    """The model a command is pointed at: a registry name, a checkpoint, or both.

    A `depthkit fit` checkpoint names the model it trained (`hyper_parameters`: `model`, `model_overrides`), so it
    needs no `name`, and the model is built as trained (e.g. a metric model fine-tuned with `max_depth=80`); so does
    an official file under its official name (`depth_anything_v2_metric_vkitti_vitl.pth`) and a depthkit
    `.safetensors` (its metadata). Other checkpoints (renamed official `.pth`, depthkit `.pth`, transformers
    folders) need `name`. The file is read
    once.

    Args:
        name: A registered name; with a training checkpoint it must be the one the checkpoint names.
        checkpoint_path: Weights to load.
        pretrained: Without a checkpoint, load the official weights from the local folder (False: random init,
            seeded, so every command's `--random-weights` builds the same model; the global RNG is left as it was).

    Returns:
        The `DepthModel` in eval mode, on the CPU.

    Raises:
        ValueError: no name where one is needed, a name the training checkpoint contradicts, weights that do not
            fit the model.
        FileNotFoundError: a missing checkpoint, or no local official weights.
    """
    from depthkit.models import checkpoint as ckpt
    from depthkit.models.depth_model import DepthModel

    if checkpoint_path is None:
        if name is None:
            raise ValueError("name the model (--model NAME) or give a checkpoint (--checkpoint PATH)")
        if pretrained:
            return create_model(name, pretrained=True).eval()
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return create_model(name).eval()
    source = str(checkpoint_path)
    state_dict, found = ckpt.read_checkpoint(checkpoint_path)
    trained = found.get("model") if found is not None and "model_overrides" in found else None
    if trained is not None:
        if name is not None and name != trained:
            how = {"file name": "its official file name", "metadata": "the model its metadata names"}.get(
                found.get("named_by"), "the name it was trained under"
            )
            raise ValueError(f"{source} holds a {trained} model ({how}), not {name}")
        config = model_config(trained, **found["model_overrides"])
    elif name is None:
        raise ValueError(
            f"{source} does not name its model (`depthkit fit` checkpoints, official files under their official "
            "name and depthkit .safetensors do): add --model NAME"
        )
    else:
        config = model_config(name)
    return ckpt.load_state_dict(DepthModel(config), state_dict, source, found).eval()


def create_encoder(
    name_or_size: str, pretrained: bool = False, checkpoint_path: str | os.PathLike | None = None, **overrides
) -> DinoV2Encoder:
    """A bare DINOv2 encoder, e.g. the frozen feature-alignment target.

    `encoder.forward_patch_tokens(image_BCHW)` gives `tokens_BND` in the format of
    `DepthModel.forward_with_features`. The caller freezes it (`eval()`, `requires_grad_(False)`).

    Args:
        name_or_size: "vits" | "vitb" | "vitl" | "vitg" | "test", "dinov2_vits14"-style, or a registered model
            name (its encoder).
        pretrained: Load the original DINOv2 weights (`dinov2_{size}14_pretrain.pth`) from the checkpoint folder.
        checkpoint_path: A file to load instead: original DINOv2, official Depth Anything (`pretrained.*` is
            taken) or depthkit; with `pretrained=True`, a folder to look in, or the file itself.
        **overrides: `EncoderConfig` fields to change.
    """
    from depthkit.models import checkpoint as ckpt

    if name_or_size in _MODELS:
        config = _MODELS[name_or_size]().encoder
        size = next((s for s, c in ENCODER_CONFIGS.items() if c == config), None)
    else:
        config = encoder_config(name_or_size)
        size = next(s for s, c in ENCODER_CONFIGS.items() if c == config)
    config = dataclasses.replace(config, **overrides)
    encoder = DinoV2Encoder(config)
    path = checkpoint_path
    if pretrained:
        if size not in ENCODER_FILES:
            raise FileNotFoundError(f"encoder {name_or_size!r} has no official weights; pass checkpoint_path=...")
        path = ckpt.find_pretrained(ENCODER_FILES[size], f"encoder {name_or_size}", checkpoint_path)
    if path is not None:
        state_dict, _ = ckpt.read_checkpoint(path)
        state_dict = ckpt.encoder_state_dict(state_dict)
        own = encoder.state_dict()
        expected = {k: tuple(v.shape) for k, v in own.items()}
        ckpt.check_state_dict(expected, state_dict, f"{path} (DINOv2 encoder)")
        encoder.load_state_dict(state_dict, strict=True)
    return encoder


# --------------------------------------------------------------------------------------------- variants


def _v2(name: str, size: str) -> DepthModelConfig:
    return DepthModelConfig(name=name, encoder=ENCODER_CONFIGS[size], head=HEADS[size], tap_indices=V2_TAPS[size])


def _v1(name: str, size: str) -> DepthModelConfig:
    depth = ENCODER_CONFIGS[size].depth
    taps = tuple(range(depth - 4, depth))
    return DepthModelConfig(name=name, encoder=ENCODER_CONFIGS[size], head=HEADS[size], tap_indices=taps)


def _metric(name: str, size: str, max_depth: float) -> DepthModelConfig:
    head = dataclasses.replace(HEADS[size], activation="sigmoid")
    return DepthModelConfig(
        name=name,
        encoder=ENCODER_CONFIGS[size],
        head=head,
        tap_indices=V2_TAPS[size],
        output_space=METRIC_DEPTH,
        max_depth=max_depth,
    )


@register_model(checkpoint="depth_anything_v2_vits.pth")
def dav2_vits() -> DepthModelConfig:
    """Depth Anything V2 Small (24.8M)."""
    return _v2("dav2_vits", "vits")


@register_model(checkpoint="depth_anything_v2_vitb.pth")
def dav2_vitb() -> DepthModelConfig:
    """Depth Anything V2 Base (97.5M)."""
    return _v2("dav2_vitb", "vitb")


@register_model(checkpoint="depth_anything_v2_vitl.pth")
def dav2_vitl() -> DepthModelConfig:
    """Depth Anything V2 Large (335.3M)."""
    return _v2("dav2_vitl", "vitl")


@register_model(checkpoint="depth_anything_v2_vitg.pth")
def dav2_vitg() -> DepthModelConfig:
    """Depth Anything V2 Giant (1.3B)."""
    return _v2("dav2_vitg", "vitg")


@register_model(checkpoint="depth_anything_vits14.pth")
def dav1_vits() -> DepthModelConfig:
    """Depth Anything V1 Small: the head taps the last four blocks."""
    return _v1("dav1_vits", "vits")


@register_model(checkpoint="depth_anything_vitb14.pth")
def dav1_vitb() -> DepthModelConfig:
    """Depth Anything V1 Base."""
    return _v1("dav1_vitb", "vitb")


@register_model(checkpoint="depth_anything_vitl14.pth")
def dav1_vitl() -> DepthModelConfig:
    """Depth Anything V1 Large."""
    return _v1("dav1_vitl", "vitl")


@register_model(checkpoint="depth_anything_v2_metric_hypersim_vits.pth")
def dav2_metric_vits() -> DepthModelConfig:
    """Depth Anything V2 metric Small, indoor (Hypersim, max_depth 20 m)."""
    return _metric("dav2_metric_vits", "vits", 20.0)


@register_model(checkpoint="depth_anything_v2_metric_hypersim_vitb.pth")
def dav2_metric_vitb() -> DepthModelConfig:
    """Depth Anything V2 metric Base, indoor (Hypersim, max_depth 20 m)."""
    return _metric("dav2_metric_vitb", "vitb", 20.0)


@register_model(checkpoint="depth_anything_v2_metric_hypersim_vitl.pth")
def dav2_metric_vitl() -> DepthModelConfig:
    """Depth Anything V2 metric Large, indoor (Hypersim, max_depth 20 m)."""
    return _metric("dav2_metric_vitl", "vitl", 20.0)


@register_model(checkpoint="depth_anything_v2_metric_vkitti_vits.pth")
def dav2_metric_outdoor_vits() -> DepthModelConfig:
    """Depth Anything V2 metric Small, outdoor (Virtual KITTI 2, max_depth 80 m)."""
    return _metric("dav2_metric_outdoor_vits", "vits", 80.0)


@register_model(checkpoint="depth_anything_v2_metric_vkitti_vitb.pth")
def dav2_metric_outdoor_vitb() -> DepthModelConfig:
    """Depth Anything V2 metric Base, outdoor (Virtual KITTI 2, max_depth 80 m)."""
    return _metric("dav2_metric_outdoor_vitb", "vitb", 80.0)


@register_model(checkpoint="depth_anything_v2_metric_vkitti_vitl.pth")
def dav2_metric_outdoor_vitl() -> DepthModelConfig:
    """Depth Anything V2 metric Large, outdoor (Virtual KITTI 2, max_depth 80 m)."""
    return _metric("dav2_metric_outdoor_vitl", "vitl", 80.0)


@register_model
def test_dav2() -> DepthModelConfig:
    """Tiny V2-style model (D=32, 4 blocks, taps [0, 1, 2, 3]) for CPU tests."""
    return DepthModelConfig(
        name="test_dav2", encoder=ENCODER_CONFIGS["test"], head=HEADS["test"], tap_indices=(0, 1, 2, 3)
    )


@register_model
def tiny_dav2() -> DepthModelConfig:
    """The demo's V2-style model (D=48, 4 blocks, DPT features 16): small enough to train on CPU in minutes."""
    encoder = dataclasses.replace(ENCODER_CONFIGS["test"], embed_dim=48, num_heads=3)
    head = DPTHeadConfig(features=16, out_channels=(16, 32, 48, 64), head_hidden=16)
    return DepthModelConfig(name="tiny_dav2", encoder=encoder, head=head, tap_indices=(0, 1, 2, 3))


@register_model
def test_dav1() -> DepthModelConfig:
    """Tiny V1-style model: taps the last four of 6 blocks."""
    encoder = dataclasses.replace(ENCODER_CONFIGS["test"], depth=6)
    return DepthModelConfig(name="test_dav1", encoder=encoder, head=HEADS["test"], tap_indices=(2, 3, 4, 5))


@register_model
def test_dav2_metric() -> DepthModelConfig:
    """Tiny metric model (sigmoid * 20 m)."""
    return DepthModelConfig(
        name="test_dav2_metric",
        encoder=ENCODER_CONFIGS["test"],
        head=dataclasses.replace(HEADS["test"], activation="sigmoid"),
        tap_indices=(0, 1, 2, 3),
        output_space=METRIC_DEPTH,
        max_depth=20.0,
    )
