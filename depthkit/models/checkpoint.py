"""The one checkpoint adapter: official Depth Anything <-> depthkit <-> Hugging Face transformers.

Layouts (all hold the same tensors; conversions are exact renames plus the qkv split/concat for transformers):

- **official**: what `DepthAnythingV2(...).state_dict()` (and V1's `DPT_DINOv2`, and the metric models) save:
  `pretrained.*` in the original DINOv2 layout (`blocks.{i}.mlp.w12/w3` for ViT-g, `register_tokens`,
  `mask_token`) and `depth_head.*` (`projects`, `resize_layers`, `scratch.*`). Files: `depth_anything_v2_vits.pth`,
  `depth_anything_vits14.pth`, `depth_anything_v2_metric_hypersim_vits.pth`, ...
- **depthkit**: `DepthModel.state_dict()`: `encoder.*` in timm's layout (`mlp.fc1/fc2`, `reg_token`) plus
  `mask_token`, and `head.*` with the official head names.
- **hf**: `DepthAnythingForDepthEstimation` (`backbone.embeddings.*`, `backbone.encoder.layer.{i}.*` with separate
  query/key/value, `neck.*`, `head.conv1-3`), stored as `model.safetensors` + `config.json` in a folder.

Loading is strict in the file's own layout: a missing key, an unexpected key or a shape mismatch is a `ValueError`
that names them. Same-shaped checkpoints that differ only in behaviour (V1 vs V2 taps, relative vs metric) cannot be
told apart from an official `.pth`: pick the matching model name. A transformers `config.json` is checked.

Checked against transformers 5.24 (`DepthAnythingForDepthEstimation.from_pretrained` on an export: no missing or
unexpected keys; its `save_pretrained` output loads back exactly). Outputs are identical at the pre-training grid
(518 x 518 for the real models); at other sizes transformers resizes the position embedding without DINOv2's 0.1
offset, so it differs slightly from the official code, which depthkit follows (`interpolate_offset=0.0` gives
transformers' behaviour).

`pretrained=True` never downloads: it looks for the official file name in the checkpoint folder,
`$DEPTHKIT_HOME/checkpoints/` (default `~/.cache/depthkit/checkpoints/`), or in the folder given as
`checkpoint_path`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from depthkit._files import replacing
from depthkit.models.config import DepthModelConfig
from depthkit.spaces import METRIC_DEPTH

LAYOUTS = ("official", "depthkit", "hf")
HF_WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"
_MAX_LISTED = 20


# --------------------------------------------------------------------------------------------- locations


def checkpoint_dir() -> Path:
    """Where `pretrained=True` looks: `$DEPTHKIT_HOME/checkpoints`, default `~/.cache/depthkit/checkpoints`."""
    home = os.environ.get("DEPTHKIT_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "depthkit") / "checkpoints"


def find_pretrained(filename: str, model_name: str, checkpoint_path: str | os.PathLike | None = None) -> Path:
    """Path of a local official checkpoint, or a `FileNotFoundError` that says where it looked.

    Args:
        filename: Official file name, e.g. "depth_anything_v2_vits.pth".
        model_name: For the error message.
        checkpoint_path: A folder to look in instead of `checkpoint_dir()`, or the official file itself.
    """
    folder = Path(checkpoint_path).expanduser() if checkpoint_path is not None else checkpoint_dir()
    if folder.is_file():
        return folder
    path = folder / filename
    if path.is_file():
        return path
    raise FileNotFoundError(
        f"no weights for {model_name}: looked for {path}. depthkit never downloads; put the official file "
        f"{filename!r} there, or set DEPTHKIT_HOME, or give your own weights file (commands: --checkpoint PATH; "
        "Python: checkpoint_path=...)"
    )


def locate_weights(path: str | os.PathLike, option: str) -> Path:
    """A weights path from a configuration: as given (relative paths from the working directory), else, for a
    relative path, its file name in the checkpoint folder (`checkpoint_dir()`, where `pretrained=True` looks).

    Recipes name DINOv2 and Depth Anything weights as `checkpoints/<official file name>`: that works from the
    repository root, and from anywhere once the files are in `$DEPTHKIT_HOME/checkpoints`.

    Raises:
        FileNotFoundError: naming `option` and every place looked in.
    """
    given = Path(path).expanduser()
    if given.exists():
        return given
    looked = [given.absolute()]
    if not given.is_absolute():
        fallback = checkpoint_dir() / given.name
        if fallback.exists():
            return fallback
        looked.append(fallback)
    raise FileNotFoundError(
        f"{option}: {path} not found (looked for {' and '.join(map(str, looked))}); depthkit never downloads"
    )


# --------------------------------------------------------------------------------------------- key renames

_OFFICIAL_ENCODER = "pretrained."
_OFFICIAL_HEAD = "depth_head."


def _encoder_to_official_key(key: str, ffn: str) -> str:
    """timm/depthkit encoder key (no prefix) -> original DINOv2 key."""
    if key == "reg_token":
        return "register_tokens"
    if ffn == "swiglu":
        key = re.sub(r"^(blocks\.\d+\.mlp\.)fc1\.", r"\1w12.", key)
        key = re.sub(r"^(blocks\.\d+\.mlp\.)fc2\.", r"\1w3.", key)
    return key


def _encoder_from_official_key(key: str) -> str:
    """Original DINOv2 key (no prefix) -> timm/depthkit encoder key."""
    if key == "register_tokens":
        return "reg_token"
    key = re.sub(r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1.", key)
    return re.sub(r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2.", key)


def to_official(state_dict: dict[str, torch.Tensor], config: DepthModelConfig) -> dict[str, torch.Tensor]:
    """depthkit `state_dict` -> official Depth Anything layout (same tensors, renamed)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("encoder."):
            out[_OFFICIAL_ENCODER + _encoder_to_official_key(key[len("encoder.") :], config.encoder.ffn)] = value
        elif key.startswith("head."):
            out[_OFFICIAL_HEAD + key[len("head.") :]] = value
        else:
            raise ValueError(f"not a depthkit DepthModel key: {key!r}")
    return out


