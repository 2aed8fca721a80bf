"""Hand-worked examples for the reference losses (the spec), and their numerical safety."""

from __future__ import annotations

import math

import pytest
import torch

from depthkit.losses import (
    feature_alignment_loss,
    gradient_matching_loss,
    silog_loss,
    ssi_lsq_loss,
    ssi_median_loss,
    ssi_trimmed_loss,
)
from depthkit_kernels import reference


def row(*values, valid=None):
    """A 1 x 1 x W map (and its all-true mask)."""
    x_BHW = torch.tensor([[list(values)]], dtype=torch.float32)
    return x_BHW, torch.ones_like(x_BHW, dtype=torch.bool) if valid is None else torch.tensor([[valid]])


# --- least squares ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["mse", "l1"])
def test_lsq_exact_affine_prediction_has_zero_loss(metric):
    pred_BHW = torch.randn(3, 7, 9, generator=torch.Generator().manual_seed(0))
    target_BHW = 2.0 * pred_BHW + 1.0
    valid_BHW = torch.rand(3, 7, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    out = ssi_lsq_loss(pred_BHW, target_BHW, valid_BHW, metric=metric, impl="torch")
    assert out["loss"].abs() < 1e-6
    torch.testing.assert_close(out["scale"], torch.full((3,), 2.0))
    torch.testing.assert_close(out["shift"], torch.full((3,), 1.0))


def test_lsq_hand_example():
    # pred (0, 1, 2), target (0, 1, 5): mean_p 1, mean_d 2, cov 5, var 2 -> s = 2.5, t = -0.5;
    # aligned (-0.5, 2, 4.5), residual (-0.5, 1, -0.5): mse 1.5 / 3 = 0.5, l1 2 / 3.
    pred_BHW, valid_BHW = row(0.0, 1.0, 2.0)
    target_BHW, _ = row(0.0, 1.0, 5.0)
    out = ssi_lsq_loss(pred_BHW, target_BHW, valid_BHW, metric="mse", impl="torch")
    torch.testing.assert_close(out["scale"], torch.tensor([2.5]))
    torch.testing.assert_close(out["shift"], torch.tensor([-0.5]))
    torch.testing.assert_close(out["loss"], torch.tensor(0.5))
    out = ssi_lsq_loss(pred_BHW, target_BHW, valid_BHW, metric="l1", impl="torch")
    torch.testing.assert_close(out["loss"], torch.tensor(2.0 / 3.0))


def test_lsq_ignores_invalid_pixels_even_if_garbage():
    pred_BHW, valid_BHW = row(0.0, 1.0, 2.0, 7.0, valid=[True, True, True, False])
    target_BHW, _ = row(0.0, 1.0, 5.0, float("nan"))
    out = ssi_lsq_loss(pred_BHW, target_BHW, valid_BHW, impl="torch")
    torch.testing.assert_close(out["loss"], torch.tensor(0.5))


def test_lsq_constant_prediction_falls_back_to_the_mean():
    pred_BHW = torch.full((1, 4, 5), 3.0, requires_grad=True)
    target_BHW = torch.arange(20.0).view(1, 4, 5)
    valid_BHW = torch.ones(1, 4, 5, dtype=torch.bool)
    out = ssi_lsq_loss(pred_BHW, target_BHW, valid_BHW, impl="torch")
    torch.testing.assert_close(out["scale"], torch.tensor([0.0]))
    torch.testing.assert_close(out["shift"], torch.tensor([9.5]))
    torch.testing.assert_close(out["loss"], target_BHW.var(unbiased=False))  # mean squared deviation
    out["loss"].backward()
    assert torch.isfinite(pred_BHW.grad).all()


def test_lsq_nearly_constant_prediction_is_singular_not_huge():
    """var(pred) below LSQ_REL_EPS * mean(pred^2): no 1/var blow-up."""
    pred_BHW = (1000.0 + 1e-5 * torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0))).requires_grad_()
    target_BHW = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = ssi_lsq_loss(pred_BHW, target_BHW, torch.ones(1, 8, 8, dtype=torch.bool), impl="torch")
    assert out["scale"].item() == 0.0
    out["loss"].backward()
    assert torch.isfinite(pred_BHW.grad).all()


