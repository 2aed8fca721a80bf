"""Per image, then the mean over images with valid pixels; all-invalid batches give a zero with a gradient."""

from __future__ import annotations

import pytest
import torch

from depthkit.losses import (
    DepthLoss,
    feature_alignment_loss,
    gradient_matching_loss,
    preset,
    silog_loss,
    ssi_lsq_loss,
    ssi_median_loss,
    ssi_trimmed_loss,
)

MAP_LOSSES = {
    "ssi_lsq": ssi_lsq_loss,
    "ssi_median": ssi_median_loss,
    "ssi_trimmed": ssi_trimmed_loss,
    "gradient_matching": gradient_matching_loss,
    "dav2_pseudo": lambda p, t, v, impl: DepthLoss(preset("dav2_pseudo", impl=impl))(p, t, v),
}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("name", MAP_LOSSES)
def test_all_invalid_batch_gives_zero_with_gradient(request, device, impl, name):
    if impl == "triton":
        request.getfixturevalue("triton_device")  # skips when Triton cannot run here
    pred_BHW = torch.rand(2, 5, 7, device=device, requires_grad=True)
    target_BHW = torch.full((2, 5, 7), float("nan"), device=device)
    valid_BHW = torch.zeros(2, 5, 7, dtype=torch.bool, device=device)
    out = MAP_LOSSES[name](pred_BHW, target_BHW, valid_BHW, impl=impl)
    loss = out["loss"]
    assert isinstance(loss, torch.Tensor) and loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(pred_BHW.grad, torch.zeros_like(pred_BHW))


def test_silog_and_features_all_invalid():
    pred_BHW = torch.rand(2, 3, 3, requires_grad=True)
    out = silog_loss(pred_BHW, torch.zeros(2, 3, 3), torch.ones(2, 3, 3, dtype=torch.bool))  # targets <= 0
    assert out["loss"].item() == 0.0 and out["loss"].requires_grad
    out["loss"].backward()
    student_BND = torch.randn(2, 4, 6, requires_grad=True)
    out = feature_alignment_loss(student_BND, student_BND.detach() * 2.0)  # everything above tolerance
    assert out["loss"].item() == 0.0 and out["loss"].requires_grad
    out["loss"].backward()


@pytest.mark.parametrize("name", ["ssi_lsq", "ssi_median", "gradient_matching"])
def test_mean_is_over_images_with_valid_pixels(name):
    g = torch.Generator().manual_seed(0)
    pred_BHW, target_BHW = torch.rand(3, 6, 5, generator=g), torch.rand(3, 6, 5, generator=g)
    valid_BHW = torch.rand(3, 6, 5, generator=g) > 0.3
    valid_BHW[1] = False
    out = MAP_LOSSES[name](pred_BHW, target_BHW, valid_BHW, impl="torch")
    per_image = [MAP_LOSSES[name](pred_BHW[i : i + 1], target_BHW[i : i + 1], valid_BHW[i : i + 1], impl="torch")
                 for i in (0, 2)]  # fmt: skip
    expected = (per_image[0]["loss"] + per_image[1]["loss"]) / 2
    torch.testing.assert_close(out["loss"], expected)
    assert out["loss_per_image"][1].item() == 0.0
    assert out["num_valid"].tolist() == valid_BHW.sum(dim=(1, 2)).tolist()


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("name", MAP_LOSSES)
def test_a_nan_in_a_valid_pixel_shows_in_its_image(request, device, impl, name):
    """A NaN label is a broken label: trimming must not drop it and score the image as perfect (both impls)."""
    if impl == "triton":
        request.getfixturevalue("triton_device")
    generator = torch.Generator().manual_seed(0)
    pred_BHW = torch.rand(2, 8, 10, generator=generator) + 0.5
    target_BHW = torch.rand(2, 8, 10, generator=generator) + 0.5
    target_BHW[0, 3, 4] = float("nan")
    valid_BHW = torch.ones(2, 8, 10, dtype=torch.bool)
    per_image = MAP_LOSSES[name](pred_BHW.to(device), target_BHW.to(device), valid_BHW.to(device), impl=impl)
    per_image = per_image["loss_per_image"].cpu()
    assert per_image[0].isnan() and per_image[1].isfinite(), per_image


def test_silog_checks_its_maps_like_every_dense_loss():
    pred_BHW, valid_BHW = torch.rand(2, 4, 5) + 0.5, torch.ones(2, 4, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="silog_loss: expected B x H x W maps"):  # B x 1 x H x W broadcast silently
        silog_loss(pred_BHW[:, None], pred_BHW[:, None], valid_BHW[:, None])
    with pytest.raises(ValueError, match="silog_loss: pred must be float32"):
        silog_loss(pred_BHW.long(), pred_BHW, valid_BHW)
    with pytest.raises(ValueError, match="silog_loss: empty input"):
        silog_loss(pred_BHW[:0], pred_BHW[:0], valid_BHW[:0])


@pytest.mark.parametrize("tolerance", [float("nan"), -2.0, 1.5])
def test_feature_alignment_tolerance_is_a_cosine(tolerance):
    tokens_BND = torch.randn(2, 4, 6)
    with pytest.raises(ValueError, match="is not a cosine similarity in"):
        feature_alignment_loss(tokens_BND, tokens_BND, tolerance=tolerance)
