"""Training validation scores as `depthkit eval` does: no cap from the ground truth, the model's range, image means."""

from __future__ import annotations

import pytest
import torch

from depthkit.models import create_model
from depthkit.train import DepthModule
from depthkit.train.module import aligned_image_metrics


def _batch(target_BHW: torch.Tensor) -> dict:
    n = target_BHW.shape[0]
    return {
        "image": torch.zeros(n, 3, *target_BHW.shape[1:], dtype=torch.uint8),
        "target": target_BHW,
        "valid": torch.ones_like(target_BHW, dtype=torch.bool),
        "meta": [{"output_space": "metric_depth"}] * n,
        "key": [f"k{i}" for i in range(n)],
    }


def test_an_over_estimate_is_not_hidden_by_the_images_own_largest_depth():
    """Each image's largest ground-truth depth capped its prediction: a metric model predicting twice the true
    depth scored AbsRel 0.62 and delta1 0.25, where the truth (and `depthkit eval`) is 1.0 and 0."""
    target_BHW = torch.linspace(1.0, 5.0, 2 * 8 * 8).reshape(2, 8, 8)
    meta = create_model("test_dav2_metric").meta  # max_depth 20 m
    rows = aligned_image_metrics(2 * target_BHW, _batch(target_BHW), meta)
    assert [row["abs_rel"] for row in rows] == pytest.approx([1.0, 1.0])
    assert [row["delta1"] for row in rows] == [0.0, 0.0]
    # Ground truth beyond the model's range is not scored (the official metric train.py masks it too).
    far_BHW = target_BHW.clone()
    far_BHW[0, :4] = 50.0
    (row, _) = aligned_image_metrics(far_BHW, _batch(far_BHW), meta)
    assert row["abs_rel"] == pytest.approx(0.0, abs=1e-6)
    # A relative model's affine disparity of the truth is exact after the alignment.
    relative = create_model("test_dav2").meta
    rows = aligned_image_metrics(3 / target_BHW + 0.5, _batch(target_BHW), relative)
    assert [row["abs_rel"] for row in rows] == pytest.approx([0.0, 0.0], abs=1e-6)


def test_images_with_too_few_pixels_are_left_out():
    target_BHW = torch.full((2, 4, 4), 2.0)
    batch = _batch(target_BHW)
    batch["valid"][1] = False
    batch["valid"][1, 0, :3] = True  # 3 pixels: under the 10 `depthkit eval` needs
    rows = aligned_image_metrics(target_BHW, batch, create_model("test_dav2_metric").meta)
    assert [row["key"] for row in rows] == ["k0"]


def test_the_epoch_mean_weighs_the_images_scored_not_the_batch(monkeypatch):
    """A batch of 8 with one image scored weighed as 8 images in Lightning's epoch mean."""
    module = DepthModule("test_dav2").eval()
    logged = []
    monkeypatch.setattr(module, "log_dict", lambda values, batch_size, **kwargs: logged.append(batch_size))
    monkeypatch.setattr(module, "log_terms", lambda *args, **kwargs: None)
    target_BHW = torch.full((8, 28, 28), 2.0)
    batch = _batch(target_BHW)
    batch["valid"][1:] = False  # 7 images without ground truth (sky, a failed sensor): not scored
    with torch.no_grad():
        module._evaluate("val", batch)
    assert logged == [1]
