"""Alignment recovers exact affine / scaled predictions; a known factor gives closed-form metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from depthkit.eval.alignment import FAR_DEPTH_CAP, align_to_depth, fit_scale_shift, resolve_alignment
from depthkit.eval.metrics import depth_metrics
from depthkit.spaces import AFFINE_DISPARITY, DISPARITY, METRIC_DEPTH


@pytest.fixture
def scene():
    rng = np.random.default_rng(0)
    target_HW = rng.uniform(0.5, 9.0, (24, 32))
    mask_HW = rng.random((24, 32)) > 0.3
    return target_HW, mask_HW


def _align(pred_HW, target_HW, mask_HW, alignment, space, min_depth=1e-3, max_depth=10.0):
    return align_to_depth(
        pred_HW, target_HW, mask_HW, alignment=alignment, output_space=space, min_depth=min_depth, max_depth=max_depth
    )


def test_exactly_affine_disparity_is_recovered(scene):
    target_HW, mask_HW = scene
    pred_HW = (1.0 / target_HW - 0.02) / 0.25  # so that 0.25 * pred + 0.02 = 1 / gt
    pred_HW[~mask_HW] = -7.0  # whatever lies outside the mask must not matter
    depth_HW, fit = _align(pred_HW, target_HW, mask_HW, "lsq_disparity", AFFINE_DISPARITY)
    assert fit.scale == pytest.approx(0.25, rel=1e-9) and fit.shift == pytest.approx(0.02, abs=1e-9)
    m = depth_metrics(depth_HW, target_HW, mask_HW)
    assert m["abs_rel"] == pytest.approx(0.0, abs=1e-9)
    assert m["delta1"] == 1.0 and m["rmse"] == pytest.approx(0.0, abs=1e-8)


def test_exactly_affine_depth_is_recovered_by_lsq_depth(scene):
    target_HW, mask_HW = scene
    pred_HW = 3.0 * target_HW - 1.0
    pred_HW[~mask_HW] = 500.0  # whatever lies outside the mask must not matter
    depth_HW, fit = _align(pred_HW, target_HW, mask_HW, "lsq_depth", METRIC_DEPTH)
    assert (fit.scale, fit.shift) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert depth_metrics(depth_HW, target_HW, mask_HW)["abs_rel"] == pytest.approx(0.0, abs=1e-9)


def test_median_scaling_recovers_a_scale(scene):
    target_HW, mask_HW = scene
    pred_HW = target_HW / 7.0
    pred_HW[~mask_HW] = 500.0  # whatever lies outside the mask must not matter
    depth_HW, fit = _align(pred_HW, target_HW, mask_HW, "median", METRIC_DEPTH)
    assert fit.scale == pytest.approx(7.0)
    assert depth_metrics(depth_HW, target_HW, mask_HW)["abs_rel"] == pytest.approx(0.0, abs=1e-12)
    # The ratio of the medians, not of the means: far outliers in the prediction leave it as it is.
    target_HW = np.arange(1.0, 12.0).reshape(1, 11)
    pred_HW = target_HW / 7.0
    pred_HW[0, -2:] = [100.0, 200.0]
    _, fit = _align(pred_HW, target_HW, np.ones_like(target_HW, dtype=bool), "median", METRIC_DEPTH, max_depth=50.0)
    assert fit.scale == pytest.approx(np.median(target_HW) / np.median(pred_HW), rel=1e-12)
    assert fit.scale == pytest.approx(7.0, rel=1e-12)


@pytest.mark.parametrize("factor", [1.1, 0.9, 1.3])
def test_known_factor_gives_closed_form_numbers(scene, factor):
    target_HW, mask_HW = scene
    depth_HW, _ = _align(factor * target_HW, target_HW, mask_HW, "none", METRIC_DEPTH, max_depth=100.0)
    m = depth_metrics(depth_HW, target_HW, mask_HW)
    gt = target_HW[mask_HW]
    k = factor
    assert m["abs_rel"] == pytest.approx(abs(k - 1), rel=1e-12)
    assert m["sq_rel"] == pytest.approx((k - 1) ** 2 * gt.mean(), rel=1e-12)
    assert m["rmse"] == pytest.approx(abs(k - 1) * math.sqrt(np.mean(gt**2)), rel=1e-12)
    assert m["rmse_log"] == pytest.approx(abs(math.log(k)), rel=1e-12)
    assert m["log10"] == pytest.approx(abs(math.log10(k)), rel=1e-12)
    assert m["silog"] == pytest.approx(0.0, abs=1e-5)  # a global scale is invisible to SILog
    ratio = max(k, 1 / k)
    assert m["delta1"] == float(ratio < 1.25) and m["delta2"] == float(ratio < 1.25**2)


def test_metric_depth_in_disparity_fit_and_disparity_predictions(scene):
    target_HW, mask_HW = scene
    depth_HW, _ = _align(2.0 * target_HW, target_HW, mask_HW, "lsq_disparity", METRIC_DEPTH)
    assert depth_metrics(depth_HW, target_HW, mask_HW)["abs_rel"] == pytest.approx(0.0, abs=1e-9)
    depth_HW, fit = _align(4.0 / target_HW, target_HW, mask_HW, "median", DISPARITY)
    assert fit.scale == pytest.approx(4.0)
    assert depth_metrics(depth_HW, target_HW, mask_HW)["abs_rel"] == pytest.approx(0.0, abs=1e-12)


def test_aligned_disparity_is_capped_so_depth_stays_finite(scene):
    target_HW, mask_HW = scene
    pred_HW = 1.0 / target_HW
    pred_HW[0, 0] = -50.0  # aligned disparity goes negative here
    pred_HW[0, 1] = np.nan
    depth_HW, _ = _align(pred_HW, target_HW, mask_HW, "lsq_disparity", AFFINE_DISPARITY, max_depth=10.0)
    assert np.all(np.isfinite(depth_HW)) and depth_HW.min() >= 1e-3 and depth_HW.max() <= 10.0
    assert depth_HW[0, 0] == 10.0  # MiDaS: disparity below 1/cap becomes 1/cap
    depth_HW, _ = _align(pred_HW, target_HW, mask_HW, "lsq_disparity", AFFINE_DISPARITY, max_depth=np.inf)
    assert depth_HW[0, 0] == FAR_DEPTH_CAP


def test_non_finite_disparity_goes_to_the_nearest_bound_not_to_the_shift(scene):
    """NaN is min_depth, as in every alignment (`clamp_depth`); +inf disparity is as near as can be, -inf as far.
    Zeroed before the fit's shift, they came out at 1 / shift: a plausible depth that hid a broken prediction."""
    target_HW, mask_HW = scene
    pred_HW = 1.0 / target_HW
    pred_HW[0, :3] = [np.nan, np.inf, -np.inf]
    depth_HW, fit = _align(pred_HW, target_HW, mask_HW, "lsq_disparity", AFFINE_DISPARITY, max_depth=10.0)
    assert fit.scale > 0 and depth_HW[0, :3].tolist() == [1e-3, 1e-3, 10.0]


