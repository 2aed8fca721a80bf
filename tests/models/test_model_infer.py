"""`DepthModel.infer`: official preprocessing, mixed inputs and sizes, batching, output at the original size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from depthkit.models import Prediction, create_model
from depthkit.models.preprocess import official_resize_hw, resize_image, to_float_chw
from depthkit.models.sizing import MAX_ASPECT_RATIO
from depthkit.spaces import AFFINE_DISPARITY, METRIC_DEPTH


class OfficialResize:
    """Depth-Anything-V2 `util/transform.py` `Resize.get_size`, transcribed for the test (width/height order kept)."""

    def __init__(self, width, height, keep_aspect_ratio, ensure_multiple_of, resize_method):
        self.width, self.height = width, height
        self.keep, self.multiple, self.method = keep_aspect_ratio, ensure_multiple_of, resize_method

    def constrain_to_multiple_of(self, x, min_val=0, max_val=None):
        y = (np.round(x / self.multiple) * self.multiple).astype(int)
        if max_val is not None and y > max_val:
            y = (np.floor(x / self.multiple) * self.multiple).astype(int)
        if y < min_val:
            y = (np.ceil(x / self.multiple) * self.multiple).astype(int)
        return y

    def get_size(self, width, height):
        scale_height = self.height / height
        scale_width = self.width / width
        if self.keep and self.method == "lower_bound":
            if scale_width > scale_height:
                scale_height = scale_width
            else:
                scale_width = scale_height
        new_height = self.constrain_to_multiple_of(scale_height * height, min_val=self.height)
        new_width = self.constrain_to_multiple_of(scale_width * width, min_val=self.width)
        return (new_width, new_height)


@pytest.mark.parametrize("input_size", [518, 364, 50])
def test_resize_rule_is_the_official_one(input_size):
    official = OfficialResize(input_size, input_size, True, 14, "lower_bound")
    rng = np.random.default_rng(0)
    sizes = [(480, 640), (640, 480), (375, 1242), (518, 518), (1, 1), (7, 3000)]
    sizes += [tuple(int(v) for v in rng.integers(1, 2500, size=2)) for _ in range(300)]
    num_compared = 0
    for height, width in sizes:
        if max(height, width) > MAX_ASPECT_RATIO * min(height, width):  # no device holds its network input
            with pytest.raises(ValueError, match=rf"a {height}x{width} image is too elongated"):
                official_resize_hw(height, width, input_size, 14)
            continue
        new_width, new_height = official.get_size(width, height)
        assert official_resize_hw(height, width, input_size, 14) == (new_height, new_width), (height, width)
        num_compared += 1
    assert num_compared > 250
    assert official_resize_hw(480, 640) == (518, 686)  # transformers' test: a 640x480 COCO image -> 518 x 686


def test_resize_is_opencv_bicubic():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for height, width in [(480, 640), (300, 200), (37, 53)]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        new_hw = official_resize_hw(height, width)
        expected = cv2.resize(image / 255.0, new_hw[::-1], interpolation=cv2.INTER_CUBIC)
        got = resize_image(to_float_chw(image), new_hw).permute(1, 2, 0).double().numpy()
        np.testing.assert_allclose(got, expected, atol=5e-4, rtol=0)


def test_input_conversion():
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(to_float_chw(rgb), expected)
    torch.testing.assert_close(to_float_chw(Image.fromarray(rgb)), expected)
    torch.testing.assert_close(to_float_chw(Image.fromarray(rgb).convert("RGBA")), expected)
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], axis=2)
    torch.testing.assert_close(to_float_chw(rgba), expected)
    torch.testing.assert_close(to_float_chw(torch.from_numpy(rgb).permute(2, 0, 1)), expected)
    torch.testing.assert_close(to_float_chw(expected.clone()), expected)
    grey = rgb[:, :, 0]
    assert torch.equal(to_float_chw(grey), to_float_chw(np.stack([grey] * 3, axis=2)))
    assert torch.equal(to_float_chw(Image.fromarray(grey)), to_float_chw(grey))
    with pytest.raises(ValueError, match="H x W x C"):
        to_float_chw(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="unsupported image type"):
        to_float_chw("image.png")
    with pytest.raises(ValueError, match=r"spans \[0, 255\] \(a 0-255 image\? pass it as uint8"):
        to_float_chw(np.eye(20, 30, dtype=np.float32)[:, :, None].repeat(3, axis=2) * 255)
    with pytest.raises(ValueError, match="must hold values in"):
        to_float_chw(torch.full((3, 4, 4), float("nan")))
    assert to_float_chw(np.ones((4, 4, 3), np.float32)).max() == 1.0  # the edges of [0, 1] are fine


def _manual(model, image_uint8: np.ndarray, input_size: int) -> np.ndarray:
    """The official infer_image, step by step (torch resize in place of cv2)."""
    height, width = image_uint8.shape[:2]
    image_CHW = torch.from_numpy(image_uint8).permute(2, 0, 1).float() / 255
    resized = resize_image(image_CHW, official_resize_hw(height, width, input_size))
    with torch.no_grad():
        depth = model(model.normalize(resized[None]))
    depth = F.interpolate(depth[:, None], (height, width), mode="bilinear", align_corners=True)[0, 0]
    return depth.numpy()


def test_infer_mixed_inputs():
    torch.manual_seed(0)
    model = create_model("test_dav2").train()
    rng = np.random.default_rng(1)
    rgb_a = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    rgb_b = rng.integers(0, 256, (45, 30, 3), dtype=np.uint8)
    rgb_c = rng.integers(0, 256, (41, 61, 3), dtype=np.uint8)  # same network size as rgb_a -> same batch
    grey = rng.integers(0, 256, (33, 50), dtype=np.uint8)
    images = [rgb_a, Image.fromarray(rgb_b).convert("RGBA"), torch.from_numpy(rgb_c).permute(2, 0, 1), grey]
    preds = model.infer(images, input_size=28, batch_size=8)
    assert model.training, "infer must restore the training mode"
    assert isinstance(preds, list) and len(preds) == 4
    for pred, shape in zip(preds, [(40, 60), (45, 30), (41, 61), (33, 50)], strict=True):
        assert isinstance(pred, Prediction)
        assert pred.values.shape == shape and pred.values.dtype == np.float32
        assert pred.output_space == AFFINE_DISPARITY
    model.eval()
    np.testing.assert_allclose(preds[0].values, _manual(model, rgb_a, 28), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(preds[1].values, _manual(model, rgb_b, 28), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(preds[3].values, _manual(model, np.stack([grey] * 3, 2), 28), rtol=1e-5, atol=1e-5)
    one_by_one = model.infer(images, input_size=28, batch_size=1)
    for a, b in zip(preds, one_by_one, strict=True):
        np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-5)


def test_infer_single_image_and_metric_space():
    model = create_model("test_dav2_metric").eval()
    image = np.random.default_rng(2).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    pred = model.infer(image, input_size=14)
    assert isinstance(pred, Prediction)
    assert pred.values.shape == (30, 20)
    assert pred.output_space == METRIC_DEPTH
    assert (pred.values > 0).all() and (pred.values < 20.0).all()
    with pytest.raises(ValueError, match="batch_size"):
        model.infer(image, batch_size=0)


def test_infer_restores_the_mode_of_every_submodule():
    """A frozen encoder kept in eval mode inside a training model stays so (drop-path would come back)."""
    model = create_model("test_dav2", drop_path_rate=0.1).train()
    model.encoder.eval()
    model.infer(np.zeros((20, 30, 3), np.uint8), input_size=14)
    assert model.training and model.head.training and not model.encoder.training
    assert not any(m.training for m in model.encoder.modules())


def test_normalize_refuses_an_integer_image():
    with pytest.raises(ValueError, match=r"normalize takes a float image in \[0, 1\], got torch.uint8"):
        create_model("test_dav2").normalize(torch.zeros((1, 3, 14, 14), dtype=torch.uint8))
