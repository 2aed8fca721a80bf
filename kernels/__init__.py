"""depthkit_kernels: fused Triton ops for depth losses, each with a plain-torch reference (its spec).

Depends on torch and triton only; never imports depthkit.

Each op has three layers (Liger style): Triton kernels + launcher, a `torch.autograd.Function` with a fused
backward, and one dispatch function taking `impl="auto" | "triton" | "torch"` ("auto": Triton on CUDA tensors,
the reference elsewhere; "triton" on CPU needs `TRITON_INTERPRET=1`). The dispatch functions return per-image
results (NamedTuples of B-sized tensors); the batch reductions live in `depthkit.losses`. Inputs may be fp32,
bf16 or fp16 (math in fp32; gradients in the input dtype); non-contiguous inputs are copied first.

Shape suffixes: B images, H x W pixels, N patches, D channels.

| op | dispatch | autograd.Function | reference (spec) |
| --- | --- | --- | --- |
| least-squares SSI | `ssi_lsq` | `SSILsqFunction` | `reference.ssi_lsq_reference` |
| median/MAD SSI | `ssi_median` | `SSIMedianFunction` | `reference.ssi_median_reference` |
| gradient matching | `gradient_matching` | `GradientMatchingFunction` | `reference.gradient_matching_reference` |
| feature alignment | `feature_alignment` | `FeatureAlignmentFunction` | `reference.feature_alignment_reference` |
| masked lower median | `masked_median` | (no gradient) | `reference.masked_lower_median` |
"""

from __future__ import annotations

import torch

from . import reference
from ._common import IMPLS, check_maps, interpreter_enabled, use_triton, valid_bytes
from .feature_alignment import FeatureAlignmentFunction, FeatureAlignmentOutput, feature_alignment
from .gradient_matching import GradientMatchingFunction, GradientMatchingOutput, gradient_matching
from .select import MODE_MEDIAN, radix_select
from .ssi import LsqSSIOutput, MedianSSIOutput, SSILsqFunction, SSIMedianFunction, ssi_lsq, ssi_median


def masked_median(x_BHW: torch.Tensor, valid_BHW: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Lower median of the valid values of each image (fp32, 0 where none), exact; no gradient.

    Triton: sample, partition, radix select over the candidates (`select.py`); no sort of the image.
    Reference: `reference.masked_lower_median`.
    """
    check_maps("masked_median", x_BHW, x_BHW, valid_BHW)
    if use_triton("masked_median", impl, x_BHW, valid_BHW):
        x_BM = x_BHW.detach().contiguous().view(x_BHW.shape[0], -1)  # B x HW
        values_B, _ = radix_select([x_BM], valid_bytes(valid_BHW), mode=MODE_MEDIAN)
        return values_B
    return reference.masked_lower_median(x_BHW.detach(), valid_BHW)


__all__ = [
    "IMPLS",
    "FeatureAlignmentFunction",
    "FeatureAlignmentOutput",
    "GradientMatchingFunction",
    "GradientMatchingOutput",
    "LsqSSIOutput",
    "MedianSSIOutput",
    "SSILsqFunction",
    "SSIMedianFunction",
    "feature_alignment",
    "gradient_matching",
    "interpreter_enabled",
    "masked_median",
    "reference",
    "ssi_lsq",
    "ssi_median",
]