@pytest.mark.parametrize(
    ("alignment", "space", "value"),
    [
        ("lsq_disparity", AFFINE_DISPARITY, np.nan),
        ("lsq_disparity", METRIC_DEPTH, 0.0),
        ("lsq_depth", METRIC_DEPTH, np.nan),
        ("median", METRIC_DEPTH, 0.0),
    ],
)
def test_a_prediction_with_nothing_to_fit_is_scored_at_min_depth_not_refused(scene, alignment, space, value):
    """An all-NaN prediction (an fp16 overflow), or a metric depth of 0 everywhere, stopped `depthkit eval` with
    'cannot fit an alignment on zero pixels' and no image named. It scores as ZoeDepth scores NaN: min_depth."""
    target_HW, mask_HW = scene
    depth_HW, fit = _align(np.full(target_HW.shape, value), target_HW, mask_HW, alignment, space)
    assert fit.degenerate and (depth_HW == 1e-3).all()
    assert depth_metrics(depth_HW, target_HW, mask_HW)["delta1"] == 0.0


def test_constant_prediction_is_a_flagged_degenerate_fit():
    fit = fit_scale_shift(np.full(10, 3.0), np.arange(10.0))
    assert fit.degenerate and fit.scale == 0.0 and fit.shift == pytest.approx(4.5)


def test_resolve_alignment_says_what_and_why():
    assert resolve_alignment(None, output_space=METRIC_DEPTH, default_relative="lsq_disparity")[0] == "none"
    name, reason = resolve_alignment("auto", output_space=AFFINE_DISPARITY, default_relative="lsq_disparity")
    assert name == "lsq_disparity" and AFFINE_DISPARITY in reason
    assert resolve_alignment("median", output_space=METRIC_DEPTH, default_relative="lsq_disparity") == (
        "median",
        "requested",
    )
    with pytest.raises(ValueError, match="cannot turn affine_disparity"):
        resolve_alignment("lsq_depth", output_space=AFFINE_DISPARITY, default_relative="lsq_disparity")
    with pytest.raises(ValueError, match="alignment="):
        resolve_alignment("magic", output_space=METRIC_DEPTH, default_relative="lsq_disparity")
    with pytest.raises(ValueError, match="output space"):
        resolve_alignment(None, output_space="depth", default_relative="lsq_disparity")


def test_an_empty_depth_range_is_refused(scene):
    target_HW, mask_HW = scene
    with pytest.raises(ValueError, match=r"depth range \[10.0, 1.0\]: expected 0 < min_depth < max_depth"):
        _align(1.0 / target_HW, target_HW, mask_HW, "lsq_disparity", AFFINE_DISPARITY, min_depth=10.0, max_depth=1.0)
