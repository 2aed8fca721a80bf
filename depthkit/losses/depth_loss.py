"""The composite depth loss that training uses: one frozen config, one module.

Presets (also shipped as `configs/loss/<name>.yaml`, kept equal by a test):

- `midas`: least-squares SSI, mse, + 1.0 x gradient matching (4 scales). MiDaS (Ranftl et al.). MiDaS's code
  computes 0.5 * (its sum r^2 / 2n) + 0.5 * gradient = 0.5 x this loss when every image has as many valid pixels; a
  constant factor only rescales the step size (and changes nothing under Adam). Its default reduction is batch-based
  (sums over the batch over its valid pixels: an image weighs by its valid count); depthkit's is per image, then the
  mean over images (`reduction.py`), so a sparse LiDAR image weighs as much as a dense one. Start it from a
  pretrained encoder, as MiDaS did: from random init the least-squares scale of a noisy prediction is near 0, and
  gradient matching through that scale drives it to 0, where every gradient vanishes (measured: one batch of 8
  synthetic scenes, test_dav2, Adam 1e-3; the SSI term stays at the target's variance for 150 steps, while
  `gradient_weight=0` brings it down 70x). From scratch, train with `dav2` or warm up with `gradient_weight=0`.
- `dav1`: median/MAD SSI, l1. Depth Anything V1, labeled and pseudo-labeled images alike (its feature
  alignment is a separate term: `feature_alignment_loss`).
- `dav2`: median/MAD SSI, l1, + 2.0 x gradient matching. Depth Anything V2 on labeled synthetic images (the
  paper's 1:2 ratio).
- `dav2_pseudo`: `dav2` with trim 0.1. Depth Anything V2 on pseudo-labeled real images: the 10% largest
  per-pixel losses of each image are ignored.
- `metric_silog`: SiLog, lambda 0.5. Depth Anything V2 metric-depth fine-tuning.

Affine-invariant objectives ("ssi") train on disparity: prediction and target are disparity-like maps
(`depthkit.spaces.AFFINE_DISPARITY`); "silog" takes metric depth (`depthkit.spaces.METRIC_DEPTH`).
Depth Anything V2 does not publish its relative-depth training code. The median/MAD alignment for its SSI term
and the gradient term follow its paper's description and V1's loss; the same group's released loss
(Video-Depth-Anything, `loss/loss.py`: median/MAD SSI with L1 plus MiDaS's 4-scale gradient term on the
normalized maps) gives the same value as `dav2` (checked to 1e-7 on one image with a full mask). Its trimmed
variant divides the kept sum by all pixels; depthkit divides by the kept count, as the V2 authors describe
(Depth-Anything-V2#108). The authors also pointed to MiDaS's least-squares loss (Depth-Anything-V2#137):
`alignment: lsq` is that reading.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from depthkit_kernels.reference import trim_in_range

from .cutmix import cutmix_loss
from .gradient import gradient_matching_loss
from .reduction import mean_over_images
from .silog import silog_loss
from .ssi import ssi_lsq_loss, ssi_median_loss


@dataclass(frozen=True, kw_only=True)
class DepthLossConfig:
    """Composite depth loss: an SSI (or SiLog) data term plus optional multi-scale gradient matching."""

    objective: Literal["ssi", "silog"] = "ssi"
    """"ssi": scale-and-shift-invariant loss on disparity (relative depth); "silog": SiLog on metric depth."""
    alignment: Literal["lsq", "median"] = "median"
    """SSI alignment per image: "lsq" least-squares scale and shift (MiDaS) or "median" median/MAD (Depth Anything)."""
    metric: Literal["mse", "l1"] = "l1"
    """Per-pixel penalty of the aligned residual: "mse" (squared) or "l1" (absolute)."""
    trim: float = 0.0
    """Fraction of the largest per-pixel SSI losses ignored per image, in [0, 1) (DA V2 pseudo-labels: 0.1)."""
    gradient_weight: float = 0.0
    """Weight of multi-scale gradient matching on the aligned residual (0 disables; Depth Anything V2: 2.0)."""
    num_scales: int = 4
    """Scales of gradient matching (strides 1, 2, 4, ...)."""
    silog_lambda: float = 0.5
    """Variance focus of SiLog (objective "silog" only)."""
    impl: Literal["auto", "triton", "torch"] = "auto"
    """Kernels: "auto" (fused Triton on CUDA, plain torch elsewhere), "triton" or "torch"."""

    def __post_init__(self):
        for name in ("trim", "gradient_weight", "silog_lambda"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"DepthLossConfig: {name}={value!r} must be a number")
        if self.objective not in ("ssi", "silog"):
            raise ValueError(f"DepthLossConfig: objective={self.objective!r} is not 'ssi' or 'silog'")
        if self.alignment not in ("lsq", "median"):
            raise ValueError(f"DepthLossConfig: alignment={self.alignment!r} is not 'lsq' or 'median'")
        if self.metric not in ("mse", "l1"):
            raise ValueError(f"DepthLossConfig: metric={self.metric!r} is not 'mse' or 'l1'")
        if not trim_in_range(self.trim):
            raise ValueError(f"DepthLossConfig: trim={self.trim} must be in [0, 1) (also in fp32)")
        if not 0 <= self.gradient_weight < float("inf"):  # also refuses NaN, which would drop the term silently
            raise ValueError(f"DepthLossConfig: gradient_weight={self.gradient_weight} must be >= 0 and finite")
        if isinstance(self.num_scales, bool) or not isinstance(self.num_scales, int) or not 1 <= self.num_scales <= 8:
            raise ValueError(f"DepthLossConfig: num_scales={self.num_scales!r} must be an integer in [1, 8]")
        if not 0 <= self.silog_lambda <= 1:
            raise ValueError(f"DepthLossConfig: silog_lambda={self.silog_lambda} must be in [0, 1]")
        if self.impl not in ("auto", "triton", "torch"):
            raise ValueError(f"DepthLossConfig: impl={self.impl!r} is not 'auto', 'triton' or 'torch'")
        if self.objective == "silog" and (self.trim > 0 or self.gradient_weight > 0 or self.impl == "triton"):
            raise ValueError(
                f"DepthLossConfig: objective='silog' takes no trim, no gradient term and no Triton impl, got "
                f"trim={self.trim}, gradient_weight={self.gradient_weight}, impl={self.impl!r} (a loss config that "
                "leaves a field out keeps the module's default loss's value: set every field, as configs/loss/ does)"
            )


PRESETS: dict[str, DepthLossConfig] = {
    "midas": DepthLossConfig(alignment="lsq", metric="mse", gradient_weight=1.0),
    "dav1": DepthLossConfig(alignment="median", metric="l1"),
    "dav2": DepthLossConfig(alignment="median", metric="l1", gradient_weight=2.0),
    "dav2_pseudo": DepthLossConfig(alignment="median", metric="l1", trim=0.1, gradient_weight=2.0),
    "metric_silog": DepthLossConfig(objective="silog", silog_lambda=0.5),
}


def preset(name: str, **overrides) -> DepthLossConfig:
    """A preset config by name (see the module docstring), with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown loss preset {name!r}; expected one of {', '.join(PRESETS)}")
    fields = [f.name for f in dataclasses.fields(DepthLossConfig)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"preset {name!r}: unknown field(s) {', '.join(unknown)}; fields: {', '.join(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def depth_loss_terms(
    pred_BHW: torch.Tensor, target_BHW: torch.Tensor, valid_BHW: torch.Tensor, *, config: DepthLossConfig
) -> dict[str, torch.Tensor]:
    """The composite loss of `config` on one region (no CutMix handling); see `DepthLoss`."""
    if config.objective == "silog":
        out = silog_loss(pred_BHW, target_BHW, valid_BHW, lambd=config.silog_lambda, impl=config.impl)
        return {**out, "silog": out["loss"], "silog_per_image": out["loss_per_image"]}
    if config.alignment == "lsq":
        data = ssi_lsq_loss(pred_BHW, target_BHW, valid_BHW, metric=config.metric, trim=config.trim, impl=config.impl)
        pred_scale_B, target_scale_B = data["scale"], None
    else:
        data = ssi_median_loss(
            pred_BHW, target_BHW, valid_BHW, metric=config.metric, trim=config.trim, impl=config.impl
        )
        pred_scale_B, target_scale_B = data["pred_scale"], data["target_scale"]
    terms = {"ssi": data["loss"], "ssi_per_image": data["loss_per_image"]}
    loss_B = data["loss_per_image"]
    if config.gradient_weight > 0:
        grad = gradient_matching_loss(
            pred_BHW,
            target_BHW,
            valid_BHW,
            num_scales=config.num_scales,
            pred_scale_B=pred_scale_B,
            target_scale_B=target_scale_B,
            impl=config.impl,
        )
        terms.update(gradient=grad["loss"], gradient_per_image=grad["loss_per_image"])
        loss_B = loss_B + config.gradient_weight * grad["loss_per_image"]
    num_valid_B = data["num_valid"]
    return {"loss": mean_over_images(loss_B, num_valid_B), "loss_per_image": loss_B, "num_valid": num_valid_B, **terms}


