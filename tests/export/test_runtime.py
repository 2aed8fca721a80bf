"""The torch-free ONNX Runtime path: preprocessing parity with torch, `predict --onnx` vs `predict`, no torch."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from depthkit.cli import main
from depthkit.export.runtime import (
    RUNTIME_REQUIREMENTS,
    OnnxDepthModel,
    official_resize_hw,
    resize_bicubic,
    resize_bilinear,
    to_float_hwc,
)
from depthkit.models import preprocess
from depthkit.models.sizing import MAX_ASPECT_RATIO

PREDICT_TOLERANCE = 1e-4  # predict --onnx vs predict (torch), relative to each image's prediction range


def test_resize_rule_is_the_models_rule():
    rng = np.random.default_rng(0)
    sizes = [(480, 640), (375, 1242), (1, 1), (14, 14), (517, 519), (1000, 13)] + [
        tuple(int(v) for v in rng.integers(1, 2000, 2)) for _ in range(300)
    ]
    for height, width in sizes:
        if max(height, width) > MAX_ASPECT_RATIO * min(height, width):  # refused by both
            continue
        for input_size, patch in [(518, 14), (28, 14), (364, 14), (100, 16)]:
            assert official_resize_hw(height, width, input_size, patch) == preprocess.official_resize_hw(
                height, width, input_size, patch
            ), (height, width, input_size, patch)


@pytest.mark.parametrize("size_hw", [(37, 53), (96, 60), (20, 20), (7, 90), (1, 5)])
def test_bicubic_resize_matches_torch(size_hw):
    image = np.random.default_rng(1).integers(0, 256, (23, 41, 3), dtype=np.uint8)
    expected = preprocess.resize_image(preprocess.to_float_chw(image), size_hw).permute(1, 2, 0).numpy()
    got = resize_bicubic(to_float_hwc(image), size_hw)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-6)  # float32 rounding of 16 weighted terms


@pytest.mark.parametrize("size_hw", [(100, 37), (5, 5), (1, 9), (30, 200)])
def test_bilinear_resize_back_matches_torch(size_hw):
    values = np.random.default_rng(2).standard_normal((14, 28)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(values)[None, None], size=size_hw, mode="bilinear", align_corners=True)
    np.testing.assert_allclose(resize_bilinear(values, size_hw), expected[0, 0].numpy(), rtol=0, atol=2e-6)


def test_images_are_converted_like_the_torch_path():
    rng = np.random.default_rng(3)
    for image in [
        rng.integers(0, 256, (9, 7), dtype=np.uint8),
        rng.integers(0, 256, (9, 7, 1), dtype=np.uint8),
        rng.integers(0, 256, (9, 7, 4), dtype=np.uint8),
        rng.random((9, 7, 3), dtype=np.float32),
    ]:
        expected = preprocess.to_float_chw(image).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(to_float_hwc(image), expected)
    with pytest.raises(ValueError, match="uint8 or float"):
        to_float_hwc(np.zeros((4, 4, 3), np.int32))
    for bad in (np.full((4, 4, 3), 255, np.float32), np.full((4, 4, 3), np.nan)):  # refused by both paths alike
        for convert in (to_float_hwc, preprocess.to_float_chw):
            with pytest.raises(ValueError, match="must hold values in"):
                convert(bad)


def test_pil_float_and_16_bit_images_are_read_not_clipped():
    """PIL's convert("RGB") turns a float image in [0, 1] black and clips 16-bit greyscale to white."""
    from PIL import Image

    grey = np.random.default_rng(4).integers(0, 256, (9, 7)).astype(np.uint8)
    grey[0, 0] = 255  # 16-bit greyscale is scaled by its maximum: 255 * 257 = 65535 maps back to 255
    expected = to_float_hwc(grey)
    float_image = Image.fromarray(grey.astype(np.float32) / 255)  # mode F
    wide_image = Image.fromarray(grey.astype(np.uint16) * 257)  # mode I;16
    for convert in (to_float_hwc, lambda image: preprocess.to_float_chw(image).permute(1, 2, 0).numpy()):
        np.testing.assert_allclose(convert(float_image), expected, atol=1e-6)
        np.testing.assert_array_equal(convert(wide_image), expected)
        with pytest.raises(ValueError, match="must hold values in"):
            convert(Image.fromarray(grey.astype(np.float32)))  # a float image in 0-255


