"""`DepthModel`: DINOv2 encoder + DPT head, with its metadata and the inference API.

- `model(image_BCHW)` takes a *normalized* image (H, W multiples of `meta.patch_size`) and returns `B x H x W` in
  `model.meta.output_space` (relative models: affine-invariant disparity; metric models: metres).
- `model.normalize(image01_BCHW)` applies `meta.mean` / `meta.std` to images in [0, 1].
- `model.forward_with_features(image_BCHW)` also returns the encoder's final normed patch tokens (`tokens_BND`),
  the same format as `create_encoder(...).forward_patch_tokens(...)`, for feature alignment.
- `model.infer(images, input_size=518)` runs the official preprocessing on any mix of image sizes, on the model's
  current device, and returns `Prediction`s at the original sizes.

Shape legend: B batch, C channels, H/W image size, h/w patch grid, N = h*w patch tokens, D token width.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from depthkit.models.config import DepthModelConfig
from depthkit.models.dinov2 import DinoV2Encoder
from depthkit.models.dpt_head import DPTHead
from depthkit.models.meta import ModelMeta  # torch-free (the ONNX runtime reads it); importable from here too
from depthkit.models.preprocess import official_resize_hw, resize_image, to_float_chw
from depthkit.spaces import METRIC_DEPTH


@dataclass(frozen=True)
class Prediction:
    """One image's prediction at its original size."""

    values: np.ndarray
    """float32 `H x W`."""
    output_space: str
    """The space of `values` (see `depthkit.spaces`)."""


class DepthModel(nn.Module):
    """Depth Anything-style monocular depth model.

    `state_dict()` is the depthkit layout (`encoder.*` timm-style, `head.*` official names); the official and
    transformers layouts are one `depthkit.models.checkpoint` call away. Two official parameters are unused in
    the forward and created with `requires_grad=False`: `encoder.mask_token` and
    `head.scratch.refinenet4.resConfUnit1.*` (re-enabling them with `requires_grad_(True)` needs DDP's
    `find_unused_parameters`).

    Args:
        config: The architecture; `depthkit.models.create_model` builds one from a registry name.
    """

    def __init__(self, config: DepthModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = DinoV2Encoder(config.encoder)
        self.head = DPTHead(config.encoder.embed_dim, config.head, patch_size=config.encoder.patch_size)
        self.meta = ModelMeta.from_config(config)

    def normalize(self, image01_BCHW: torch.Tensor) -> torch.Tensor:
        """(image - mean) / std with the model's normalization, on the image's device and dtype (floating: values
        in [0, 1])."""
        if not image01_BCHW.is_floating_point():
            raise ValueError(f"normalize takes a float image in [0, 1], got {image01_BCHW.dtype} (divide by 255 first)")
        mean_13 = torch.tensor(self.meta.mean, device=image01_BCHW.device, dtype=image01_BCHW.dtype)
        std_13 = torch.tensor(self.meta.std, device=image01_BCHW.device, dtype=image01_BCHW.dtype)
        return (image01_BCHW - mean_13.view(1, 3, 1, 1)) / std_13.view(1, 3, 1, 1)

    def _forward(self, image_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.encoder.check_image_size(image_BCHW)
        grid_hw = (image_BCHW.shape[-2] // self.meta.patch_size, image_BCHW.shape[-1] // self.meta.patch_size)
        final_BTD, taps = self.encoder.forward_intermediates(
            image_BCHW,
            indices=list(self.config.tap_indices),
            return_prefix_tokens=True,
            norm=True,
            output_fmt="NLC",
        )
        features = [(tokens_BND, prefix_BPD[:, 0]) for tokens_BND, prefix_BPD in taps]
        out_B1HW = self.head(features, grid_hw)
        if self.meta.output_space == METRIC_DEPTH:
            pred_BHW = out_B1HW.squeeze(1) * self.meta.max_depth
        else:
            pred_BHW = F.relu(out_B1HW).squeeze(1)
        return pred_BHW, final_BTD[:, self.encoder.num_prefix_tokens :]

    def forward(self, image_BCHW: torch.Tensor) -> torch.Tensor:
        """Predict from a normalized `B x 3 x H x W` image (H, W multiples of the patch size).

        Returns:
            `B x H x W` in `self.meta.output_space`.
        """
        return self._forward(image_BCHW)[0]

    def forward_with_features(self, image_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prediction and the encoder's final-layer normed patch tokens, from one encoder pass.

        Returns:
            `(pred_BHW, tokens_BND)`, N = (H / patch) * (W / patch), row-major.
        """
        return self._forward(image_BCHW)

    @torch.no_grad()
    def infer(self, images, input_size: int = 518, batch_size: int = 8) -> Prediction | list[Prediction]:
        """Official preprocessing, batched forward and resize back, on the model's current device.

        Images are resized keeping their aspect ratio (short side to `input_size`, both sides multiples of the
        patch size, bicubic), normalized, run in batches of same-size images in eval mode, and the predictions
        resized back to each original size (bilinear, align_corners=True, as the official `infer_image`).

        Args:
            images: One image or a list: uint8 `H x W x 3` numpy arrays (greyscale / RGBA are converted), PIL
                images, or `C x H x W` tensors (uint8, or float in [0, 1]); sizes may differ.
            input_size: Short-side target size (518 is what Depth Anything was trained at).
            batch_size: Most images per forward pass.

        Returns:
            A `Prediction` for a single image, a list of them (in input order) for a list.
        """
        single = not isinstance(images, list | tuple)
        items = [images] if single else list(images)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        param = next(self.parameters())
        device, dtype = param.device, param.dtype
        images_CHW = [to_float_chw(image) for image in items]
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, image_CHW in enumerate(images_CHW):
            height, width = image_CHW.shape[-2:]
            groups[official_resize_hw(height, width, input_size, self.meta.patch_size)].append(index)
        results: list[Prediction | None] = [None] * len(items)
        modes = [(module, module.training) for module in self.modules()]  # each its own: a frozen part stays eval
        self.eval()
        try:
            for size_hw, indices in groups.items():
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start : start + batch_size]
                    batch_BCHW = torch.stack(
                        [resize_image(images_CHW[i].to(device), size_hw) for i in chunk]
                    )  # B x 3 x h x w
                    pred_BHW = self(self.normalize(batch_BCHW).to(dtype)).float()
                    for i, pred_HW in zip(chunk, pred_BHW, strict=True):
                        original_hw = tuple(images_CHW[i].shape[-2:])
                        pred_HW = F.interpolate(
                            pred_HW[None, None], size=original_hw, mode="bilinear", align_corners=True
                        )[0, 0]
                        values = pred_HW.cpu().numpy().astype(np.float32, copy=False)
                        results[i] = Prediction(values=values, output_space=self.meta.output_space)
        finally:
            for module, training in modes:
                module.training = training
        return results[0] if single else results
