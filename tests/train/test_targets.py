"""Which space a batch's targets are in, and what the loss then sees."""

import numpy as np
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


def test_a_sky_mask_travels_from_the_manifest_to_the_training_targets(tmp_path):
    """Depth Anything V1 trains its teacher with sky at disparity 0 where a set has no label there
    (LiheYoung/Depth-Anything#206): the manifest's `sky` column -> KEY.sky.png -> crop -> batch -> targets."""
    from PIL import Image

    from depthkit.data.convert import convert_manifest
    from depthkit.data.stream import ShardStream
    from depthkit.data.transforms import SampleTransform, TransformConfig

    h, w = 28, 42
    depth = np.full((h, w), 2000, np.uint16)  # 2 m
    depth[:10] = 0  # the top rows have no depth
    sky = np.zeros((h, w), np.uint8)
    sky[:8], sky[20:, :3] = 1, 1  # sky: 8 unlabeled rows, and a corner that has a label (it keeps it)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(depth).save(tmp_path / "a_depth.png")
    Image.fromarray(sky, mode="L").save(tmp_path / "a_sky.png")
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(tmp_path / "b.png")
    Image.fromarray(depth).save(tmp_path / "b_depth.png")
    header = "source,rgb,depth,depth_format,scale_to_metres,invalid,fx,fy,cx,cy,domain,gt_type,notes,sky\n"
    rows = [
        "s,a.png,a_depth.png,uint16_png,0.001,0,,,,,out,x,,a_sky.png",
        "s,b.png,b_depth.png,uint16_png,0.001,0,,,,,out,x,,",
    ]
    (tmp_path / "manifest.csv").write_text(header + "".join(r + "\n" for r in rows))
    convert_manifest(tmp_path / "manifest.csv", tmp_path / "shards")
    transform = SampleTransform(TransformConfig(crop_size=(h, w), hflip=False))
    (batch,) = ShardStream(tmp_path / "shards", batch_size=2, transform=transform)
    assert batch["key"] == ["a", "b"]
    torch.testing.assert_close(batch["sky"][0], torch.from_numpy(sky > 0))
    assert not batch["sky"][1].any()  # a sample without a mask has no sky
    # Resized, cropped and flipped, the mask stays on the pixels it marks: the image's top rows are sky (and have no
    # depth); the sky is never where the depth is valid except the labeled corner.
    image = np.full((h, w, 3), 90, np.uint8)
    image[:8, :20] = 250  # the sky, brightest: the left of the top rows only, so a flip shows
    Image.fromarray(image).save(tmp_path / "a.png")
    sky[:8, 20:] = 0
    Image.fromarray(sky, mode="L").save(tmp_path / "a_sky.png")
    convert_manifest(tmp_path / "manifest.csv", tmp_path / "shards2")
    transform = SampleTransform(TransformConfig(crop_size=(14, 28)))  # random crops of an upscaled frame, flips
    seen = set()  # the sky's column range in each crop: flipped and unflipped ones both appear
    stream = ShardStream(tmp_path / "shards2", batch_size=2, transform=transform)  # each pass: new crops, flips
    for _ in range(6):
        for crops in stream:
            bright = crops["image"][0].float().mean(dim=0) > 200
            assert torch.equal(crops["sky"][0] & ~crops["valid"][0], bright & ~crops["valid"][0])
            seen.add(
                tuple(crops["sky"][0].any(dim=0).nonzero().flatten()[[0, -1]].tolist()) if crops["sky"][0].any() else ()
            )
    assert any(r and r[0] == 0 and r[1] < 27 for r in seen) and any(r and r[1] == 27 and r[0] > 0 for r in seen), seen

    target, valid = targets_in_space(batch, AFFINE_DISPARITY)
    assert valid[0, :8].all() and (target[0, :8] == 0).all()  # unlabeled sky: valid, farthest
    assert not valid[0, 8:10].any()  # neither depth nor sky
    torch.testing.assert_close(target[0, 20:, :3], torch.full((8, 3), 0.5))  # labeled sky keeps its label
    assert not valid[1, :10].any()
    _, metric_valid = targets_in_space(batch, METRIC_DEPTH)  # a metric model has no depth for sky
    assert not metric_valid[0, :10].any()