def test_predict_onnx_matches_predict_torch(exported, checkpoint, shared_data, tmp_path):
    """Every photo of ../shared/data/unlabeled (the folder, as a user passes it) through both paths."""
    from depthkit.models.predict import IMAGE_SUFFIXES

    common = ["--save", "npy", "--input-size", "42", "--batch-size", "4", "--no-progress", "--device", "cpu"]
    folder = shared_data / "unlabeled"
    inputs = [str(folder)]
    photos = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    assert len(photos) >= 40
    torch_args = ["--model", "test_dav2", "--checkpoint", str(checkpoint)]
    assert main(["predict", *inputs, "--out", str(tmp_path / "torch"), *torch_args, *common]) == 0
    assert main(["predict", *inputs, "--out", str(tmp_path / "onnx"), "--onnx", str(exported.path), *common]) == 0
    compared = 0
    for path in sorted((tmp_path / "torch").rglob("*.npy")):
        expected, got = np.load(path), np.load(tmp_path / "onnx" / path.relative_to(tmp_path / "torch"))
        assert got.shape == expected.shape and got.dtype == np.float32
        value_range = float(expected.max() - expected.min())
        assert value_range > 0.05, "the tiny model's prediction should vary over the image"
        np.testing.assert_allclose(got, expected, rtol=0, atol=PREDICT_TOLERANCE * value_range, err_msg=path.name)
        compared += 1
    assert compared == len(photos)


def test_predict_onnx_options(exported, checkpoint, photos, tmp_path, capsys):
    out = str(tmp_path / "out")
    args = ["predict", str(photos[0]), "--out", out, "--onnx", str(exported.path), "--no-progress"]
    assert main([*args, "--checkpoint", str(checkpoint)]) == 1
    assert "excludes --checkpoint" in capsys.readouterr().err
    assert main([*args, "--model", "dav2_vits"]) == 1
    assert "an export of test_dav2" in capsys.readouterr().err
    assert main([*args, "--device", "tpu"]) == 1
    assert "expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert main(["predict", str(photos[0]), "--out", out, "--no-progress"]) == 1
    assert "--model NAME is required" in capsys.readouterr().err


def test_foreign_onnx_graphs_are_refused(tmp_path):
    node = onnx.helper.make_node("Identity", ["image"], ["out"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [node], "g", [value("image", onnx.TensorProto.FLOAT, None)], [value("out", onnx.TensorProto.FLOAT, None)]
    )
    path = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ValueError, match="not a depthkit ONNX export"):
        OnnxDepthModel(path)
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(ValueError, match="does not load in ONNX Runtime"):
        OnnxDepthModel(tmp_path / "junk.onnx")


def test_runtime_and_predict_onnx_import_no_torch(exported, photos, tmp_path):
    code = (
        "import sys\n"
        "at_start = set(sys.modules)\n"
        "import numpy as np\n"
        "from depthkit.export.runtime import OnnxDepthModel\n"
        f"model = OnnxDepthModel({str(exported.path)!r})\n"
        "assert model.infer(np.zeros((20, 30, 3), np.uint8), input_size=28).values.shape == (20, 30)\n"
        "from depthkit.cli import main\n"
        f"assert main(['predict', {str(photos[0])!r}, '--out', {str(tmp_path)!r}, '--onnx', "
        f"{str(exported.path)!r}, '--input-size', '28', '--no-progress']) == 0\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm', 'lightning'))\n"
        "assert not bad, bad[:5]\n"
        "print(' '.join(m for m in sys.modules if '.' not in m and m not in at_start))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(tmp_path.glob("*_color.png"))) == 1
    # Every distribution it imported is one of RUNTIME_REQUIREMENTS or what they require: the documented
    # torch-free install (`pip install --no-deps depthkit` + RUNTIME_REQUIREMENTS) is enough.
    imported = _distributions(result.stdout.split()) - {"depthkit"}
    assert imported <= _requirement_closure(RUNTIME_REQUIREMENTS), imported - _requirement_closure(RUNTIME_REQUIREMENTS)
    assert {"onnxruntime", "numpy", "pillow"} <= imported


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _distributions(top_level_modules: list[str]) -> set[str]:
    owners = importlib.metadata.packages_distributions()
    return {
        _canonical(dist)
        for module in top_level_modules
        if module not in sys.stdlib_module_names
        for dist in owners.get(module, [])
    }


def _requirement_closure(names) -> set[str]:
    """The distributions `names` need, transitively (installed metadata; optional extras left out)."""
    seen, todo = set(), [_canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [_canonical(re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0]) for r in requires if "extra ==" not in r]
    return seen
