from __future__ import annotations

import numpy as np

from depthkit.data.synthetic import DEPTH_STEP_M, FAR_CAP_M, render_scene


def test_scenes_are_deterministic_and_differ_by_index():
    a, b, c = render_scene(5, 0, 40, 56), render_scene(5, 0, 40, 56), render_scene(5, 1, 40, 56)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["target"], b["target"])
    assert not np.array_equal(a["target"], c["target"])
    assert a["__key__"] != c["__key__"]


def test_depth_is_exact_quantized_and_capped():
    s = render_scene(0, 3, 64, 80)
    depth, valid = s["target"], s["valid"]
    assert s["image"].shape == (64, 80, 3) and s["image"].dtype == np.uint8
    assert depth.dtype == np.float32 and valid.all()
    assert depth.min() > 0 and depth.max() <= FAR_CAP_M
    steps = depth.astype(np.float64) / DEPTH_STEP_M
    np.testing.assert_allclose(steps, np.rint(steps), atol=1e-3)
    assert s["meta"]["output_space"] == "metric_depth" and s["meta"]["intrinsics"]["fx"] > 0


def test_bottom_rows_are_nearer_than_the_horizon_on_average():
    """A monocular cue the demo relies on: the ground recedes towards the top of the image."""
    near = far = 0.0
    for i in range(8):
        d = render_scene(1, i, 48, 64)["target"]
        near += d[-4:].mean()
        far += d[:4].mean()
    assert near < far