def from_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Depth Anything layout -> depthkit `state_dict` (same tensors, renamed)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_OFFICIAL_ENCODER):
            out["encoder." + _encoder_from_official_key(key[len(_OFFICIAL_ENCODER) :])] = value
        elif key.startswith(_OFFICIAL_HEAD):
            out["head." + key[len(_OFFICIAL_HEAD) :]] = value
        else:
            out[key] = value  # left for the strict check to report as unexpected
    return out


# official (with prefix) <-> transformers, as (official, hf) templates. Placeholders: {b} block, {p} weight|bias,
# {n}/{u}/{c} 1|2, {i} 0-3, {j} a resize layer with weights, {k} refinenet 1-4 (transformers counts 4-k, deepest
# first), {r} layer{r}_rn 1-4 (transformers: r-1).
_HF_RULES: list[tuple[str, str]] = [
    ("pretrained.cls_token", "backbone.embeddings.cls_token"),
    ("pretrained.mask_token", "backbone.embeddings.mask_token"),
    ("pretrained.register_tokens", "backbone.embeddings.register_tokens"),
    ("pretrained.pos_embed", "backbone.embeddings.position_embeddings"),
    ("pretrained.patch_embed.proj.{p}", "backbone.embeddings.patch_embeddings.projection.{p}"),
    ("pretrained.blocks.{b}.norm{n}.{p}", "backbone.encoder.layer.{b}.norm{n}.{p}"),
    ("pretrained.blocks.{b}.attn.proj.{p}", "backbone.encoder.layer.{b}.attention.output.dense.{p}"),
    ("pretrained.blocks.{b}.ls{n}.gamma", "backbone.encoder.layer.{b}.layer_scale{n}.lambda1"),
    ("pretrained.blocks.{b}.mlp.fc{n}.{p}", "backbone.encoder.layer.{b}.mlp.fc{n}.{p}"),
    ("pretrained.blocks.{b}.mlp.w12.{p}", "backbone.encoder.layer.{b}.mlp.weights_in.{p}"),
    ("pretrained.blocks.{b}.mlp.w3.{p}", "backbone.encoder.layer.{b}.mlp.weights_out.{p}"),
    ("pretrained.norm.{p}", "backbone.layernorm.{p}"),
    ("depth_head.projects.{i}.{p}", "neck.reassemble_stage.layers.{i}.projection.{p}"),
    ("depth_head.resize_layers.{j}.{p}", "neck.reassemble_stage.layers.{j}.resize.{p}"),
    ("depth_head.scratch.layer{r}_rn.weight", "neck.convs.{r}.weight"),
    ("depth_head.scratch.refinenet{k}.out_conv.{p}", "neck.fusion_stage.layers.{k}.projection.{p}"),
    (
        "depth_head.scratch.refinenet{k}.resConfUnit{u}.conv{c}.{p}",
        "neck.fusion_stage.layers.{k}.residual_layer{u}.convolution{c}.{p}",
    ),
    ("depth_head.scratch.output_conv1.{p}", "head.conv1.{p}"),
    ("depth_head.scratch.output_conv2.0.{p}", "head.conv2.{p}"),
    ("depth_head.scratch.output_conv2.2.{p}", "head.conv3.{p}"),
]
_OFFICIAL_FIELDS = {
    "b": r"\d+",
    "p": "weight|bias",
    "n": "[12]",
    "u": "[12]",
    "c": "[12]",
    "i": "[0-3]",
    "j": "[013]",
    "k": "[1-4]",
    "r": "[1-4]",
}
_HF_FIELDS = dict(_OFFICIAL_FIELDS, k="[0-3]", r="[0-3]")
_TO_HF_VALUE = {"k": lambda v: 4 - v, "r": lambda v: v - 1}
_FROM_HF_VALUE = {"k": lambda v: 4 - v, "r": lambda v: v + 1}
_QKV_OFFICIAL = re.compile(r"pretrained\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)")
_QKV_HF = re.compile(r"backbone\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")


