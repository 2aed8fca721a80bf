"""An independent reference of the official Depth Anything architecture, written for the tests.

Two things, both from the official code's definitions (Depth-Anything-V2 `depth_anything_v2/dpt.py`,
`dinov2.py`, `dinov2_layers/*`, `util/blocks.py`; V1 `depth_anything/dpt.py`; the metric `dpt.py`), not from any
downloaded file and not from depthkit:

- `official_shapes(...)`: the `state_dict` key -> shape table that `DepthAnythingV2(...)` would have
  (`official_shapes_for(config)` reads the arguments from a depthkit model config).
- `official_forward(state_dict, image, ...)`: the official forward, functional, reading that `state_dict`:
  DINOv2 (`prepare_tokens_with_masks`, `interpolate_pos_encoding` with offset 0.1, pre-norm blocks with layer
  scale, `get_intermediate_layers(norm=True, return_class_token=True)`) and `DPTHead.forward`.

Shape legend: B batch, N tokens, D width, h/w patch grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The official encoder definitions (`vit_small`... in dinov2.py) and heads (the README's model_configs).
OFFICIAL_ENCODERS = {
    "vits": dict(embed_dim=384, depth=12, num_heads=6, ffn="mlp"),
    "vitb": dict(embed_dim=768, depth=12, num_heads=12, ffn="mlp"),
    "vitl": dict(embed_dim=1024, depth=24, num_heads=16, ffn="mlp"),
    "vitg": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglufused"),
}
OFFICIAL_HEADS = {
    "vits": dict(features=64, out_channels=[48, 96, 192, 384]),
    "vitb": dict(features=128, out_channels=[96, 192, 384, 768]),
    "vitl": dict(features=256, out_channels=[256, 512, 1024, 1024]),
    "vitg": dict(features=384, out_channels=[1536, 1536, 1536, 1536]),
}
OFFICIAL_V2_TAPS = {"vits": [2, 5, 8, 11], "vitb": [2, 5, 8, 11], "vitl": [4, 11, 17, 23], "vitg": [9, 19, 29, 39]}


def swiglu_hidden(embed_dim: int, mlp_ratio: float = 4.0) -> int:
    """SwiGLUFFNFused: hidden_features = (int(hidden_features * 2 / 3) + 7) // 8 * 8."""
    return (int(int(embed_dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def official_shapes(
    embed_dim: int,
    depth: int,
    ffn: str,
    features: int,
    out_channels: list[int],
    *,
    img_size: int = 518,
    patch_size: int = 14,
    num_register_tokens: int = 0,
    use_bn: bool = False,
    use_clstoken: bool = False,
    head_hidden: int = 32,
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official `DepthAnythingV2(...).state_dict()` (also V1's and the metric model's)."""
    d = embed_dim
    num_patches = (img_size // patch_size) ** 2
    table: dict[str, tuple[int, ...]] = {
        "pretrained.cls_token": (1, 1, d),
        "pretrained.pos_embed": (1, num_patches + 1, d),
        "pretrained.mask_token": (1, d),
        "pretrained.patch_embed.proj.weight": (d, 3, patch_size, patch_size),
        "pretrained.patch_embed.proj.bias": (d,),
        "pretrained.norm.weight": (d,),
        "pretrained.norm.bias": (d,),
    }
    if num_register_tokens:
        table["pretrained.register_tokens"] = (1, num_register_tokens, d)
    for i in range(depth):
        b = f"pretrained.blocks.{i}."
        table |= {
            b + "norm1.weight": (d,),
            b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d),
            b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d),
            b + "attn.proj.bias": (d,),
            b + "ls1.gamma": (d,),
            b + "norm2.weight": (d,),
            b + "norm2.bias": (d,),
            b + "ls2.gamma": (d,),
        }
        if ffn == "mlp":
            table |= {
                b + "mlp.fc1.weight": (4 * d, d),
                b + "mlp.fc1.bias": (4 * d,),
                b + "mlp.fc2.weight": (d, 4 * d),
                b + "mlp.fc2.bias": (d,),
            }
        else:
            h = swiglu_hidden(d)
            table |= {
                b + "mlp.w12.weight": (2 * h, d),
                b + "mlp.w12.bias": (2 * h,),
                b + "mlp.w3.weight": (d, h),
                b + "mlp.w3.bias": (d,),
            }
    f = features
    c = out_channels
    head = "depth_head."
    for i in range(4):
        table[f"{head}projects.{i}.weight"] = (c[i], d, 1, 1)
        table[f"{head}projects.{i}.bias"] = (c[i],)
    # ConvTranspose2d weights are (in, out, k, k)
    table |= {
        f"{head}resize_layers.0.weight": (c[0], c[0], 4, 4),
        f"{head}resize_layers.0.bias": (c[0],),
        f"{head}resize_layers.1.weight": (c[1], c[1], 2, 2),
        f"{head}resize_layers.1.bias": (c[1],),
        f"{head}resize_layers.3.weight": (c[3], c[3], 3, 3),
        f"{head}resize_layers.3.bias": (c[3],),
    }
    if use_clstoken:
        for i in range(4):
            table[f"{head}readout_projects.{i}.0.weight"] = (d, 2 * d)
            table[f"{head}readout_projects.{i}.0.bias"] = (d,)
    for k in range(1, 5):
        table[f"{head}scratch.layer{k}_rn.weight"] = (f, c[k - 1], 3, 3)
        r = f"{head}scratch.refinenet{k}."
        table[r + "out_conv.weight"] = (f, f, 1, 1)
        table[r + "out_conv.bias"] = (f,)
        for unit in (1, 2):
            for conv in (1, 2):
                table[f"{r}resConfUnit{unit}.conv{conv}.weight"] = (f, f, 3, 3)
                table[f"{r}resConfUnit{unit}.conv{conv}.bias"] = (f,)
            if use_bn:
                for bn in (1, 2):
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        table[f"{r}resConfUnit{unit}.bn{bn}.{name}"] = (f,)
                    table[f"{r}resConfUnit{unit}.bn{bn}.num_batches_tracked"] = ()
    table |= {
        f"{head}scratch.output_conv1.weight": (f // 2, f, 3, 3),
        f"{head}scratch.output_conv1.bias": (f // 2,),
        f"{head}scratch.output_conv2.0.weight": (head_hidden, f // 2, 3, 3),
        f"{head}scratch.output_conv2.0.bias": (head_hidden,),
        f"{head}scratch.output_conv2.2.weight": (1, head_hidden, 1, 1),
        f"{head}scratch.output_conv2.2.bias": (1,),
    }
    return table


def official_shapes_for(config) -> dict[str, tuple[int, ...]]:
    """`official_shapes` for a depthkit `DepthModelConfig` (read by attribute, so this file imports no depthkit)."""
    enc, head = config.encoder, config.head
    return official_shapes(
        enc.embed_dim,
        enc.depth,
        "swiglufused" if enc.ffn == "swiglu" else "mlp",
        head.features,
        list(head.out_channels),
        img_size=enc.img_size,
        num_register_tokens=enc.num_register_tokens,
        use_bn=head.use_bn,
        use_clstoken=head.use_clstoken,
        head_hidden=head.head_hidden,
    )


def official_parameter_count(size: str) -> int:
    """Parameters of the official `DepthAnythingV2(encoder=size, **model_configs[size])` (no buffers there)."""
    enc, head = OFFICIAL_ENCODERS[size], OFFICIAL_HEADS[size]
    table = official_shapes(enc["embed_dim"], enc["depth"], enc["ffn"], head["features"], head["out_channels"])
    return sum(math.prod(shape) for shape in table.values())


# ------------------------------------------------------------------------------------------------ forward


def _interpolate_pos_encoding(pos_embed: torch.Tensor, h0: int, w0: int, offset: float = 0.1) -> torch.Tensor:
    """DINOv2 `interpolate_pos_encoding` (the image-pixel `w, h` there are really H, W)."""
    n = pos_embed.shape[1] - 1
    if h0 * w0 == n and h0 == w0:
        return pos_embed
    pos = pos_embed.float()
    class_pos, patch_pos = pos[:, 0], pos[:, 1:]
    dim = pos.shape[-1]
    m = int(math.sqrt(n))
    sx, sy = float(h0 + offset) / m, float(w0 + offset) / m
    patch_pos = F.interpolate(
        patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2), scale_factor=(sx, sy), mode="bicubic", antialias=False
    )
    assert (int(h0 + offset), int(w0 + offset)) == tuple(patch_pos.shape[-2:])
    patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos.unsqueeze(0), patch_pos), dim=1).to(pos_embed.dtype)


def _block(sd: dict, prefix: str, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """NestedTensorBlock with MemEffAttention's plain fallback (Attention.forward), eval mode."""
    B, N, C = x.shape
    y = F.layer_norm(x, (C,), sd[prefix + "norm1.weight"], sd[prefix + "norm1.bias"], eps=1e-6)
    qkv = F.linear(y, sd[prefix + "attn.qkv.weight"], sd[prefix + "attn.qkv.bias"])
    qkv = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (C // num_heads) ** -0.5, qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    y = (attn @ v).transpose(1, 2).reshape(B, N, C)
    y = F.linear(y, sd[prefix + "attn.proj.weight"], sd[prefix + "attn.proj.bias"])
    x = x + y * sd[prefix + "ls1.gamma"]
    y = F.layer_norm(x, (C,), sd[prefix + "norm2.weight"], sd[prefix + "norm2.bias"], eps=1e-6)
    if prefix + "mlp.fc1.weight" in sd:
        y = F.gelu(F.linear(y, sd[prefix + "mlp.fc1.weight"], sd[prefix + "mlp.fc1.bias"]))
        y = F.linear(y, sd[prefix + "mlp.fc2.weight"], sd[prefix + "mlp.fc2.bias"])
    else:
        x1, x2 = F.linear(y, sd[prefix + "mlp.w12.weight"], sd[prefix + "mlp.w12.bias"]).chunk(2, dim=-1)
        y = F.linear(F.silu(x1) * x2, sd[prefix + "mlp.w3.weight"], sd[prefix + "mlp.w3.bias"])
    return x + y * sd[prefix + "ls2.gamma"]


def dinov2_intermediate_layers(sd: dict, image: torch.Tensor, taps: list[int], num_heads: int, patch_size: int = 14):
    """`get_intermediate_layers(x, taps, return_class_token=True)` (norm=True) and the final normed patch tokens."""
    p = "pretrained."
    B, _, H, W = image.shape
    x = F.conv2d(image, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat((sd[p + "cls_token"].expand(B, -1, -1), x), dim=1)
    x = x + _interpolate_pos_encoding(sd[p + "pos_embed"], H // patch_size, W // patch_size)
    num_reg = 0
    if p + "register_tokens" in sd:
        num_reg = sd[p + "register_tokens"].shape[1]
        x = torch.cat((x[:, :1], sd[p + "register_tokens"].expand(B, -1, -1), x[:, 1:]), dim=1)
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith(p + "blocks."))
    outputs = []
    for i in range(depth):
        x = _block(sd, f"{p}blocks.{i}.", x, num_heads)
        if i in taps:
            outputs.append(x)
    dim = x.shape[-1]

    def norm(t: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(t, (dim,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-6)

    outputs = [norm(out) for out in outputs]
    features = [(out[:, 1 + num_reg :], out[:, 0]) for out in outputs]
    return features, norm(x)[:, 1 + num_reg :]


def _bn(sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    if prefix + "weight" not in sd:
        return x
    return F.batch_norm(
        x,
        sd[prefix + "running_mean"],
        sd[prefix + "running_var"],
        sd[prefix + "weight"],
        sd[prefix + "bias"],
        training=False,
        eps=1e-5,
    )


def _conv(sd: dict, prefix: str, x: torch.Tensor, **kwargs) -> torch.Tensor:
    return F.conv2d(x, sd[prefix + "weight"], sd.get(prefix + "bias"), **kwargs)


def _residual_conv_unit(sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    out = _bn(sd, prefix + "bn1.", _conv(sd, prefix + "conv1.", F.relu(x), padding=1))
    out = _bn(sd, prefix + "bn2.", _conv(sd, prefix + "conv2.", F.relu(out), padding=1))
    return out + x


def _fusion(sd: dict, prefix: str, *xs: torch.Tensor, size=None) -> torch.Tensor:
    output = xs[0]
    if len(xs) == 2:
        output = output + _residual_conv_unit(sd, prefix + "resConfUnit1.", xs[1])
    output = _residual_conv_unit(sd, prefix + "resConfUnit2.", output)
    modifier = {"scale_factor": 2} if size is None else {"size": size}
    output = F.interpolate(output, **modifier, mode="bilinear", align_corners=True)
    return _conv(sd, prefix + "out_conv.", output)


def dpt_head_forward(sd: dict, features, patch_h: int, patch_w: int, metric: bool) -> torch.Tensor:
    """`DPTHead.forward` (relative: ... ReLU, Identity; metric: ... Sigmoid) -> B x 1 x 14h x 14w."""
    hp = "depth_head."
    use_clstoken = hp + "readout_projects.0.0.weight" in sd
    out = []
    for i, (x, cls_token) in enumerate(features):
        if use_clstoken:
            readout = cls_token.unsqueeze(1).expand_as(x)
            x = F.gelu(
                F.linear(
                    torch.cat((x, readout), -1),
                    sd[f"{hp}readout_projects.{i}.0.weight"],
                    sd[f"{hp}readout_projects.{i}.0.bias"],
                )
            )
        x = x.permute(0, 2, 1).reshape((x.shape[0], x.shape[-1], patch_h, patch_w))
        x = _conv(sd, f"{hp}projects.{i}.", x)
        if i == 0:
            x = F.conv_transpose2d(x, sd[hp + "resize_layers.0.weight"], sd[hp + "resize_layers.0.bias"], stride=4)
        elif i == 1:
            x = F.conv_transpose2d(x, sd[hp + "resize_layers.1.weight"], sd[hp + "resize_layers.1.bias"], stride=2)
        elif i == 3:
            x = _conv(sd, hp + "resize_layers.3.", x, stride=2, padding=1)
        out.append(x)
    s = hp + "scratch."
    l1, l2, l3, l4 = (_conv(sd, f"{s}layer{k}_rn.", out[k - 1], padding=1) for k in range(1, 5))
    path_4 = _fusion(sd, s + "refinenet4.", l4, size=l3.shape[2:])
    path_3 = _fusion(sd, s + "refinenet3.", path_4, l3, size=l2.shape[2:])
    path_2 = _fusion(sd, s + "refinenet2.", path_3, l2, size=l1.shape[2:])
    path_1 = _fusion(sd, s + "refinenet1.", path_2, l1)
    y = _conv(sd, s + "output_conv1.", path_1, padding=1)
    y = F.interpolate(y, (int(patch_h * 14), int(patch_w * 14)), mode="bilinear", align_corners=True)
    y = F.relu(_conv(sd, s + "output_conv2.0.", y, padding=1))
    y = _conv(sd, s + "output_conv2.2.", y)
    return torch.sigmoid(y) if metric else F.relu(y)


def official_forward(
    sd: dict,
    image: torch.Tensor,
    *,
    taps: list[int],
    num_heads: int,
    version: int = 2,
    max_depth: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`DepthAnythingV2.forward` (version 2, or metric when max_depth is set) or V1 `DPT_DINOv2.forward`.

    Returns:
        (prediction B x H x W, final normed patch tokens B x N x D).
    """
    h, w = image.shape[-2:]
    patch_h, patch_w = h // 14, w // 14
    features, final_tokens = dinov2_intermediate_layers(sd, image, taps, num_heads)
    depth = dpt_head_forward(sd, features, patch_h, patch_w, metric=max_depth is not None)
    if max_depth is not None:
        depth = depth * max_depth
    elif version == 1:
        depth = F.relu(F.interpolate(depth, size=(h, w), mode="bilinear", align_corners=True))
    else:
        depth = F.relu(depth)
    return depth.squeeze(1), final_tokens


def random_state_dict(table: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for a key -> shape table, scaled so a tiny model's activations stay O(1) and every output
    pixel is positive before the final ReLU (the last conv's bias is set to 1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in table.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0, dtype=torch.long)
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=gen)
        elif key.endswith(("norm1.weight", "norm2.weight", "norm.weight", ".gamma")) or (
            ".bn" in key and key.endswith("weight")
        ):
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) >= 2 and key.endswith("weight"):
            fan_in = math.prod(shape[1:]) if "resize_layers.0" not in key and "resize_layers.1" not in key else shape[0]
            out[key] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        else:
            out[key] = 0.1 * torch.randn(shape, generator=gen)
    out["depth_head.scratch.output_conv2.2.bias"] = torch.ones(1)
    return out