@pytest.mark.parametrize("num_valid", [0, 1])
def test_lsq_fewer_than_two_valid_pixels(num_valid):
    pred_BHW = torch.randn(1, 3, 3, requires_grad=True)
    valid_BHW = torch.zeros(1, 3, 3, dtype=torch.bool)
    valid_BHW.view(-1)[:num_valid] = True
    out = ssi_lsq_loss(pred_BHW, torch.rand(1, 3, 3), valid_BHW, impl="torch")
    assert out["loss"].item() == 0.0 and out["loss_per_image"].item() == 0.0
    out["loss"].backward()
    assert torch.isfinite(pred_BHW.grad).all()


# --- median / MAD ----------------------------------------------------------------------------------------------


def test_median_is_the_lower_median():
    x_BHW, valid_BHW = row(4.0, 1.0, 3.0, 2.0)
    assert reference.masked_lower_median(x_BHW, valid_BHW).item() == 2.0  # even count: lower of (2, 3)
    x_BHW, valid_BHW = row(5.0, 1.0, 3.0)
    assert reference.masked_lower_median(x_BHW, valid_BHW).item() == 3.0
    x_BHW, valid_BHW = row(5.0, 1.0, 3.0, 0.0, valid=[True, True, True, False])
    assert reference.masked_lower_median(x_BHW, valid_BHW).item() == 3.0
    assert torch.median(torch.tensor([4.0, 1.0, 3.0, 2.0])).item() == 2.0  # same convention as torch


def test_median_gradient_is_split_among_ties():
    x_BHW, valid_BHW = row(1.0, 2.0, 2.0, 3.0)
    x_BHW.requires_grad_()
    reference.masked_lower_median(x_BHW, valid_BHW).sum().backward()
    torch.testing.assert_close(x_BHW.grad, torch.tensor([[[0.0, 0.5, 0.5, 0.0]]]))


def test_median_ssi_hand_example():
    # pred (1, 2, 3, 10): median 2, MAD (1 + 0 + 1 + 8) / 4 = 2.5 -> (-0.4, 0, 0.4, 3.2)
    # target (0, 1, 2, 3): median 1, MAD (1 + 0 + 1 + 2) / 4 = 1 -> (-1, 0, 1, 2)
    # |difference| (0.6, 0, 0.6, 1.2): mean 0.6
    pred_BHW, valid_BHW = row(1.0, 2.0, 3.0, 10.0)
    target_BHW, _ = row(0.0, 1.0, 2.0, 3.0)
    out = ssi_median_loss(pred_BHW, target_BHW, valid_BHW, impl="torch")
    torch.testing.assert_close(out["loss"], torch.tensor(0.6))
    torch.testing.assert_close(out["pred_median"], torch.tensor([2.0]))
    torch.testing.assert_close(out["pred_scale"], torch.tensor([1 / 2.5]))
    torch.testing.assert_close(out["target_scale"], torch.tensor([1.0]))


def test_median_ssi_exact_affine_prediction_has_zero_loss():
    target_BHW = torch.rand(2, 9, 7, generator=torch.Generator().manual_seed(0))
    valid_BHW = torch.rand(2, 9, 7, generator=torch.Generator().manual_seed(1)) > 0.2
    out = ssi_median_loss(3.0 * target_BHW + 7.0, target_BHW, valid_BHW, impl="torch")
    assert out["loss"].abs() < 1e-5


def test_median_ssi_constant_prediction_is_finite():
    pred_BHW = torch.full((2, 5, 5), 0.5, requires_grad=True)
    out = ssi_median_loss(pred_BHW, torch.rand(2, 5, 5), torch.ones(2, 5, 5, dtype=torch.bool), impl="torch")
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(pred_BHW.grad).all()


# --- trimming --------------------------------------------------------------------------------------------------


def test_trim_keeps_the_smallest_losses():
    loss_BHW, valid_BHW = row(*[float(v) for v in (3, 10, 1, 7, 2, 9, 4, 8, 6, 5)])
    weight_BHW, num_keep_B = reference.trim_weights(loss_BHW, valid_BHW, 0.1)  # drop floor(1.0) = 1: the 10
    assert num_keep_B.item() == 9
    assert torch.equal(weight_BHW, (loss_BHW < 10).float())
    weight_BHW, num_keep_B = reference.trim_weights(loss_BHW, valid_BHW, 0.25)  # drop floor(2.5) = 2: 9, 10
    assert num_keep_B.item() == 8
    assert torch.equal(weight_BHW, (loss_BHW < 9).float())
    assert (loss_BHW * weight_BHW).sum().item() / 8 == 4.5


