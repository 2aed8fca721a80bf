"""Forward parity with an independent re-implementation of the official forward; gradients; input sizes."""

from __future__ import annotations

import pytest
import torch
from official_da_reference import official_forward, official_shapes_for, random_state_dict

from depthkit.models import create_encoder, create_model, save_checkpoint
from depthkit.models.checkpoint import load_state_dict

# (registry name, overrides, official version)
CASES = {
    "v2": ("test_dav2", {}, 2),
    "v2_last_not_tapped": ("test_dav2", {"depth": 6}, 2),
    "v1": ("test_dav1", {}, 1),
    "metric": ("test_dav2_metric", {}, 2),
    "metric_80": ("test_dav2_metric", {"max_depth": 80.0}, 2),
    "swiglu": ("test_dav2", {"ffn": "swiglu"}, 2),
    "clstoken": ("test_dav2", {"use_clstoken": True}, 2),
    "bn": ("test_dav2", {"use_bn": True}, 2),
    "registers": ("test_dav2", {"num_register_tokens": 2}, 2),
}
SIZES = [(28, 42), (70, 70), (56, 98)]  # non-square; the native 5x5 grid (no resize); tall grid


def _official_sd(model, seed: int = 0) -> dict[str, torch.Tensor]:
    table = official_shapes_for(model.config)
    return random_state_dict(table, seed)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_official(case):
    name, overrides, version = CASES[case]
    model = create_model(name, **overrides).eval()
    official = _official_sd(model)
    load_state_dict(model, official, "random official state_dict")
    gen = torch.Generator().manual_seed(1)
    for height, width in SIZES:
        image = torch.randn(2, 3, height, width, generator=gen)
        with torch.no_grad():
            pred, tokens = model.forward_with_features(image)
            expected, expected_tokens = official_forward(
                official,
                image,
                taps=list(model.config.tap_indices),
                num_heads=model.config.encoder.num_heads,
                version=version,
                max_depth=model.meta.max_depth,
            )
        assert pred.shape == (2, height, width)
        assert expected.abs().mean() > 0.1, "degenerate reference output"
        torch.testing.assert_close(pred, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tokens, expected_tokens, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(image), pred, rtol=0, atol=0)


def test_create_encoder_gives_the_same_tokens(tmp_path):
    model = create_model("test_dav2").eval()
    load_state_dict(model, _official_sd(model, seed=3))
    path = save_checkpoint(model, tmp_path / "model.pth", layout="official")
    encoder = create_encoder("test", checkpoint_path=path).eval()
    image = torch.randn(1, 3, 42, 56)
    with torch.no_grad():
        _, tokens = model.forward_with_features(image)
        torch.testing.assert_close(encoder.forward_patch_tokens(image), tokens, rtol=0, atol=0)
    # An original DINOv2 checkpoint (no prefix, DINOv2 key names) loads as well.
    dinov2 = {k[len("pretrained.") :]: v for k, v in torch.load(path).items() if k.startswith("pretrained.")}
    torch.save(dinov2, tmp_path / "dinov2.pth")
    encoder2 = create_encoder("test", checkpoint_path=tmp_path / "dinov2.pth").eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder2.forward_patch_tokens(image), tokens, rtol=0, atol=0)
    del dinov2["norm.bias"]
    torch.save(dinov2, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="missing keys: norm.bias"):
        create_encoder("test", checkpoint_path=tmp_path / "broken.pth")


@pytest.mark.parametrize("case", ["v2", "metric", "clstoken", "registers"])
def test_gradients_reach_every_trainable_parameter(case):
    name, overrides, _ = CASES[case]
    torch.manual_seed(0)
    model = create_model(name, **overrides).train()
    with torch.no_grad():
        model.head.scratch.output_conv2[2].bias.fill_(1.0)  # keep the output ReLU open everywhere
    pred, tokens = model.forward_with_features(torch.randn(2, 3, 28, 42))
    (pred.mean() + tokens.pow(2).mean()).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    no_grad = sorted(n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0)
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize(("height", "width"), [(14, 14), (14, 70), (98, 28), (42, 56)])
def test_any_multiple_of_the_patch_size_works(height, width):
    model = create_model("test_dav2").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, height, width)).shape == (1, height, width)


@pytest.mark.parametrize(("height", "width"), [(15, 14), (14, 27), (100, 100), (0, 14)])
def test_other_sizes_are_a_clear_error(height, width):
    model = create_model("test_dav2").eval()
    with pytest.raises(ValueError, match=f"image size {height}x{width} .*multiple of the patch size 14"):
        model(torch.randn(1, 3, height, width))
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        create_encoder("test").forward_patch_tokens(torch.randn(1, 3, height, width))


def test_wrong_layout_is_a_clear_error():
    model = create_model("test_dav2")
    with pytest.raises(ValueError, match=r"B x 3 x H x W, got shape \(3, 28, 28\)"):
        model(torch.randn(3, 28, 28))
    with pytest.raises(ValueError, match=r"got shape \(1, 1, 28, 28\)"):
        model(torch.randn(1, 1, 28, 28))


def test_normalize():
    model = create_model("test_dav2")
    image = torch.rand(2, 3, 14, 28)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(image), (image - mean) / std)
