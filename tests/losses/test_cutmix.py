"""CutMix wrapper: a loss per mixed region (each with its own alignment), averaged by area."""

from __future__ import annotations

import pytest
import torch

from depthkit.losses import DepthLoss, cutmix_loss, gradient_matching_loss, preset, ssi_lsq_loss, ssi_median_loss


def make_batch(seed=0, shape=(3, 12, 11)):
    g = torch.Generator().manual_seed(seed)
    pred_BHW = torch.rand(shape, generator=g)
    target_BHW = torch.rand(shape, generator=g)
    valid_BHW = torch.rand(shape, generator=g) > 0.2
    mask_BHW = torch.zeros(shape, dtype=torch.bool)
    mask_BHW[0, 2:8, 3:9] = True  # a box from the partner
    mask_BHW[2] = True  # fully replaced
    valid_BHW[1, :6] = False
    return pred_BHW, target_BHW, valid_BHW, mask_BHW


@pytest.mark.parametrize("loss_fn", [ssi_lsq_loss, ssi_median_loss, gradient_matching_loss])
def test_cutmix_equals_manual_per_region_computation(loss_fn):
    pred_BHW, target_BHW, valid_BHW, mask_BHW = make_batch()
    out = cutmix_loss(loss_fn, pred_BHW, target_BHW, valid_BHW, mask_BHW, impl="torch")
    per_image, weights = [], []
    for i in range(pred_BHW.shape[0]):
        total, area = 0.0, 0
        for region_HW in (~mask_BHW[i], mask_BHW[i]):
            v_1HW = (valid_BHW[i] & region_HW)[None]
            n = int(v_1HW.sum())
            if n:
                total += n * loss_fn(pred_BHW[i : i + 1], target_BHW[i : i + 1], v_1HW, impl="torch")["loss"].item()
            area += n
        per_image.append(total / area if area else 0.0)
        weights.append(area > 0)
    expected = sum(p for p, w in zip(per_image, weights, strict=True) if w) / sum(weights)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(out["loss_per_image"], torch.tensor(per_image))
    assert out["num_valid"].tolist() == valid_BHW.sum(dim=(1, 2)).tolist()
    assert {"loss_own", "loss_partner"} <= set(out)
    partner_pixels = (valid_BHW & mask_BHW).sum().item()
    assert out["mixed_fraction"].item() == pytest.approx(partner_pixels / valid_BHW.sum().item())


def piecewise_affine_batch():
    """Prediction = a different affine map of the target in each region: only per-region alignment fits both."""
    g = torch.Generator().manual_seed(1)
    target_BHW = torch.rand(2, 14, 13, generator=g) + 0.5
    mask_BHW = torch.zeros(2, 14, 13, dtype=torch.bool)
    mask_BHW[:, 3:10, 4:11] = True
    pred_BHW = torch.where(mask_BHW, 5.0 * target_BHW - 2.0, 0.3 * target_BHW + 1.0)
    return pred_BHW, target_BHW, torch.ones_like(mask_BHW), mask_BHW


@pytest.mark.parametrize("name", ["midas", "dav1", "dav2", "dav2_pseudo"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_depth_loss_aligns_each_region(request, name, impl):
    if impl == "triton":
        request.getfixturevalue("triton_device")
    pred_BHW, target_BHW, valid_BHW, mask_BHW = piecewise_affine_batch()
    loss = DepthLoss(preset(name, impl=impl))
    mixed = loss(pred_BHW, target_BHW, valid_BHW, mask_BHW)
    plain = loss(pred_BHW, target_BHW, valid_BHW)
    assert mixed["loss"].item() < 1e-4  # each region is an exact affine map of its target
    assert plain["loss"].item() > 0.1  # one alignment for the whole image cannot fit both
    assert set(mixed) >= {"loss", "ssi", "loss_per_image", "ssi_per_image", "loss_own", "loss_partner"}


def test_cutmix_rejects_a_bad_mask():
    pred_BHW, target_BHW, valid_BHW, mask_BHW = make_batch()
    with pytest.raises(ValueError, match="cutmix_mask"):
        cutmix_loss(ssi_lsq_loss, pred_BHW, target_BHW, valid_BHW, mask_BHW.float())