def test_trim_ties_at_the_threshold_are_kept_fractionally():
    # losses (1, 1, 5, 5, 5), trim 0.2: keep 4 -> both 1s and 2 of the three 5s, each 5 with weight 2/3
    loss_BHW, valid_BHW = row(1.0, 5.0, 1.0, 5.0, 5.0)
    weight_BHW, num_keep_B = reference.trim_weights(loss_BHW, valid_BHW, 0.2)
    torch.testing.assert_close(weight_BHW, torch.tensor([[[1.0, 2 / 3, 1.0, 2 / 3, 2 / 3]]]))
    assert ((loss_BHW * weight_BHW).sum() / num_keep_B).item() == pytest.approx(3.0)


@pytest.mark.parametrize("alignment", ["lsq", "median"])
def test_trimmed_ssi_equals_mean_of_smallest_residuals(alignment):
    g = torch.Generator().manual_seed(0)
    pred_BHW = torch.rand(1, 6, 5, generator=g)
    target_BHW = pred_BHW + 0.05 * torch.rand(1, 6, 5, generator=g)
    target_BHW[0, 0, 0] += 5.0  # an outlier
    valid_BHW = torch.ones(1, 6, 5, dtype=torch.bool)
    metric = "l1"
    full = ssi_trimmed_loss(pred_BHW, target_BHW, valid_BHW, trim=0.0, alignment=alignment, metric=metric, impl="torch")
    trimmed = ssi_trimmed_loss(pred_BHW, target_BHW, valid_BHW, trim=0.1, alignment=alignment, impl="torch")
    # Manual: the same alignment (on all pixels), then the mean of the 27 smallest of 30 per-pixel losses.
    if alignment == "lsq":
        residual = full["scale"] * pred_BHW + full["shift"] - target_BHW
    else:
        residual = full["pred_scale"] * (pred_BHW - full["pred_median"]) - full["target_scale"] * (
            target_BHW - full["target_median"]
        )
    expected = residual.abs().flatten().sort().values[:27].mean()
    torch.testing.assert_close(trimmed["loss"], expected)
    assert trimmed["loss"] < full["loss"]


# --- gradient matching -----------------------------------------------------------------------------------------


def test_gradient_matching_hand_example():
    # residual [[0, 1], [2, 4]]: x pairs |1 - 0| + |4 - 2| = 3, y pairs |2 - 0| + |4 - 1| = 5 -> 8 / 4 pixels = 2.
    # Scale 2 keeps one pixel: no pairs, adds 0.
    pred_BHW = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    target_BHW = torch.zeros_like(pred_BHW)
    valid_BHW = torch.ones_like(pred_BHW, dtype=torch.bool)
    out = gradient_matching_loss(pred_BHW, target_BHW, valid_BHW, num_scales=2, impl="torch")
    torch.testing.assert_close(out["loss"], torch.tensor(2.0))
    # Without the bottom-right pixel: pairs |1 - 0| and |2 - 0| over 3 pixels.
    valid_BHW[0, 1, 1] = False
    out = gradient_matching_loss(pred_BHW, target_BHW, valid_BHW, num_scales=1, impl="torch")
    torch.testing.assert_close(out["loss"], torch.tensor(1.0))


def test_gradient_matching_is_shift_invariant_and_scales_apply():
    g = torch.Generator().manual_seed(0)
    pred_BHW, target_BHW = torch.rand(2, 9, 8, generator=g), torch.rand(2, 9, 8, generator=g)
    valid_BHW = torch.rand(2, 9, 8, generator=g) > 0.2
    base = gradient_matching_loss(pred_BHW, target_BHW, valid_BHW, impl="torch")["loss"]
    shifted = gradient_matching_loss(pred_BHW + 3.0, target_BHW, valid_BHW, impl="torch")["loss"]
    torch.testing.assert_close(shifted, base)
    scale_B = torch.tensor([2.0, 0.5])
    scaled = gradient_matching_loss(pred_BHW, target_BHW, valid_BHW, pred_scale_B=scale_B, impl="torch")
    explicit = gradient_matching_loss(scale_B[:, None, None] * pred_BHW, target_BHW, valid_BHW, impl="torch")
    torch.testing.assert_close(scaled["loss"], explicit["loss"])


