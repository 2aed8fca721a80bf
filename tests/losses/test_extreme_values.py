"""Extreme and broken values: both impls agree, garbage at invalid pixels stays out, a diverged image shows."""

from __future__ import annotations

import pytest
import torch

from depthkit.losses import DepthLossConfig, preset, silog_loss
from depthkit_kernels import feature_alignment, gradient_matching, masked_median, ssi_lsq


def _maps(shape=(2, 6, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    pred_BHW = torch.randn(shape, generator=g)
    target_BHW = 0.7 * pred_BHW + 1.0 + 0.1 * torch.randn(shape, generator=g)
    return pred_BHW, target_BHW, torch.ones(shape, dtype=torch.bool)


@pytest.mark.parametrize("where", ["pred", "target"])
def test_silog_shows_a_nan_at_a_valid_pixel_instead_of_a_perfect_score(where):
    pred_BHW = torch.full((2, 4, 4), 2.0)
    target_BHW = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)) + 1.0
    (pred_BHW if where == "pred" else target_BHW)[0, 0, 0] = float("nan")
    out = silog_loss(pred_BHW, target_BHW, torch.ones(2, 4, 4, dtype=torch.bool))
    assert out["loss_per_image"][0].isnan() and out["loss_per_image"][1].isfinite()
    assert out["num_valid"].tolist() == [16, 16]


def test_silog_refuses_an_eps_or_lambda_out_of_range():
    pred_BHW, target_BHW = torch.rand(1, 3, 3) + 1, torch.rand(1, 3, 3) + 1
    valid_BHW = torch.ones(1, 3, 3, dtype=torch.bool)
    for kwargs, message in (({"eps": 0.0}, "eps must be positive"), ({"lambd": float("nan")}, "lambd must be in")):
        with pytest.raises(ValueError, match=message):
            silog_loss(pred_BHW, target_BHW, valid_BHW, **kwargs)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_median_ignores_inf_and_nan_at_invalid_pixels(request, device, impl):
    if impl == "triton":
        request.getfixturevalue("triton_device")
    x_BHW = torch.tensor([[[1.0, 2.0, 3.0, float("nan"), float("inf"), -float("inf")]]], device=device)
    valid_BHW = torch.tensor([[[True, True, True, False, False, False]]], device=device)
    assert masked_median(x_BHW, valid_BHW, impl=impl).tolist() == [2.0]


def test_least_squares_reference_gradients_stay_finite_for_tiny_predictions(triton_device):
    """The solve's backward divides by var(pred)^2, which underflows fp32 at |pred| ~ 1e-15: the reference solves
    in fp64, and matches the fused kernel's hand-written backward."""
    pred_BHW, target_BHW, valid_BHW = (t.to(triton_device) for t in _maps())
    grads = []
    for impl in ("torch", "triton"):
        x_BHW = (pred_BHW * 1e-15).requires_grad_()
        ssi_lsq(x_BHW, target_BHW, valid_BHW, impl=impl).loss_B.sum().backward()
        grads.append(x_BHW.grad)
    assert grads[0].isfinite().all()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-3 * grads[0].abs().max().item())


@pytest.mark.parametrize("trim", [0.0, 0.2])
def test_a_residual_that_overflows_at_a_dropped_pixel_stays_out_of_the_fused_loss(triton_device, trim):
    """Lanes outside the loss whose squared residual overflows to inf: the block's padding lanes, whose residual is
    the shift (trim 0, a target offset of 2e19), and dropped outliers (trim 0.2). The fused kernels sum through
    `where`, so inf * 0 = NaN never reaches the loss; the reference agrees."""
    pred_BHW, target_BHW, valid_BHW = (t.to(triton_device) for t in _maps())
    if trim == 0.0:
        target_BHW = 2e19 + 1e17 * pred_BHW
    else:
        target_BHW[0, 0, :3] = 3e19  # an outlier that squares past fp32's range
    losses = [ssi_lsq(pred_BHW, target_BHW, valid_BHW, trim=trim, impl=impl).loss_B for impl in ("torch", "triton")]
    assert losses[1].isfinite().all(), losses
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-6)


def test_loss_config_refuses_values_that_would_fail_late_or_drop_a_term():
    for changes, message in (
        ({"num_scales": 2.5}, "num_scales=2.5 must be an integer"),
        ({"gradient_weight": float("nan")}, "gradient_weight=nan must be >= 0 and finite"),
        ({"gradient_weight": float("inf")}, "gradient_weight=inf"),
    ):
        with pytest.raises(ValueError, match=message):
            preset("dav2", **changes)
    with pytest.raises(ValueError, match=r"preset 'dav2': unknown field\(s\) gradient_weigth; fields: objective"):
        preset("dav2", gradient_weigth=2.0)
    with pytest.raises(ValueError, match="silog_lambda=2.0 must be in"):
        DepthLossConfig(objective="silog", silog_lambda=2.0)
    pred_BHW, target_BHW, valid_BHW = _maps()
    with pytest.raises(ValueError, match="num_scales=tensor"):
        gradient_matching(pred_BHW, target_BHW, valid_BHW, num_scales=torch.tensor(3))


def test_feature_alignment_refuses_a_nan_tolerance_and_a_non_positive_eps():
    student_BND, target_BND = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    with pytest.raises(ValueError, match="tolerance is NaN"):
        feature_alignment(student_BND, target_BND, tolerance=float("nan"))
    with pytest.raises(ValueError, match="eps must be positive"):
        feature_alignment(student_BND, target_BND, eps=0.0)


@pytest.mark.parametrize("factor", [3.0, 1000.0])
def test_silog_with_lambda_one_is_scale_invariant_to_rounding(factor):
    """lambd = 1 makes SiLog the variance of the log ratio: k x the target is a perfect fit. Its one-pass form
    mean(g^2) - mean(g)^2 cancelled in fp32 and scored such a fit up to 3e-3, with a gradient."""
    target = torch.rand(3, 40, 50) * 10 + 0.5
    pred = (factor * target).requires_grad_(True)
    out = silog_loss(pred, target, torch.ones_like(target, dtype=torch.bool), lambd=1.0)
    out["loss"].backward()
    assert out["loss"].item() <= 2e-6 and pred.grad.abs().max().item() < 1e-6
