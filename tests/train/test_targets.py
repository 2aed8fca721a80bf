"""Which space a batch's targets are in, and what the loss then sees."""

import pytest
import torch

from depthkit.spaces import AFFINE_DISPARITY, METRIC_DEPTH
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


def test_a_batch_mixing_spaces_is_refused():
    metas = [{"output_space": METRIC_DEPTH}, {"pseudo": {"output_space": AFFINE_DISPARITY}}]
    with pytest.raises(ValueError, match="mixes target spaces"):
        targets_in_space(_batch(metas), AFFINE_DISPARITY)