class DepthLoss(nn.Module):
    """The training loss: `DepthLossConfig` applied per image, CutMix-aware.

    forward(pred_BHW, target_BHW, valid_BHW, cutmix_mask_BHW=None) returns a dict with "loss" (the scalar to
    back-propagate), "loss_per_image", "num_valid" and each term ("ssi" and, when weighted, "gradient"; or
    "silog"), unweighted, with their "<term>_per_image". With `cutmix_mask_BHW` (bool, True where the pixel
    comes from the partner image) every term is computed per region, with its own alignment, and averaged by
    area (`cutmix_loss`); "loss_own" / "loss_partner" / "mixed_fraction" are added.

    For SSI the gradient term sits on the aligned residual: s * pred + t - target (lsq) or
    pred_hat - target_hat (median/MAD), with gradients through the alignment.
    """

    def __init__(self, config: DepthLossConfig | str | None = None):
        super().__init__()
        if isinstance(config, str):  # a preset's name
            config = preset(config)
        elif config is not None and not isinstance(config, DepthLossConfig):
            raise ValueError(f"DepthLoss: expected a DepthLossConfig or a preset name, got {type(config).__name__}")
        self.config = config if config is not None else DepthLossConfig()

    def forward(
        self,
        pred_BHW: torch.Tensor,
        target_BHW: torch.Tensor,
        valid_BHW: torch.Tensor,
        cutmix_mask_BHW: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if cutmix_mask_BHW is None:
            return depth_loss_terms(pred_BHW, target_BHW, valid_BHW, config=self.config)
        return cutmix_loss(depth_loss_terms, pred_BHW, target_BHW, valid_BHW, cutmix_mask_BHW, config=self.config)

    def extra_repr(self) -> str:
        return repr(self.config)