def _compile(template: str, fields: dict[str, str]) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)  # literal, name, literal, name, ...
    pattern = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>{fields[part]})" for i, part in enumerate(parts))
    return re.compile(pattern)


_TO_HF_RULES = [(_compile(o, _OFFICIAL_FIELDS), h) for o, h in _HF_RULES]
_FROM_HF_RULES = [(_compile(h, _HF_FIELDS), o) for o, h in _HF_RULES]


def _rename(key: str, rules, value_maps) -> str | None:
    for pattern, template in rules:
        match = pattern.fullmatch(key)
        if match:
            values = {
                name: str(value_maps[name](int(v))) if name in value_maps else v
                for name, v in match.groupdict().items()
            }
            return template.format(**values)
    return None


def official_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official layout -> transformers `DepthAnythingForDepthEstimation` (qkv split into query/key/value)."""
    out = {}
    unsupported = []
    for key, value in state_dict.items():
        match = _QKV_OFFICIAL.fullmatch(key)
        if match:
            block, kind = match.groups()
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                out[f"backbone.encoder.layer.{block}.attention.attention.{name}.{kind}"] = part
            continue
        new_key = _rename(key, _TO_HF_RULES, _TO_HF_VALUE)
        if new_key is None:
            unsupported.append(key)
        else:
            out[new_key] = value
    if unsupported:
        raise ValueError(
            "the transformers DepthAnything layout has no place for: "
            + _list(unsupported)
            + " (class-token readout and BatchNorm heads are depthkit/official-only)"
        )
    return out


def hf_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers `DepthAnythingForDepthEstimation` layout -> official layout (query/key/value concatenated)."""
    out = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        match = _QKV_HF.fullmatch(key)
        if match:
            block, name, kind = match.groups()
            qkv.setdefault((block, kind), {})[name] = value
            continue
        new_key = _rename(key, _FROM_HF_RULES, _FROM_HF_VALUE)
        if new_key is None:
            unknown.append(key)
        else:
            out[new_key] = value
    incomplete = [f"backbone.encoder.layer.{b}.attention.attention.*.{k}" for (b, k), p in qkv.items() if len(p) != 3]
    if unknown or incomplete:
        raise ValueError(
            "not a transformers DepthAnything key (or an incomplete q/k/v set): " + _list(unknown + incomplete)
        )
    for (block, kind), parts in qkv.items():
        out[f"pretrained.blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def to_hf(state_dict: dict[str, torch.Tensor], config: DepthModelConfig) -> dict[str, torch.Tensor]:
    """depthkit `state_dict` -> transformers layout."""
    return official_to_hf(to_official(state_dict, config))


def from_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers layout -> depthkit `state_dict`."""
    return from_official(hf_to_official(state_dict))


def _int_if_whole(value: float) -> int | float:
    """transformers' strict config fields want `4`, not `4.0` (`mlp_ratio`, `max_depth`)."""
    return int(value) if float(value).is_integer() else value


def hf_config(config: DepthModelConfig) -> dict:
    """A transformers `DepthAnythingConfig` dict (config.json) for a depthkit model config."""
    enc = config.encoder
    if config.head.use_bn or config.head.use_clstoken:
        raise ValueError("the transformers DepthAnything model has no BatchNorm or class-token readout head")
    if enc.num_register_tokens:
        raise ValueError("the transformers DepthAnything neck assumes one prefix token; register tokens don't fit")
    if enc.interpolate_antialias:
        raise ValueError("transformers' DINOv2 resizes the position embedding without antialiasing")
    out_indices = [i + 1 for i in config.tap_indices]  # transformers counts the embeddings as stage 0
    backbone = {
        "model_type": "dinov2",
        "hidden_size": enc.embed_dim,
        "num_hidden_layers": enc.depth,
        "num_attention_heads": enc.num_heads,
        "mlp_ratio": _int_if_whole(enc.mlp_ratio),
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "image_size": enc.img_size,
        "patch_size": enc.patch_size,
        "num_channels": 3,
        "qkv_bias": True,
        "layerscale_value": enc.init_values,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": enc.ffn == "swiglu",
        "out_indices": out_indices,
        "out_features": [f"stage{i}" for i in out_indices],
        "apply_layernorm": True,
        "reshape_hidden_states": False,
    }
    metric = config.output_space == METRIC_DEPTH
    return {
        "architectures": ["DepthAnythingForDepthEstimation"],
        "model_type": "depth_anything",
        "backbone_config": backbone,
        "patch_size": enc.patch_size,
        "reassemble_hidden_size": enc.embed_dim,
        "reassemble_factors": [4, 2, 1, 0.5],
        "neck_hidden_sizes": list(config.head.out_channels),
        "fusion_hidden_size": config.head.features,
        "head_in_index": -1,
        "head_hidden_size": config.head.head_hidden,
        "depth_estimation_type": "metric" if metric else "relative",
        "max_depth": _int_if_whole(config.max_depth) if metric else 1,  # transformers' default; unused by ReLU
        "torch_dtype": "float32",
    }


def check_hf_config(found: dict, config: DepthModelConfig, source: str) -> None:
    """Raise a `ValueError` if a transformers config.json describes a different model than `config`."""
    expected = hf_config(config)
    checks = [
        ("backbone_config.hidden_size", expected["backbone_config"]["hidden_size"]),
        ("backbone_config.num_hidden_layers", expected["backbone_config"]["num_hidden_layers"]),
        ("backbone_config.out_indices", expected["backbone_config"]["out_indices"]),
        ("neck_hidden_sizes", expected["neck_hidden_sizes"]),
        ("fusion_hidden_size", expected["fusion_hidden_size"]),
        ("depth_estimation_type", expected["depth_estimation_type"]),
    ]
    if expected["depth_estimation_type"] == "metric":
        checks.append(("max_depth", expected["max_depth"]))
    diffs = []
    for dotted, want in checks:
        value = found
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None and value != want:
            diffs.append(f"{dotted}={value!r} (model {config.name} needs {want!r})")
    if diffs:
        raise ValueError(f"{source} describes a different model: " + "; ".join(diffs))


# --------------------------------------------------------------------------------------------- files


def _list(keys: list[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


def _unwrap(obj, source: str) -> dict[str, torch.Tensor]:
    """A plain key -> tensor dict from a loaded file: unwraps {"model": ...} / {"state_dict": ...}, `module.`."""
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{source} does not hold a state_dict (a non-empty dict of tensors)")
    if all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    if any(k.startswith(("model.encoder.", "model.head.")) for k in obj):  # a depthkit.train (Lightning) checkpoint
        obj = {k[len("model.") :]: v for k, v in obj.items() if k.startswith("model.")}
    return obj


def detect_layout(state_dict: dict[str, torch.Tensor], source: str = "state_dict") -> str:
    """ "official", "depthkit" or "hf", from the key prefixes; a `ValueError` naming `source` if none fits."""
    keys = list(state_dict)
    if any(k.startswith((_OFFICIAL_ENCODER, _OFFICIAL_HEAD)) for k in keys):
        return "official"
    if any(k.startswith(("backbone.", "neck.")) for k in keys):
        return "hf"
    if any(k.startswith(("encoder.", "head.")) for k in keys):
        return "depthkit"
    raise ValueError(f"{source}: unrecognized checkpoint layout; first keys: {', '.join(keys[:5])}")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read a `.pth`/`.pt`/`.bin` (torch), `.safetensors`, or a transformers folder (`model.safetensors` there).

    Returns:
        `(state_dict, config_or_None)`; the config is the folder's (or a sibling) `config.json` if present, a
        training checkpoint's model (`training_config`), or the model an official file is by its name.
    """
    path = _weights_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _unwrap(read_file(load_file, str(path)), str(path)), _safetensors_config(path)
    obj = load_torch_file(path)
    return _unwrap(obj, str(path)), training_config(obj) or _official_file_config(path)


def read_checkpoint_config(path: str | os.PathLike) -> dict | None:
    """The config `read_checkpoint` finds, without reading the tensors (a torch file is memory-mapped); None also
    when the file cannot be read so (loading it says why)."""
    path = _weights_file(path)
    if path.suffix == ".safetensors":
        return _safetensors_config(path)
    try:
        obj = load_torch_file(path, mmap=True)
    except ValueError:
        return None
    return training_config(obj) or _official_file_config(path)


def _weights_file(path: str | os.PathLike) -> Path:
    """The file holding a checkpoint's tensors: the path itself, or a transformers folder's `model.safetensors`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        if is_sharded_checkpoint(path):
            raise ValueError(
                f"{path} is a sharded (distributed) checkpoint; make one file first: python -m "
                f"torch.distributed.checkpoint.format_utils dcp_to_torch {path} {path.with_suffix('.pt')}"
            )
        weights = path / HF_WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{path} is a folder without {HF_WEIGHTS_NAME} (a transformers export)")
        return weights
    return path


def _safetensors_config(path: Path) -> dict | None:
    """A `.safetensors` file's model: the one its own metadata names (a depthkit file), else the `config.json` beside
    it (a transformers folder). The metadata comes first: a depthkit file beside another export's `config.json` was
    built from that config, silently (an 80 m metric model as the 20 m one)."""
    named = _metadata_config(path)
    config_path = path.parent / HF_CONFIG_NAME
    if named is not None or not config_path.is_file():
        return named
    try:
        return json.loads(config_path.read_text())
    except ValueError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err})") from None


def _model_metadata(config: DepthModelConfig) -> dict[str, str]:
    """safetensors metadata naming the model of depthkit-layout weights, when its registered name and overrides
    rebuild the config exactly (a config built by hand has no name to give)."""
    from depthkit.models.registry import config_overrides

    overrides = config_overrides(config)
    if overrides is None:
        return {"format": "pt"}
    return {"format": "pt", "depthkit_model": config.name, "depthkit_model_overrides": json.dumps(overrides)}


def _metadata_config(path: Path) -> dict | None:
    """The model a depthkit `.safetensors` names in its metadata (`_model_metadata`), else None."""
    from safetensors import safe_open

    def read_metadata(name: str) -> dict:
        with safe_open(name, "pt") as f:
            return f.metadata() or {}

    metadata = read_file(read_metadata, str(path))  # a corrupt file: one line naming it
    if "depthkit_model" not in metadata:
        return None
    overrides = json.loads(metadata.get("depthkit_model_overrides") or "{}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return {"model": metadata["depthkit_model"], "model_overrides": overrides, "named_by": "metadata"}


def _official_file_config(path: Path) -> dict | None:
    """An official weights file under its official name says which model it is: relative and metric, V1 and V2
    files of one size have the same tensor shapes, so without this a file would load into the wrong one silently.
    """
    from depthkit.models.registry import model_for_checkpoint_file

    name = model_for_checkpoint_file(path.name)
    return None if name is None else {"model": name, "model_overrides": {}, "named_by": "file name"}


def load_torch_file(path, *, mmap: bool = False):
    """`torch.load` of a checkpoint file on the CPU, tensors only (`weights_only`), through `read_file`'s one-line
    errors; `mmap=True` leaves the tensors on disk (for reading its configuration)."""
    return read_file(lambda p: torch.load(p, map_location="cpu", weights_only=True, mmap=mmap), path)


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether `path` is a folder of torch.distributed.checkpoint shards (FSDP2's `save_distributed_checkpoint`)."""
    return path.is_dir() and (path / ".metadata").is_file()


def read_file(load, path):
    """`load(path)`, with any failure of the file's format (pickle, zip, safetensors errors of many types) turned
    into a one-line `ValueError` naming the file."""
    try:
        return load(path)
    except OSError:
        raise
    except Exception as err:
        import pickle

        # torch's UnpicklingError text advises weights_only=False, i.e. running the file's code: not said here.
        detail = "" if isinstance(err, pickle.UnpicklingError) else (str(err).strip().splitlines() or [""])[0][:200]
        reason = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
        raise ValueError(f"{path} is not a readable checkpoint ({reason})") from None


def training_config(obj) -> dict | None:
    """`{"model": name, "model_overrides": {...}}` of a `depthkit fit` (Lightning) checkpoint, else None.

    LightningCLI stores the module's arguments as plain values under `hyper_parameters`; `model` is the registry
    name and `model_overrides` the config fields changed from it.
    """
    hparams = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    if not isinstance(hparams, dict) or not isinstance(hparams.get("model"), str):
        return None
    return {"model": hparams["model"], "model_overrides": dict(hparams.get("model_overrides") or {})}


def found_config_diffs(found: dict, config: DepthModelConfig) -> list[tuple[str, object, object]]:
    """(field, value in the model `found` names, value in `config`) for each field that changes outputs."""
    from depthkit.models.registry import model_config

    trained = model_config(found["model"], **found["model_overrides"])
    return list(config_diffs(inference_config(trained), inference_config(config)))


def check_training_config(
    found: dict,
    config: DepthModelConfig,
    source: str,
    hint: str = "load it with depthkit.models.load_model(checkpoint_path=...) (the commands do), which builds the "
    "model the checkpoint names; to start from its weights as another model on purpose (a fine-tuning), "
    "depthkit.models.load_checkpoint(model, path, check_config=False)",
) -> None:
    """Raise a `ValueError` if a training checkpoint was trained as a different model than `config`.

    Tensor shapes cannot tell every difference (`max_depth`, `tap_indices`, the normalization): without this, such
    a checkpoint would load into the wrong model silently. The stochastic depth rate (training only) is ignored.
    """
    diffs = [f"{field}: trained {a!r}, here {b!r}" for field, a, b in found_config_diffs(found, config)]
    if diffs:
        if found.get("named_by") == "file name":
            is_what = f"is the official {found['model']} weights file, not for the model built here"
        elif found.get("named_by") == "metadata":
            overrides = found["model_overrides"] or "no overrides"
            is_what = f"holds {found['model']} weights ({overrides}), not for the model built here"
        else:
            is_what = (
                f"was trained as {found['model']} with {found['model_overrides'] or 'no overrides'}, not as built here"
            )
        raise ValueError(f"{source} {is_what} ({'; '.join(diffs)}); {hint}")


def config_diffs(a, b, prefix: str = ""):
    """(dotted field, value in a, value in b) for each field of two config dataclasses that differs."""
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if dataclasses.is_dataclass(x):
            yield from config_diffs(x, y, f"{prefix}{field.name}.")
        elif x != y:
            yield f"{prefix}{field.name}", x, y


def inference_config(config: DepthModelConfig) -> DepthModelConfig:
    """`config` without what only training uses (the name, the stochastic depth rate): equal means same outputs."""
    return dataclasses.replace(config, name="", encoder=dataclasses.replace(config.encoder, drop_path_rate=0.0))


def check_state_dict(expected: dict[str, tuple[int, ...]], got: dict[str, torch.Tensor], source: str) -> None:
    """Strict comparison of key sets and shapes; a `ValueError` naming every missing/unexpected/mis-shaped key."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    mis_shaped = [
        f"{k} {tuple(got[k].shape)} (expected {tuple(expected[k])})"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append("missing keys: " + _list(missing))
    if unexpected:
        problems.append("unexpected keys: " + _list(unexpected))
    if mis_shaped:
        problems.append("shape mismatches: " + _list(mis_shaped))
    if problems:
        raise ValueError(f"{source} does not match the model: " + "; ".join(problems))


def convert_to_depthkit(
    state_dict: dict[str, torch.Tensor], model, source: str = "state_dict", found_config: dict | None = None
) -> dict[str, torch.Tensor]:
    """Check `state_dict` strictly against `model` in the state dict's own layout, then convert it to depthkit."""
    layout = detect_layout(state_dict, source)
    own = model.state_dict()
    if found_config is not None and "model_overrides" in found_config:
        check_training_config(found_config, model.config, source)
    if layout == "depthkit":
        expected = own
    elif layout == "official":
        expected = to_official(own, model.config)
    else:
        expected = to_hf(own, model.config)
        if found_config is not None:
            check_hf_config(found_config, model.config, source)
    check_state_dict({k: tuple(v.shape) for k, v in expected.items()}, state_dict, f"{source} ({layout} layout)")
    if layout == "official":
        return from_official(state_dict)
    if layout == "hf":
        return from_hf(state_dict)
    return dict(state_dict)


def load_state_dict(model, state_dict: dict[str, torch.Tensor], source: str = "state_dict", found_config=None):
    """Strictly load a state dict in any layout into a `DepthModel` (in place); returns the model."""
    converted = convert_to_depthkit(state_dict, model, source, found_config)
    model.load_state_dict(converted, strict=True)
    return model


def load_checkpoint(model, path: str | os.PathLike, *, check_config: bool = True):
    """Strictly load a checkpoint file or transformers folder (any layout) into a `DepthModel`; returns the model.

    `check_config=False` skips the check that a training checkpoint was trained as this very model (see
    `check_training_config`): for a training run that merely starts from its weights (a relative teacher's for a
    metric fine-tuning). Keys and shapes are checked either way.
    """
    state_dict, found_config = read_checkpoint(path)
    return load_state_dict(model, state_dict, str(path), found_config if check_config else None)


def _warn_if_lossy(config: DepthModelConfig, path: Path) -> None:
    """A torch weights file holds tensors only: warn when the model differs from its registered name in a way the
    tensors do not show (`max_depth`, ...), which a later load by name would silently get wrong."""
    from depthkit.models.registry import list_models, model_config

    if config.name not in list_models():
        return
    diffs = list(config_diffs(inference_config(model_config(config.name)), inference_config(config)))
    if diffs:
        changed = ", ".join(f"{field}={value!r}" for field, _, value in diffs)
        warnings.warn(
            f"{path} keeps the weights only, not this model's {changed} (registered {config.name} differs): load it "
            f"with those overrides, or save a .safetensors file, which records them",
            stacklevel=3,
        )


def save_checkpoint(model, path: str | os.PathLike, layout: str = "official") -> Path:
    """Save a `DepthModel`'s weights.

    Args:
        model: The model.
        path: A `.pth` file ("official", "depthkit"), a `.safetensors` file ("depthkit"), or a folder ("hf":
            `model.safetensors` + `config.json`, loadable by `DepthAnythingForDepthEstimation.from_pretrained`).
        layout: "official", "depthkit" or "hf".

    Returns:
        The weights file written.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    path = Path(path).expanduser()
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if layout == "hf":
        from safetensors.torch import save_file

        tensors = {k: v.contiguous().clone() for k, v in to_hf(state_dict, model.config).items()}
        path.mkdir(parents=True, exist_ok=True)
        _write_atomic(path / HF_WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        config_text = json.dumps(hf_config(model.config), indent=2) + "\n"
        _write_atomic(path / HF_CONFIG_NAME, lambda tmp: tmp.write_text(config_text))
        return path / HF_WEIGHTS_NAME
    if layout == "official":
        state_dict = to_official(state_dict, model.config)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in state_dict.items()}
        _write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=_model_metadata(model.config)))
    else:
        _warn_if_lossy(model.config, path)
        _write_atomic(path, lambda tmp: torch.save(state_dict, tmp))
    return path


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename it into place: never a half-written file."""
    with replacing(path, fsync=True) as tmp:
        write(tmp)


def encoder_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DINOv2 encoder's weights (depthkit/timm key names) from an original DINOv2 checkpoint
    (`dinov2_vits14_pretrain.pth`), an official Depth Anything checkpoint (`pretrained.*`) or a depthkit one.
    """
    if any(k.startswith(_OFFICIAL_ENCODER) for k in state_dict):
        return {
            _encoder_from_official_key(k[len(_OFFICIAL_ENCODER) :]): v
            for k, v in state_dict.items()
            if k.startswith(_OFFICIAL_ENCODER)
        }
    if any(k.startswith("encoder.") for k in state_dict):
        return {k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    if "cls_token" in state_dict or "pos_embed" in state_dict:  # original DINOv2 (or a bare depthkit encoder)
        return {_encoder_from_official_key(k): v for k, v in state_dict.items()}
    raise ValueError(f"no DINOv2 encoder weights found; first keys: {', '.join(list(state_dict)[:5])}")
