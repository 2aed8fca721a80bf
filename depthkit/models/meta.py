"""`ModelMeta`: what every stage reads from a model (name, output space, patch size, normalization, ...).

Standard library only (no torch, no timm), so the torch-free ONNX Runtime path can use it: an exported graph's
metadata (`depthkit.export.metadata.GraphMeta`) is a `ModelMeta` plus the facts of the export. `DepthModel.meta` is
one; `depthkit.models.ModelMeta` and `depthkit.models.depth_model.ModelMeta` are this class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from depthkit.models.config import DepthModelConfig


@dataclass(frozen=True)
class ModelMeta:
    """What every stage reads from a model instead of hard-coding it."""

    name: str
    """Registry name."""
    output_space: str
    """A `depthkit.spaces` name: `affine_disparity` for relative models, `metric_depth` for metric ones."""
    patch_size: int
    """Input H and W must be multiples of this."""
    mean: tuple[float, float, float]
    """Normalization mean for RGB images in [0, 1]."""
    std: tuple[float, float, float]
    """Normalization std."""
    max_depth: float | None
    """Metric models: the output range (0, max_depth) metres; None for relative models."""
    embed_dim: int
    """Encoder token width D (of `tokens_BND` from `forward_with_features`)."""

    @classmethod
    def from_config(cls, config: DepthModelConfig) -> ModelMeta:
        """The metadata a `DepthModel(config)` carries, without building the model."""
        return cls(
            name=config.name,
            output_space=config.output_space,
            patch_size=config.encoder.patch_size,
            mean=config.mean,
            std=config.std,
            max_depth=config.max_depth,
            embed_dim=config.encoder.embed_dim,
        )
