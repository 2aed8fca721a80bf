"""Metrics against hand-worked examples, crops, masks, resizing and pair accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

from depthkit.eval.metrics import (
    crop_mask,
    depth_metrics,
    evaluation_mask,
    mean_over_images,
    pair_accuracy,
    resize_bilinear,
)


def _row(values):
    return np.asarray(values, dtype=np.float64)[None, :]


def test_hand_worked_example():
    # gt = 1, 2, 4 m; prediction 2 m everywhere.
    gt, pred = _row([1.0, 2.0, 4.0]), _row([2.0, 2.0, 2.0])
    m = depth_metrics(pred, gt, np.ones_like(gt, dtype=bool))
    ln2 = math.log(2.0)
    expected = {
        "abs_rel": (1 / 1 + 0 + 2 / 4) / 3,  # 0.5
        "sq_rel": (1 / 1 + 0 + 4 / 4) / 3,  # 2/3
        "rmse": math.sqrt((1 + 0 + 4) / 3),
        "rmse_log": ln2 * math.sqrt(2 / 3),
        "log10": 2 * math.log10(2.0) / 3,
        "silog": 100 * ln2 * math.sqrt(2 / 3),  # log errors +ln2, 0, -ln2 have mean 0
        "delta1": 1 / 3,  # ratios 2, 1, 2
        "delta2": 1 / 3,  # 2 > 1.5625
        "delta3": 1 / 3,  # 2 > 1.953125
    }
    for name, value in expected.items():
        assert m[name] == pytest.approx(value, rel=1e-12), name


def test_delta_thresholds_are_strict_and_nested():
    gt = _row([1.0, 1.0, 1.0, 1.0])
    pred = _row([1.2, 1.5, 1.9, 2.5])  # ratio < 1.25, < 1.5625, < 1.953125, none
    m = depth_metrics(pred, gt, np.ones_like(gt, dtype=bool))
    assert (m["delta1"], m["delta2"], m["delta3"]) == (0.25, 0.5, 0.75)


def test_mask_selects_pixels_and_zero_targets_outside_are_ignored():
    gt = _row([1.0, 0.0, 4.0])
    pred = _row([1.0, 123.0, 4.0])
    m = depth_metrics(pred, gt, gt > 0)
    assert m["abs_rel"] == 0.0 and m["delta1"] == 1.0


@pytest.mark.parametrize("bad", [0.0, -1.0, np.inf, np.nan])
def test_non_positive_or_non_finite_prediction_is_an_error(bad):
    gt, pred = _row([1.0, 2.0]), _row([1.0, bad])
    with pytest.raises(ValueError, match="positive and finite"):
        depth_metrics(pred, gt, np.ones_like(gt, dtype=bool))


def test_no_scored_pixel_is_an_error():
    gt = _row([1.0])
    with pytest.raises(ValueError, match="no pixel"):
        depth_metrics(gt, gt, np.zeros_like(gt, dtype=bool))


def test_eigen_nyu_crop_is_the_standard_box():
    mask = crop_mask((480, 640), "eigen_nyu")
    assert mask.sum() == (471 - 45) * (601 - 41)
    assert mask[45, 41] and mask[470, 600] and not mask[44, 41] and not mask[45, 601]
    with pytest.raises(ValueError, match="480x640"):
        crop_mask((352, 1216), "eigen_nyu")


def test_kitti_crops_are_fractions_of_the_ground_truth():
    # Garg crop on a 375x1242 KITTI frame: rows int(0.408*375)=153 .. int(0.992*375)=371, cols 44 .. 1197.
    assert crop_mask((375, 1242), "garg").sum() == (371 - 153) * (1197 - 44)
    # Eigen crop: rows int(0.3324324*375)=124 .. int(0.91351351*375)=342.
    assert crop_mask((375, 1242), "eigen_kitti").sum() == (342 - 124) * (1197 - 44)
    # KB crop first (bottom 352 rows, centred 1216 columns), then the fraction crop of that box (ZoeDepth, Marigold):
    # at 375x1242 the box starts at row 23, column 13; garg of 352x1216 is rows 143:349, columns 43:1172.
    kb_garg = crop_mask((375, 1242), "kb_garg")
    rows, cols = np.nonzero(kb_garg)
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (23 + 143, 23 + 349, 13 + 43, 13 + 1172)
    assert kb_garg.sum() == (349 - 143) * (1172 - 43)
    np.testing.assert_array_equal(crop_mask((352, 1216), "kb_garg"), crop_mask((352, 1216), "garg"))
    np.testing.assert_array_equal(crop_mask((352, 1216), "kb_eigen"), crop_mask((352, 1216), "eigen_kitti"))
    with pytest.raises(ValueError, match="at least 1216x352"):
        crop_mask((300, 1000), "kb_garg")


def test_crop_choices_of_the_command_are_the_metrics_crops():
    from depthkit.eval.commands import CROP_CHOICES
    from depthkit.eval.metrics import CROPS

    assert CROP_CHOICES == CROPS
    # The command lists its benchmarks without importing them (a fast --help): the list must name each one.
    import re

    from depthkit.eval.benchmarks import PROTOCOLS
    from depthkit.eval.commands import DATASET_HELP

    named = set(re.search(r"\((.*)\)", DATASET_HELP).group(1).split(", "))
    assert named == set(PROTOCOLS) - {"manifest"}  # a manifest is given by its .csv path
    assert crop_mask((3, 4), "none").all()
    with pytest.raises(ValueError, match="crop="):
        crop_mask((3, 4), "bogus")


def test_evaluation_mask_is_strict_on_the_depth_range():
    target = _row([0.001, 0.5, 10.0, 9.99, 3.0])
    valid = np.array([[True, True, True, True, False]])
    mask = evaluation_mask(target, valid, min_depth=1e-3, max_depth=10.0, crop="none")
    assert mask.tolist() == [[False, True, False, True, False]]


def test_mean_over_images_is_an_unweighted_mean():
    rows = [{"abs_rel": 0.1, "delta1": 1.0}, {"abs_rel": 0.3, "delta1": 0.5}]
    assert mean_over_images(rows, ("abs_rel", "delta1")) == pytest.approx({"abs_rel": 0.2, "delta1": 0.75})


def test_resize_bilinear_keeps_corners_and_interpolates_centres():
    small = np.array([[0.0, 2.0], [4.0, 6.0]], dtype=np.float32)
    big = resize_bilinear(small, (3, 3))  # align_corners=True: corners stay, centre is the mean
    assert_allclose(big, [[0, 1, 2], [2, 3, 4], [4, 5, 6]], atol=1e-6)
    assert resize_bilinear(small, (2, 2)) is small


def test_pair_accuracy_depends_on_which_way_is_closer():
    disparity = np.array([[5.0, 1.0], [1.0, 1.0]])
    pairs = [((0, 0), (1, 1)), ((1, 1), (0, 0)), ((0, 1), (1, 0))]  # right, wrong, tie (wrong)
    assert pair_accuracy(disparity, pairs, larger_is_closer=True) == (1, 3)
    assert pair_accuracy(disparity, pairs, larger_is_closer=False) == (1, 3)
    with pytest.raises(ValueError, match="outside"):
        pair_accuracy(disparity, [((0, 0), (2, 0))], larger_is_closer=True)


def test_a_mask_must_be_bool_and_of_the_same_shape():
    """An integer mask would index rows (0 and 1) and score the wrong pixels without a word."""
    from depthkit.eval.alignment import align_to_depth, fit_scale_shift

    gt = np.linspace(1.0, 5.0, 12).reshape(3, 4)
    with pytest.raises(ValueError, match="the mask must be bool, got uint8"):
        depth_metrics(gt, gt, np.ones((3, 4), np.uint8))
    with pytest.raises(ValueError, match="shapes differ"):
        depth_metrics(gt, gt[:2], np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="the mask must be bool"):
        align_to_depth(
            gt,
            gt,
            np.ones((3, 4), np.uint8),
            alignment="none",
            output_space="metric_depth",
            min_depth=0.1,
            max_depth=10,
        )
    with pytest.raises(ValueError, match="non-finite fit"):
        fit_scale_shift(np.array([1.0, 2.0, np.nan]), np.array([1.0, 2.0, 3.0]))
