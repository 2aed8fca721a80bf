"""Which space a batch's targets are in, and what the loss then sees."""

import pytest
import torch

from depthkit.spaces import AFFINE_DISPARITY, DISPARITY, METRIC_DEPTH
from depthkit.train.module import targets_in_space


def _batch(metas):
    target = torch.full((len(metas), 2, 2), 4.0)
    return {"target": target, "valid": torch.ones_like(target, dtype=torch.bool), "meta": metas}


def test_metric_targets_become_disparity_for_a_relative_model():
    target, valid = targets_in_space(_batch([{"output_space": METRIC_DEPTH}]), AFFINE_DISPARITY)
    assert torch.equal(target, torch.full_like(target, 0.25)) and valid.all()


def test_pseudo_labels_keep_the_teachers_space_whatever_the_image_meta_says():
    # An unlabeled image converted from an RGB-D source may still carry that source's output space; the target
    # is the teacher's disparity and must not be inverted as if it were metric depth.
    meta = {"output_space": METRIC_DEPTH, "pseudo": {"output_space": AFFINE_DISPARITY}}
    target, _ = targets_in_space(_batch([meta, meta]), AFFINE_DISPARITY)
    assert torch.equal(target, torch.full_like(target, 4.0))


def test_a_batch_mixing_depth_and_disparity_is_converted_per_sample():
    """Depth Anything V1's teacher trains on depth sets and HRWSI's disparity in one batch: each sample goes to
    disparity on its own (this was refused as a whole batch)."""
    metas = [
        {"output_space": METRIC_DEPTH},
        {"output_space": DISPARITY},
        {"pseudo": {"output_space": AFFINE_DISPARITY}},
    ]
    batch = _batch(metas)
    batch["target"][0, 0, 0] = 0.0  # a depth of 0 is no measurement
    target, valid = targets_in_space(batch, AFFINE_DISPARITY)
    assert torch.equal(target[0].flatten(), torch.tensor([0.0, 0.25, 0.25, 0.25]))
    assert torch.equal(valid[0].flatten(), torch.tensor([False, True, True, True]))
    assert torch.equal(target[1:], torch.full_like(target[1:], 4.0)) and valid[1:].all()


def test_a_metric_model_refuses_other_spaces_and_unknown_spaces_are_named():
    metas = [{"output_space": METRIC_DEPTH}, {"output_space": DISPARITY}]
    with pytest.raises(ValueError, match="metric model needs metric_depth targets"):
        targets_in_space(_batch(metas), METRIC_DEPTH)
    batch = _batch([{"output_space": METRIC_DEPTH}, {"output_space": "inverse_metres"}])
    batch["key"] = ["a", "b"]
    with pytest.raises(ValueError, match="unknown target space 'inverse_metres' \\(sample 'b'\\)"):
        targets_in_space(batch, AFFINE_DISPARITY)
