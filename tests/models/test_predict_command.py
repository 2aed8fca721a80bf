"""`depthkit predict` end to end, on the real sample photos, with tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from depthkit.cli import main
from depthkit.models import create_model, save_checkpoint
from depthkit.models.predict import IMAGE_SUFFIXES, collect_inputs

TINY = ["--model", "test_dav2", "--random-weights", "--input-size", "28", "--no-progress", "--device", "cpu"]


def test_predict_writes_every_output_for_the_sample_photos(shared_data, tmp_path, capsys):
    folder = shared_data / "unlabeled"
    photos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    assert len(photos) >= 40
    torch.manual_seed(0)
    model = create_model("test_dav2")
    with torch.no_grad():
        model.head.scratch.output_conv2[2].bias.fill_(1.0)  # a random model whose output is not all ReLU-zero
    checkpoint = save_checkpoint(model, tmp_path / "tiny.pth", layout="official")
    out = tmp_path / "out"
    args = [
        "predict",
        str(folder),
        "--out",
        str(out),
        "--model",
        "test_dav2",
        "--checkpoint",
        str(checkpoint),
        "--input-size",
        "28",
        "--batch-size",
        "16",
        "--no-progress",
    ]
    assert main(args) == 0
    assert f"for {len(photos)} image(s)" in capsys.readouterr().out
    for photo in photos:
        stem = out / photo.relative_to(folder).with_suffix("")
        with Image.open(photo) as image:  # header only: size and EXIF orientation (5-8 swap the axes)
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
        values = np.load(f"{stem}.npy")
        assert values.shape == (height, width) and values.dtype == np.float32
        with Image.open(f"{stem}_color.png") as color:
            assert color.mode == "RGB" and color.size == (width, height)
        with Image.open(f"{stem}_16bit.png") as png16:
            assert png16.size == (width, height)
            encoded = np.asarray(png16)
            info = json.loads(png16.text["depthkit"])
        assert encoded.dtype == np.uint16 and encoded.max() == 65535
        decoded = info["min"] + encoded / 65535 * (info["max"] - info["min"])
        np.testing.assert_allclose(decoded, values, atol=(info["max"] - info["min"]) / 65535)
    written = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert len(written) == 3 * len(photos), "temporary files left behind, or outputs collided"


def test_bad_images_are_skipped_and_named(tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "broken.jpg").write_bytes(b"not a jpeg at all")
    rgb = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(inputs / "photo.png")
    Image.fromarray(rgb).save(inputs / "photo.jpg")  # same stem: the outputs must not collide
    Image.fromarray(rgb[:, :, 0]).save(inputs / "grey.png")
    Image.fromarray(rgb).convert("RGBA").save(inputs / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when shown
    Image.fromarray(rgb).save(inputs / "rotated.jpg", exif=exif)
    # Readable, but not for the model: it stopped the whole run, naming no file.
    Image.fromarray(rgb[:1].repeat(2, axis=0)[:, :, 0].repeat(10, axis=1)).save(inputs / "strip.png")  # 2 x 400
    Image.fromarray(rgb[:, :, 0].astype(np.float32)).save(inputs / "float255.tif")  # a float image in 0-255
    out = tmp_path / "out"
    assert main(["predict", str(inputs), "--out", str(out), "--save", "npy", *TINY]) == 0
    captured = capsys.readouterr()
    assert "skipped 3 bad input" in captured.out
    assert "strip.png: UnsupportedImage: a 2x400 image is too elongated" in captured.err
    assert "float255.tif: UnsupportedImage: a float image must hold values in [0, 1]" in captured.err
    named = [line for line in (captured.out + captured.err).splitlines() if "broken.jpg" in line]
    assert len(named) == 1, f"each bad input is named once: {named}"
    assert "broken.jpg" in captured.err
    assert sorted(p.name for p in out.iterdir()) == [
        "alpha.npy",
        "grey.npy",
        "photo_jpg.npy",
        "photo_png.npy",
        "rotated.npy",
    ]
    assert np.load(out / "rotated.npy").shape == (40, 20)
    assert np.load(out / "grey.npy").shape == (20, 40)


def test_metric_png16_is_metres_times_256(tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    args = [
        "predict",
        str(image),
        "--out",
        str(out),
        "--save",
        "png16,npy",
        "--model",
        "test_dav2_metric",
        "--random-weights",
        "--input-size",
        "28",
        "--no-progress",
    ]
    assert main(args) == 0
    values = np.load(out / "a.npy")
    with Image.open(out / "a_16bit.png") as png16:
        encoded = np.asarray(png16).astype(np.float64)
        assert json.loads(png16.text["depthkit"])["scale"] == 256.0
    np.testing.assert_allclose(encoded / 256.0, values, atol=1 / 512 + 1e-6)


def test_user_errors_are_clean(tmp_path, capsys, monkeypatch):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((14, 14, 3), np.uint8)).save(image)
    out = str(tmp_path / "out")
    assert main(["predict", str(tmp_path / "missing.jpg"), "--out", out, *TINY]) == 1
    assert "input not found" in capsys.readouterr().err
    assert main(["predict", str(image), "--out", out, "--save", "color,exr", *TINY]) == 1
    assert "--save 'color,exr'" in capsys.readouterr().err
    monkeypatch.setenv("DEPTHKIT_HOME", str(tmp_path / "home"))
    assert main(["predict", str(image), "--out", out, "--model", "dav2_vits"]) == 1
    err = capsys.readouterr().err
    assert "depth_anything_v2_vits.pth" in err and "--checkpoint PATH" in err
    assert main(["predict", str(tmp_path / "*.tif"), "--out", out, *TINY]) == 1
    assert "no files match" in capsys.readouterr().err


def test_globs_and_duplicates(tmp_path):
    for name in ("x.png", "y.png"):
        Image.fromarray(np.zeros((14, 14, 3), np.uint8)).save(tmp_path / name)
    items = collect_inputs([str(tmp_path / "*.png"), str(tmp_path / "x.png"), str(tmp_path)])
    assert [i.name for i in items] == ["x", "y"]
    with pytest.raises(FileNotFoundError):
        collect_inputs([str(tmp_path / "z.png")])


def test_a_fit_checkpoint_alone_names_the_model(tmp_path):
    image = tmp_path / "a.png"
    photo = np.random.default_rng(2).integers(0, 256, (30, 44, 3), dtype=np.uint8)
    Image.fromarray(photo).save(image)
    torch.manual_seed(0)
    model = create_model("test_dav2_metric", max_depth=80.0).eval()
    ckpt = tmp_path / "last.ckpt"  # as `depthkit fit` writes it
    hparams = {"model": "test_dav2_metric", "model_overrides": {"max_depth": 80.0}}
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hparams}, ckpt
    )
    out = tmp_path / "out"
    args = ["predict", str(image), "--out", str(out), "--save", "npy", "--checkpoint", str(ckpt), "--input-size", "28"]
    assert main([*args, "--no-progress", "--device", "cpu"]) == 0  # as the CPU model below (no TF32 on a GPU)
    expected = model.infer(photo, input_size=28).values  # max_depth 80, as trained (not the registry's 20)
    np.testing.assert_allclose(np.load(out / "a.npy"), expected, rtol=1e-5, atol=1e-5)