def test_gradient_matching_matches_midas_subsampling():
    """Scale k uses x[:, ::2**k, ::2**k], exactly like MiDaS's GradientLoss (image-based, per-image mean)."""
    g = torch.Generator().manual_seed(1)
    pred_BHW, target_BHW = torch.rand(1, 11, 13, generator=g), torch.rand(1, 11, 13, generator=g)
    valid_BHW = torch.rand(1, 11, 13, generator=g) > 0.1
    expected = 0.0
    for k in range(4):
        s = 2**k
        r = (pred_BHW - target_BHW)[0, ::s, ::s]
        m = valid_BHW[0, ::s, ::s]
        total = ((r[:, 1:] - r[:, :-1]).abs() * (m[:, 1:] & m[:, :-1])).sum()
        total = total + ((r[1:] - r[:-1]).abs() * (m[1:] & m[:-1])).sum()
        expected += (total / m.sum()).item()
    out = gradient_matching_loss(pred_BHW, target_BHW, valid_BHW, impl="torch")
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


# --- feature alignment ------------------------------------------------------------------------------------------


def test_feature_alignment_hand_example():
    t = torch.tensor([1.0, 0.0, 0.0])
    target_BND = torch.stack([t, t, t, t])[None]  # 1 x 4 x 3
    student_BND = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.8, 0.6, 0.0]]])
    # cos: 1 (ignored, > 0.85), 0 -> 1, -1 -> 2, 0.8 -> 0.2: mean over 3 included = 3.2 / 3
    out = feature_alignment_loss(student_BND, target_BND, tolerance=0.85, impl="torch")
    torch.testing.assert_close(out["loss"], torch.tensor(3.2 / 3))
    assert out["num_valid"].tolist() == [3]


def test_feature_alignment_all_aligned_gives_zero_with_gradient():
    target_BND = torch.randn(2, 5, 8)
    student_BND = (3.0 * target_BND).requires_grad_()
    out = feature_alignment_loss(student_BND, target_BND, impl="torch")
    assert out["loss"].item() == 0.0 and out["loss"].requires_grad
    out["loss"].backward()
    assert torch.equal(student_BND.grad, torch.zeros_like(student_BND))


# --- SiLog -----------------------------------------------------------------------------------------------------


def test_silog_matches_depth_anything_v2_formula_for_one_image():
    g = torch.Generator().manual_seed(0)
    target_BHW = torch.rand(1, 6, 7, generator=g) * 10 + 0.1
    pred_BHW = target_BHW * torch.exp(0.3 * torch.randn(1, 6, 7, generator=g))
    valid_BHW = torch.rand(1, 6, 7, generator=g) > 0.2
    diff_log = torch.log(target_BHW[valid_BHW]) - torch.log(pred_BHW[valid_BHW])
    expected = torch.sqrt(torch.pow(diff_log, 2).mean() - 0.5 * torch.pow(diff_log.mean(), 2))
    torch.testing.assert_close(silog_loss(pred_BHW, target_BHW, valid_BHW)["loss"], expected)


def test_silog_hand_example_and_perfect_prediction():
    target_BHW = torch.full((1, 2, 2), 4.0)
    valid_BHW = torch.ones(1, 2, 2, dtype=torch.bool)
    # pred = 2 * target: g = -log 2 everywhere, loss = sqrt(g^2 - 0.5 g^2) = log(2) / sqrt(2)
    out = silog_loss(2.0 * target_BHW, target_BHW, valid_BHW)
    assert out["loss"].item() == pytest.approx(math.log(2) / math.sqrt(2), rel=1e-6)
    pred_BHW = target_BHW.clone().requires_grad_()
    out = silog_loss(pred_BHW, target_BHW, valid_BHW)
    out["loss"].backward()
    assert out["loss"].item() < 1e-5 and torch.isfinite(pred_BHW.grad).all()


def test_silog_ignores_non_positive_targets_and_clamps_predictions():
    target_BHW = torch.tensor([[[0.0, 2.0, 3.0, -1.0]]])
    pred_BHW = torch.tensor([[[0.0, -1.0, 3.0, 1.0]]], requires_grad=True)
    out = silog_loss(pred_BHW, target_BHW, torch.ones(1, 1, 4, dtype=torch.bool))
    out["loss"].backward()
    assert out["num_valid"].tolist() == [2]
    assert torch.isfinite(out["loss"]) and torch.isfinite(pred_BHW.grad).all()


def test_silog_has_no_triton_kernel():
    with pytest.raises(ValueError, match="Triton"):
        silog_loss(torch.ones(1, 2, 2), torch.ones(1, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool), impl="triton")
