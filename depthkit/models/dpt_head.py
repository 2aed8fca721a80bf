"""The Depth Anything DPT head, with the official module names (`projects`, `resize_layers`, `scratch.*`).

Forward, as in Depth Anything V1/V2: per tapped block, tokens -> (class-token readout) -> grid -> 1x1 project ->
resize (4x up, 2x up, same, 2x down) -> 3x3 `layerK_rn`; fuse refinenet4 -> refinenet1 (each upsamples to the next
map, the last by 2x); `output_conv1`; bilinear upsample to the input size; `output_conv2` (conv, ReLU, 1x1 conv,
ReLU or Sigmoid). Under autocast the last 1x1 conv and activation run in fp32, so the prediction is fp32.

`scratch.refinenet4.resConfUnit1` exists in the official layout but the deepest fusion block never gets a skip
input, so it is unused: its parameters are created frozen (requires_grad=False), which keeps the checkpoint layout
and lets DDP run without `find_unused_parameters`.

Shape legend: B batch, N patch tokens, D token width, h/w patch grid, C channels, H/W output size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from depthkit.models.config import DPTHeadConfig


class ResidualConvUnit(nn.Module):
    """Pre-activation residual unit: x + conv2(relu(conv1(relu(x)))), optional BatchNorm after each conv."""

    def __init__(self, features: int, use_bn: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(features) if use_bn else nn.Identity()
        self.bn2 = nn.BatchNorm2d(features) if use_bn else nn.Identity()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        out_BCHW = self.bn1(self.conv1(F.relu(x_BCHW)))
        out_BCHW = self.bn2(self.conv2(F.relu(out_BCHW)))
        return out_BCHW + x_BCHW


class FeatureFusionBlock(nn.Module):
    """(x + rcu1(skip)) -> rcu2 -> bilinear resize (align_corners=True) -> 1x1 `out_conv`."""

    def __init__(self, features: int, use_bn: bool) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1, bias=True)
        self.resConfUnit1 = ResidualConvUnit(features, use_bn)  # noqa: N815 (official key name)
        self.resConfUnit2 = ResidualConvUnit(features, use_bn)  # noqa: N815 (official key name)

    def forward(
        self, x_BCHW: torch.Tensor, skip_BCHW: torch.Tensor | None = None, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        if skip_BCHW is not None:
            x_BCHW = x_BCHW + self.resConfUnit1(skip_BCHW)
        x_BCHW = self.resConfUnit2(x_BCHW)
        if size is None:
            x_BCHW = F.interpolate(x_BCHW, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x_BCHW = F.interpolate(x_BCHW, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x_BCHW)


class DPTHead(nn.Module):
    """Depth Anything's DPT head.

    Args:
        in_channels: Encoder token width D.
        config: Head widths and options.
        patch_size: Encoder patch size; the output is (h * patch_size) x (w * patch_size).
    """

    def __init__(self, in_channels: int, config: DPTHeadConfig, patch_size: int = 14) -> None:
        super().__init__()
        self.config = config
        self.patch_size = patch_size
        c1, c2, c3, c4 = config.out_channels
        features = config.features
        self.projects = nn.ModuleList([nn.Conv2d(in_channels, c, kernel_size=1) for c in config.out_channels])
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c1, c1, kernel_size=4, stride=4),
                nn.ConvTranspose2d(c2, c2, kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(c4, c4, kernel_size=3, stride=2, padding=1),
            ]
        )
        if config.use_clstoken:
            self.readout_projects = nn.ModuleList(
                [nn.Sequential(nn.Linear(2 * in_channels, in_channels), nn.GELU()) for _ in range(4)]
            )
        scratch = nn.Module()
        for k, c in enumerate((c1, c2, c3, c4), start=1):
            scratch.add_module(f"layer{k}_rn", nn.Conv2d(c, features, kernel_size=3, padding=1, bias=False))
        for k in range(1, 5):
            scratch.add_module(f"refinenet{k}", FeatureFusionBlock(features, config.use_bn))
        scratch.refinenet4.resConfUnit1.requires_grad_(False)  # never used; see the module docstring
        scratch.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
        last_act = nn.ReLU() if config.activation == "relu" else nn.Sigmoid()
        scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, config.head_hidden, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(config.head_hidden, 1, kernel_size=1),
            last_act,
        )
        self.scratch = scratch
        if config.activation == "relu":
            # A random ReLU head can be negative before its activation at every pixel (likely for narrow heads): it
            # then predicts zeros and passes no gradient. A bias of 1 starts every pixel in the ReLU's linear part.
            # Only the initial value changes; loaded weights replace it.
            nn.init.constant_(self.prediction_layer.bias, 1.0)

    @property
    def prediction_layer(self) -> nn.Conv2d:
        """The 1x1 conv that makes the prediction: kept fp32 under mixed precision (see `forward`)."""
        return self.scratch.output_conv2[2]

    def forward(self, features: list[tuple[torch.Tensor, torch.Tensor]], grid_hw: tuple[int, int]) -> torch.Tensor:
        """Fuse four tapped encoder layers into one map.

        Args:
            features: Four `(tokens_BND, cls_BD)` pairs, shallowest first (normed, as the encoder gives them).
            grid_hw: Patch grid (h, w), N = h * w.

        Returns:
            `B x 1 x (h * patch) x (w * patch)`, after the head's last activation.
        """
        grid_h, grid_w = grid_hw
        maps = []
        for i, (tokens_BND, cls_BD) in enumerate(features):
            if self.config.use_clstoken:
                readout_BND = cls_BD.unsqueeze(1).expand_as(tokens_BND)
                tokens_BND = self.readout_projects[i](torch.cat([tokens_BND, readout_BND], dim=-1))
            batch, _, dim = tokens_BND.shape
            grid_BDhw = tokens_BND.permute(0, 2, 1).reshape(batch, dim, grid_h, grid_w)  # B x D x h x w
            maps.append(self.resize_layers[i](self.projects[i](grid_BDhw)))
        s = self.scratch
        layer1_BCHW = s.layer1_rn(maps[0])  # 4h x 4w
        layer2_BCHW = s.layer2_rn(maps[1])  # 2h x 2w
        layer3_BCHW = s.layer3_rn(maps[2])  # h x w
        layer4_BCHW = s.layer4_rn(maps[3])  # ceil(h/2) x ceil(w/2)
        path4_BCHW = s.refinenet4(layer4_BCHW, size=layer3_BCHW.shape[2:])
        path3_BCHW = s.refinenet3(path4_BCHW, layer3_BCHW, size=layer2_BCHW.shape[2:])
        path2_BCHW = s.refinenet2(path3_BCHW, layer2_BCHW, size=layer1_BCHW.shape[2:])
        path1_BCHW = s.refinenet1(path2_BCHW, layer1_BCHW)  # 8h x 8w
        out_BCHW = s.output_conv1(path1_BCHW)
        out_size = (grid_h * self.patch_size, grid_w * self.patch_size)
        out_BCHW = F.interpolate(out_BCHW, size=out_size, mode="bilinear", align_corners=True)
        conv_hidden, act_hidden, conv_out, act_out = s.output_conv2  # conv_out is `prediction_layer`
        hidden_BCHW = act_hidden(conv_hidden(out_BCHW))
        device_type = hidden_BCHW.device.type
        if torch.is_autocast_enabled(device_type):
            # The prediction itself is computed in fp32 under mixed precision: bf16 keeps 8 significant bits, so a
            # map near 1 would move in steps of 0.4%, as large as the signal the scale-invariant losses train on.
            with torch.autocast(device_type, enabled=False):
                return act_out(conv_out(hidden_BCHW.float()))
        return act_out(conv_out(hidden_BCHW))
