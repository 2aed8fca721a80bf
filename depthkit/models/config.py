"""Frozen, keyword-only configs of the depth models: encoder, DPT head and the whole model.

A registry entry (`depthkit.models.registry`) returns a `DepthModelConfig`; `DepthModel(config)` builds it. The
configs hold primitives only, so a checkpoint (or a LightningCLI YAML) can rebuild its model from them.
"""

from __future__ import annotations

from dataclasses import dataclass

from depthkit.spaces import AFFINE_DISPARITY, METRIC_DEPTH, check_space

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FFN_KINDS = ("mlp", "swiglu")
HEAD_ACTIVATIONS = ("relu", "sigmoid")


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """A DINOv2 ViT (timm blocks, original DINOv2 token and position-embedding semantics)."""

    embed_dim: int = 384
    """Token width D."""
    depth: int = 12
    """Number of transformer blocks."""
    num_heads: int = 6
    """Attention heads per block."""
    mlp_ratio: float = 4.0
    """FFN hidden width over D (for "swiglu" DINOv2's 2/3 rule and rounding to 8 apply on top)."""
    ffn: str = "mlp"
    """FFN kind: "mlp" (GELU; ViT-S/B/L) or "swiglu" (ViT-g)."""
    patch_size: int = 14
    """Patch size in pixels; input H and W must be multiples of it."""
    img_size: int = 518
    """Pre-training resolution: the learned position embedding holds (img_size / patch_size)**2 + 1 entries."""
    num_register_tokens: int = 0
    """Register tokens (DINOv2-reg); 0 for the DINOv2 that Depth Anything uses."""
    init_values: float = 1.0
    """Layer-scale initial value (Depth Anything builds DINOv2 with 1.0)."""
    interpolate_offset: float = 0.1
    """DINOv2's position-embedding resize offset; 0.1 reproduces the official checkpoints' outputs exactly."""
    interpolate_antialias: bool = False
    """Antialiased bicubic position-embedding resize: False in DINOv2 and Depth Anything; DINOv2-reg is built with
    True (and `interpolate_offset=0.0`, `num_register_tokens=4`)."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate over the blocks (0 in Depth Anything)."""

    def __post_init__(self) -> None:
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn={self.ffn!r} is not one of {FFN_KINDS}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={self.drop_path_rate!r} is not a probability in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class DPTHeadConfig:
    """The Depth Anything DPT head (reassemble, fuse refinenet4 -> refinenet1, output convs)."""

    features: int = 64
    """Fusion width (`features` in the official code)."""
    out_channels: tuple[int, int, int, int] = (48, 96, 192, 384)
    """Widths of the four reassembled maps (at 4x, 2x, 1x and 1/2x the patch grid)."""
    head_hidden: int = 32
    """Width of the last hidden conv (`head_features_2`)."""
    use_bn: bool = False
    """BatchNorm inside the residual conv units (False in every official model)."""
    use_clstoken: bool = False
    """Class-token readout: concat the class token to each patch token, then Linear + GELU (False officially)."""
    activation: str = "relu"
    """Last activation inside the head: "relu" (relative models) or "sigmoid" (metric models)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_channels", tuple(int(c) for c in self.out_channels))
        if len(self.out_channels) != 4:
            raise ValueError(f"out_channels needs 4 widths, got {self.out_channels}")
        if self.activation not in HEAD_ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not one of {HEAD_ACTIVATIONS}")


@dataclass(frozen=True, kw_only=True)
class DepthModelConfig:
    """A whole depth model: encoder, which blocks the head taps, head, output space and input normalization."""

    name: str
    """Registry name, e.g. "dav2_vits"; also `model.meta.name`."""
    encoder: EncoderConfig
    """The DINOv2 encoder."""
    head: DPTHeadConfig
    """The DPT head."""
    tap_indices: tuple[int, int, int, int]
    """Encoder blocks (0-based) whose normed outputs feed the head: V2 vits/vitb [2, 5, 8, 11], V1 the last four."""
    output_space: str = AFFINE_DISPARITY
    """A `depthkit.spaces` name: relative models give affine-invariant disparity, metric ones metric depth."""
    max_depth: float | None = None
    """Metric models only: the output is sigmoid(...) * max_depth metres (20 indoor, 80 outdoor)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Input normalization mean (RGB, images in [0, 1])."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Input normalization std."""

    def __post_init__(self) -> None:
        check_space(self.output_space)
        object.__setattr__(self, "tap_indices", tuple(int(i) for i in self.tap_indices))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.tap_indices) != 4:
            raise ValueError(f"tap_indices needs 4 block indices, got {self.tap_indices}")
        bad = [i for i in self.tap_indices if not 0 <= i < self.encoder.depth]
        if bad:
            raise ValueError(f"tap_indices {bad} are outside the encoder's {self.encoder.depth} blocks")
        if list(self.tap_indices) != sorted(set(self.tap_indices)):
            raise ValueError(f"tap_indices must be increasing block indices, got {self.tap_indices}")
        if self.output_space == METRIC_DEPTH:
            if self.max_depth is None or self.max_depth <= 0:
                raise ValueError(f"a metric_depth model needs max_depth > 0, got {self.max_depth}")
            if self.head.activation != "sigmoid":
                raise ValueError("a metric_depth model needs head activation 'sigmoid' (output = sigmoid * max_depth)")
        else:
            if self.max_depth is not None:
                raise ValueError(f"max_depth is only for metric_depth models; {self.output_space} takes None")
            if self.head.activation != "relu":
                raise ValueError(f"a {self.output_space} model needs head activation 'relu'")
