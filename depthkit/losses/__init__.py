"""depthkit.losses: depth training losses, functions first, thin modules on top.

Every loss function takes `pred_BHW, target_BHW, valid_BHW` (bool) plus keyword options, including
`impl="auto" | "triton" | "torch"` (fused Triton kernels from `depthkit_kernels` on CUDA, their plain-torch
reference elsewhere), and returns a `dict[str, Tensor]`:
- "loss": fp32 scalar. Per image first, then the mean over images with valid pixels; an all-invalid batch gives
  a zero that is still connected to the graph (never an int, never NaN).
- "loss_per_image": B values (0 for images without valid pixels), "num_valid": B counts.
- op-specific terms (alignment scale/shift, per-term values, ...).

Spaces: the SSI losses and gradient matching work on disparity (affine-invariant training, prediction and
target both disparity-like); SiLog works on metric depth. Targets never receive gradients.

| function | what |
| --- | --- |
| `ssi_lsq_loss` | SSI, least-squares scale/shift (MiDaS), mse or l1, optional trim |
| `ssi_median_loss` | SSI, median/MAD normalization (Depth Anything V1), l1 or mse, optional trim |
| `ssi_trimmed_loss` | SSI dropping the 10% largest per-pixel losses per image (Depth Anything V2 pseudo-labels) |
| `gradient_matching_loss` | multi-scale gradient matching (4 scales), optionally on the aligned residual |
| `feature_alignment_loss` | 1 - cosine per patch vs frozen DINOv2 features, tolerance 0.85 |
| `silog_loss` | scale-invariant log loss (metric fine-tuning), lambda 0.5 |
| `cutmix_loss` | any of the above per CutMix region, averaged by area |
| `DepthLossConfig`, `DepthLoss` | the composite training loss; presets in `PRESETS` / `preset()` |
"""

from .cutmix import cutmix_loss
from .depth_loss import PRESETS, DepthLoss, DepthLossConfig, depth_loss_terms, preset
from .feature import FeatureAlignmentLoss, feature_alignment_loss
from .gradient import gradient_matching_loss
from .reduction import mean_over_images
from .silog import SiLogLoss, silog_loss
from .ssi import ssi_lsq_loss, ssi_median_loss, ssi_trimmed_loss

__all__ = [
    "PRESETS",
    "DepthLoss",
    "DepthLossConfig",
    "FeatureAlignmentLoss",
    "SiLogLoss",
    "cutmix_loss",
    "depth_loss_terms",
    "feature_alignment_loss",
    "gradient_matching_loss",
    "mean_over_images",
    "preset",
    "silog_loss",
    "ssi_lsq_loss",
    "ssi_median_loss",
    "ssi_trimmed_loss",
]
