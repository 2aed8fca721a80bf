"""DINOv2 ViT encoder: timm's VisionTransformer with the original DINOv2 token semantics.

Built from timm blocks (so timm's `forward_intermediates(x, indices=...)` is the encoder API the head uses), with
three DINOv2 details kept so official checkpoints load and reproduce their outputs exactly:

- the position embedding covers the class token and is resized the DINOv2 way (bicubic, `scale_factor` with
  `interpolate_offset`), which differs slightly from timm's `resample_abs_pos_embed`;
- register tokens (if any) are inserted after the position embedding is added, as DINOv2-reg does;
- `mask_token` (unused at inference) is a parameter, frozen, so the official `state_dict` round-trips.

Any H, W that are multiples of the patch size work.

Shape legend: B batch, C channels, H/W image size, h/w patch grid, N = h*w patch tokens, P prefix tokens
(class + registers), T = P + N tokens, D token width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import GluMlp, Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from depthkit.models.config import EncoderConfig

ENCODER_CONFIGS: dict[str, EncoderConfig] = {
    "vits": EncoderConfig(embed_dim=384, depth=12, num_heads=6),
    "vitb": EncoderConfig(embed_dim=768, depth=12, num_heads=12),
    "vitl": EncoderConfig(embed_dim=1024, depth=24, num_heads=16),
    "vitg": EncoderConfig(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
    # Tiny, for tests: a 5x5 position-embedding grid so resizing is exercised at every test size.
    "test": EncoderConfig(embed_dim=32, depth=4, num_heads=2, img_size=70),
}


class DinoV2SwiGLU(GluMlp):
    """DINOv2's fused SwiGLU FFN (`SwiGLUFFNFused`) as a timm `GluMlp`: fc1 = w12, fc2 = w3.

    timm's Block passes `hidden_features = int(D * mlp_ratio)`; DINOv2 shrinks it by 2/3 and rounds up to 8.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, **kwargs) -> None:
        hidden = (int((hidden_features or 4 * in_features) * 2 / 3) + 7) // 8 * 8
        kwargs.pop("act_layer", None)
        super().__init__(in_features, 2 * hidden, act_layer=nn.SiLU, gate_last=False, **kwargs)


class DinoV2Encoder(VisionTransformer):
    """A DINOv2 ViT with dynamic input size and the original DINOv2 state-dict content.

    Keys follow timm (`blocks.{i}.mlp.fc1`, `reg_token`) plus `mask_token`; `depthkit.models.checkpoint` maps
    them to and from the original DINOv2 layout.

    Args:
        config: Encoder architecture.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(
            img_size=config.img_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            init_values=config.init_values,
            reg_tokens=config.num_register_tokens,
            no_embed_class=False,
            num_classes=0,
            global_pool="",
            dynamic_img_size=True,
            drop_path_rate=config.drop_path_rate,
            mlp_layer=DinoV2SwiGLU if config.ffn == "swiglu" else Mlp,
        )
        self.config = config
        self.patch_size = config.patch_size
        if config.num_register_tokens:  # DINOv2-reg: the position embedding covers the class token only
            num_patches = (config.img_size // config.patch_size) ** 2
            self.pos_embed = nn.Parameter(torch.empty(1, num_patches + 1, config.embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # Used by DINOv2's masked-image pre-training only; kept (frozen) so official checkpoints round-trip.
        self.mask_token = nn.Parameter(torch.zeros(1, config.embed_dim), requires_grad=False)

    def check_image_size(self, image_BCHW: torch.Tensor) -> None:
        """Raise a `ValueError` unless `image_BCHW` is B x 3 x H x W with H, W multiples of the patch size."""
        if image_BCHW.ndim != 4 or image_BCHW.shape[1] != 3:
            raise ValueError(f"expected an image batch B x 3 x H x W, got shape {tuple(image_BCHW.shape)}")
        height, width = image_BCHW.shape[-2:]
        p = self.patch_size
        if height % p or width % p or height == 0 or width == 0:
            raise ValueError(
                f"image size {height}x{width} (HxW) is not a multiple of the patch size {p}; resize to e.g. "
                f"{max(p, round(height / p) * p)}x{max(p, round(width / p) * p)} first"
            )

    def interpolate_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The position embedding for an h x w patch grid, resized exactly as the original DINOv2 does.

        Returns:
            `1 x (1 + h*w) x D`: class-token position first, then the patch positions row-major.
        """
        pos_embed_1TD = self.pos_embed
        num_pos = pos_embed_1TD.shape[1] - 1
        side = int(math.sqrt(num_pos))
        if (grid_h, grid_w) == (side, side):
            return pos_embed_1TD
        dtype = pos_embed_1TD.dtype
        pos_embed_1TD = pos_embed_1TD.float()
        cls_pos_11D = pos_embed_1TD[:, :1]
        grid_1Dss = pos_embed_1TD[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # 1 x D x s x s
        offset, antialias = self.config.interpolate_offset, self.config.interpolate_antialias
        if offset:
            scale = ((grid_h + offset) / side, (grid_w + offset) / side)
            grid_1Dhw = F.interpolate(grid_1Dss, scale_factor=scale, mode="bicubic", antialias=antialias)
        else:
            grid_1Dhw = F.interpolate(grid_1Dss, size=(grid_h, grid_w), mode="bicubic", antialias=antialias)
        assert grid_1Dhw.shape[-2:] == (grid_h, grid_w), (grid_1Dhw.shape, grid_h, grid_w)
        grid_1ND = grid_1Dhw.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)  # 1 x N x D
        return torch.cat([cls_pos_11D, grid_1ND], dim=1).to(dtype)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Class token + position embedding (DINOv2 resize), then registers; called by timm's forward paths."""
        batch, grid_h, grid_w, dim = x.shape  # patch_embed emits B x h x w x D with dynamic_img_size
        patches_BND = x.reshape(batch, grid_h * grid_w, dim)  # B x N x D
        tokens_BTD = torch.cat([self.cls_token.expand(batch, -1, -1), patches_BND], dim=1)
        tokens_BTD = tokens_BTD + self.interpolate_pos_embed(grid_h, grid_w)
        if self.reg_token is not None:
            regs_BRD = self.reg_token.expand(batch, -1, -1)
            tokens_BTD = torch.cat([tokens_BTD[:, :1], regs_BRD, tokens_BTD[:, 1:]], dim=1)
        return self.pos_drop(tokens_BTD)

    def forward_patch_tokens(self, image_BCHW: torch.Tensor) -> torch.Tensor:
        """Final-layer, final-normed patch tokens (no class/register tokens): the feature-alignment target.

        Args:
            image_BCHW: Normalized image, H and W multiples of the patch size.

        Returns:
            `tokens_BND`, N = (H / patch) * (W / patch) in row-major order.
        """
        self.check_image_size(image_BCHW)
        return self.forward_features(image_BCHW)[:, self.num_prefix_tokens :]


def encoder_config(name_or_size: str) -> EncoderConfig:
    """The `EncoderConfig` of a size name ("vits", "vitb", "vitl", "vitg", "test") or "dinov2_vits14"-style alias."""
    key = name_or_size
    if key.startswith("dinov2_") and key.endswith("14"):
        key = key[len("dinov2_") : -2]
    if key not in ENCODER_CONFIGS:
        raise ValueError(f"unknown encoder {name_or_size!r}; expected one of {', '.join(ENCODER_CONFIGS)}")
    return ENCODER_CONFIGS[key]
