"""What a depthkit ONNX graph says about itself: the `metadata_props` schema, written by `exporter`, read by `runtime`.

Standard library and the torch-free `depthkit.models.meta` only, so the torch-free runtime can import it. `GraphMeta`
is the exported model's `ModelMeta` plus the facts of the export. Every value is a string (ONNX stores strings): text
fields as they are, numbers and lists as JSON. The keys and encodings are fixed by format 1: graphs exported by any
earlier depthkit load unchanged (`tests/export/test_export.py` holds a format-1 graph's props byte for byte).

| key | value |
| --- | --- |
| `depthkit_onnx_format` | "1"; bumped when the graph contract below changes |
| `depthkit_version` | the depthkit that exported the graph |
| `model_name` | registry name, e.g. "dav2_vits" |
| `output_space` | a `depthkit.spaces` name; also the graph's output name |
| `patch_size` | JSON int (14) |
| `mean`, `std` | JSON lists of 3 floats: input normalization for RGB in [0, 1] |
| `max_depth` | JSON float (metric models) or `null` |
| `precision` | "fp32" or "fp16" (the weights and compute; inputs and outputs are always float32) |
| `dynamic_axes` | JSON list, a subset of ["batch", "height", "width"] |
| `input_size_hw` | JSON [h, w]: the size the graph was traced at (the only size of a static graph) |
| `non_multiple_policy` | "pad": see `depthkit.export.exporter` (zero-pad bottom/right, crop the output) |

Graph contract (format 1): input `image`, float32 `B x 3 x H x W`, RGB normalized with `mean`/`std`; output named
after `output_space`, float32 `B x H x W`, same H and W as the input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from depthkit.models.meta import ModelMeta

FORMAT_VERSION = "1"
INPUT_NAME = "image"
AXES = ("batch", "height", "width")
PRECISIONS = ("fp32", "fp16")
NON_MULTIPLE_POLICY = "pad"
_REQUIRED = ("depthkit_onnx_format", "model_name", "output_space", "patch_size", "mean", "std", "max_depth")
RECORDED_MODEL_FIELDS = ("name", "output_space", "patch_size", "mean", "std", "max_depth")
"""The `ModelMeta` fields a graph records (`name` as `model_name`); it does not record `embed_dim`."""


@dataclass(frozen=True)
class GraphMeta(ModelMeta):
    """The metadata of an exported graph: the exported model's `ModelMeta` plus the facts of the export.

    A `GraphMeta` is a `ModelMeta`, so `OnnxDepthModel.meta` reads like `DepthModel.meta`: `name`, `output_space`,
    `patch_size`, `mean`, `std` and `max_depth` are the model's (`RECORDED_MODEL_FIELDS`). The graph does not record
    `embed_dim` (it has no token output), so it is None here. Build one with `from_model_meta`.
    """

    embed_dim: int | None = None
    """Not recorded in the graph (it outputs no tokens): None."""
    precision: str = "fp32"
    """"fp32" or "fp16" inside the graph; its inputs and outputs are float32 either way."""
    dynamic_axes: tuple[str, ...] = AXES
    """Which of batch, height, width may vary at run time."""
    input_size_hw: tuple[int, int] | None = None
    """The size the graph was traced at; a graph without dynamic height/width takes only this size."""
    depthkit_version: str = ""
    """The depthkit that exported it."""
    non_multiple_policy: str = NON_MULTIPLE_POLICY
    """What the graph does with H, W that are not multiples of `patch_size` ("pad")."""

    @classmethod
    def from_model_meta(cls, model: ModelMeta, **export) -> GraphMeta:
        """What a graph of a model whose `meta` is `model` records: its `RECORDED_MODEL_FIELDS`, and the export
        fields given as keywords (`precision`, `dynamic_axes`, `input_size_hw`, `depthkit_version`,
        `non_multiple_policy`; the defaults above for the others)."""
        return cls(**{name: getattr(model, name) for name in RECORDED_MODEL_FIELDS}, **export)


def to_props(meta: GraphMeta) -> dict[str, str]:
    """`GraphMeta` -> the string dict stored as the graph's `metadata_props`."""
    return {
        "depthkit_onnx_format": FORMAT_VERSION,
        "depthkit_version": meta.depthkit_version,
        "model_name": meta.name,
        "output_space": meta.output_space,
        "patch_size": json.dumps(int(meta.patch_size)),
        "mean": json.dumps([float(v) for v in meta.mean]),
        "std": json.dumps([float(v) for v in meta.std]),
        "max_depth": json.dumps(None if meta.max_depth is None else float(meta.max_depth)),
        "precision": meta.precision,
        "dynamic_axes": json.dumps(list(meta.dynamic_axes)),
        "input_size_hw": json.dumps(None if meta.input_size_hw is None else [int(v) for v in meta.input_size_hw]),
        "non_multiple_policy": meta.non_multiple_policy,
    }


def from_props(props: dict[str, str], source: str = "graph") -> GraphMeta:
    """The string dict of `metadata_props` -> `GraphMeta`, with a `ValueError` for a graph depthkit did not export."""
    missing = [k for k in _REQUIRED if k not in props]
    if missing:
        raise ValueError(
            f"{source} is not a depthkit ONNX export (metadata_props lack {', '.join(missing)}); export it with "
            "`depthkit export onnx`"
        )
    if props["depthkit_onnx_format"] != FORMAT_VERSION:
        raise ValueError(
            f"{source} has depthkit ONNX format {props['depthkit_onnx_format']!r}; this depthkit reads "
            f"{FORMAT_VERSION!r}: re-export it"
        )
    try:
        size = json.loads(props.get("input_size_hw", "null"))
        max_depth = json.loads(props["max_depth"])
        return GraphMeta(
            name=props["model_name"],
            output_space=props["output_space"],
            patch_size=int(json.loads(props["patch_size"])),
            mean=tuple(float(v) for v in json.loads(props["mean"])),
            std=tuple(float(v) for v in json.loads(props["std"])),
            max_depth=None if max_depth is None else float(max_depth),
            precision=props.get("precision", "fp32"),
            dynamic_axes=tuple(json.loads(props.get("dynamic_axes", json.dumps(list(AXES))))),
            input_size_hw=None if size is None else (int(size[0]), int(size[1])),
            depthkit_version=props.get("depthkit_version", ""),
            non_multiple_policy=props.get("non_multiple_policy", NON_MULTIPLE_POLICY),
        )
    except (TypeError, ValueError, IndexError) as err:
        raise ValueError(f"{source} has malformed depthkit metadata: {err}") from None
