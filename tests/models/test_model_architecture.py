"""Registry, metadata, and state-dict key/shape parity with the official architecture for every size."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
from official_da_reference import (
    OFFICIAL_ENCODERS,
    OFFICIAL_HEADS,
    OFFICIAL_V2_TAPS,
    official_parameter_count,
    official_shapes,
    official_shapes_for,
)

from depthkit.models import DepthModel, ModelMeta, create_model, list_models, model_config
from depthkit.models.checkpoint import to_official
from depthkit.spaces import AFFINE_DISPARITY, METRIC_DEPTH

SIZES = ("vits", "vitb", "vitl", "vitg")
FULL = [n for n in list_models() if n.rsplit("_", 1)[1] in SIZES]
SIZE_OF = {n: n.rsplit("_", 1)[1] for n in FULL}


@functools.cache
def _meta_model(name: str) -> DepthModel:
    """Full-size models on the meta device (no memory; built once per session, ViT-g takes a second or two)."""
    with torch.device("meta"):
        return create_model(name)


def _official_layout(model: DepthModel) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in to_official(model.state_dict(), model.config).items()}


def test_registry_has_every_variant():
    expected = {f"dav2_{s}" for s in ("vits", "vitb", "vitl", "vitg")}
    expected |= {f"dav1_{s}" for s in ("vits", "vitb", "vitl")}
    expected |= {f"dav2_metric_{s}" for s in ("vits", "vitb", "vitl")}
    expected |= {f"dav2_metric_outdoor_{s}" for s in ("vits", "vitb", "vitl")}
    expected |= {"test_dav2", "test_dav1", "test_dav2_metric", "tiny_dav2"}
    assert set(list_models()) == expected
    with pytest.raises(ValueError, match="unknown model 'dav9_vits'"):
        create_model("dav9_vits")


@pytest.mark.parametrize("size", SIZES)
def test_state_dict_matches_official_layout(size):
    enc, head = OFFICIAL_ENCODERS[size], OFFICIAL_HEADS[size]
    expected = official_shapes(enc["embed_dim"], enc["depth"], enc["ffn"], head["features"], head["out_channels"])
    got = _official_layout(_meta_model(f"dav2_{size}"))
    assert sorted(set(expected) - set(got)) == [], "keys missing from depthkit's official-layout state_dict"
    assert sorted(set(got) - set(expected)) == [], "keys depthkit has that the official model has not"
    mismatched = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not mismatched


@pytest.mark.parametrize("name", FULL)
def test_every_variant_has_its_size_layout_and_taps(name):
    """V1, metric and outdoor variants: the same parameters as dav2 of their size (the activation has none)."""
    size = SIZE_OF[name]
    config, v2 = model_config(name), model_config(f"dav2_{size}")
    assert config.encoder == v2.encoder
    assert dataclasses.replace(config.head, activation="relu") == v2.head
    depth = OFFICIAL_ENCODERS[size]["depth"]
    expected_taps = list(range(depth - 4, depth)) if name.startswith("dav1") else OFFICIAL_V2_TAPS[size]
    assert list(config.tap_indices) == expected_taps
    assert config.head.activation == ("sigmoid" if "metric" in name else "relu")


@pytest.mark.parametrize(("size", "millions"), [("vits", 24.8), ("vitb", 97.5), ("vitl", 335.3), ("vitg", 1258.1)])
def test_parameter_counts_equal_official(size, millions):
    official = official_parameter_count(size)
    model = _meta_model(f"dav2_{size}")
    count = sum(p.numel() for p in model.parameters())
    assert count == official
    assert round(official / 1e6, 1) == millions
    assert sum(b.numel() for b in model.buffers()) == 0


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"use_bn": True},
        {"use_clstoken": True},
        {"ffn": "swiglu"},
        {"num_register_tokens": 4},
    ],
    ids=["plain", "bn", "clstoken", "swiglu", "registers"],
)
def test_tiny_state_dict_matches_official_layout(overrides):
    model = create_model("test_dav2", **overrides)
    expected = official_shapes_for(model.config)
    assert _official_layout(model) == expected


@pytest.mark.parametrize("name", list_models())
def test_meta(name):
    meta = ModelMeta.from_config(model_config(name))
    if name not in FULL:
        assert create_model(name).meta == meta
    assert isinstance(meta, ModelMeta)
    assert meta.name == name
    assert meta.patch_size == 14
    assert meta.embed_dim == model_config(name).encoder.embed_dim
    assert meta.mean == pytest.approx((0.485, 0.456, 0.406))
    assert meta.std == pytest.approx((0.229, 0.224, 0.225))
    if "metric" in name:
        assert meta.output_space == METRIC_DEPTH
        assert meta.max_depth == (80.0 if "outdoor" in name else 20.0)
    else:
        assert meta.output_space == AFFINE_DISPARITY
        assert meta.max_depth is None
    with pytest.raises(AttributeError):
        meta.name = "other"  # frozen


def test_overrides():
    assert model_config("dav2_metric_vits", max_depth=80.0).max_depth == 80.0
    assert model_config("dav2_vits", drop_path_rate=0.1).encoder.drop_path_rate == 0.1
    assert model_config("dav2_vits", use_clstoken=True).head.use_clstoken
    with pytest.raises(ValueError, match="unknown override"):
        model_config("dav2_vits", widht=3)
    with pytest.raises(ValueError, match="max_depth is only for metric_depth"):
        model_config("dav2_vits", max_depth=20.0)
    with pytest.raises(ValueError, match="tap_indices"):
        model_config("dav2_vits", tap_indices=(2, 5, 8, 12))


def test_unused_official_parameters_are_frozen():
    model = create_model("test_dav2")
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["encoder.mask_token"] + [
        f"head.scratch.refinenet4.resConfUnit1.conv{c}.{p}" for c in (1, 2) for p in ("bias", "weight")
    ]
    assert math.prod(model.encoder.mask_token.shape) == model.meta.embed_dim


@pytest.mark.parametrize("name", ["test_dav2", "test_dav2_metric"])
def test_prediction_stays_fp32_under_bf16_autocast(name):
    """Mixed precision computes the head's last conv in fp32: a bf16 prediction near 1 moves in steps of 0.4%."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    image = torch.randn(2, 3, 70, 84)
    with torch.no_grad():
        model.head.scratch.output_conv2[2].bias.fill_(1.0)  # a random-init ReLU head may be all zero: on any grid
        reference = model(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(image)
    assert mixed.dtype == torch.float32
    assert (mixed != mixed.bfloat16().float()).float().mean() > 0.5  # not on the bf16 grid
    torch.testing.assert_close(mixed, reference, atol=0.05 * reference.abs().max().item(), rtol=0)


@pytest.mark.parametrize("name", ["test_dav2", "test_dav1"])
def test_a_random_relative_model_predicts_a_varying_positive_map(name):
    """The ReLU head starts with bias 1: random weights give a map that varies over the image, not ReLU zeros (a
    random-weight smoke run of predict, export or pseudo-label would otherwise compare constant maps)."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    with torch.no_grad():
        pred_BHW = model(model.normalize(torch.rand(2, 3, 56, 70, generator=torch.Generator().manual_seed(1))))
    assert (pred_BHW > 0).all() and pred_BHW.std() > 0
    assert model.head.prediction_layer.bias.item() == 1.0
