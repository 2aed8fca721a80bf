"""depthkit.models: DINOv2 + DPT depth models in the Depth Anything layout, checkpoints and inference.

    from depthkit.models import create_model
    model = create_model("dav2_vits", pretrained=True)   # weights from ~/.cache/depthkit/checkpoints, no download
    pred = model.infer(image_uint8_HWC)                  # Prediction(values=H x W float32, output_space=...)

See `registry` for the model names, `checkpoint` for the official / transformers layouts, `depth_model` for the
`DepthModel` interface (`forward`, `normalize`, `forward_with_features`, `infer`, `meta`), `meta` for `ModelMeta`
(standard library only: the torch-free ONNX runtime uses it).

The names below are imported lazily (PEP 562), so `depthkit.models.commands` (and `depthkit --help`) does not pay
for importing torch and timm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from depthkit._lazy import lazy_exports

_EXPORTS = {
    "create_model": "registry",
    "load_model": "registry",
    "create_encoder": "registry",
    "list_models": "registry",
    "model_config": "registry",
    "register_model": "registry",
    "checkpoint_filename": "registry",
    "DepthModel": "depth_model",
    "ModelMeta": "meta",
    "Prediction": "depth_model",
    "DinoV2Encoder": "dinov2",
    "DepthModelConfig": "config",
    "DPTHeadConfig": "config",
    "EncoderConfig": "config",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
}
__all__ = [
    "DPTHeadConfig",
    "DepthModel",
    "DepthModelConfig",
    "DinoV2Encoder",
    "EncoderConfig",
    "ModelMeta",
    "Prediction",
    "checkpoint_filename",
    "create_encoder",
    "create_model",
    "list_models",
    "load_checkpoint",
    "load_model",
    "model_config",
    "register_model",
    "save_checkpoint",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from depthkit.models.checkpoint import load_checkpoint, save_checkpoint
    from depthkit.models.config import DepthModelConfig, DPTHeadConfig, EncoderConfig
    from depthkit.models.depth_model import DepthModel, Prediction
    from depthkit.models.dinov2 import DinoV2Encoder
    from depthkit.models.meta import ModelMeta
    from depthkit.models.registry import (
        checkpoint_filename,
        create_encoder,
        create_model,
        list_models,
        load_model,
        model_config,
        register_model,
    )


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
