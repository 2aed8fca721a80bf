"""Bad input across the commands: one clear line naming the file or option, no traceback, no output left behind."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from depthkit.cli import main

TUM = "open3d_testdata/RGBD/other_formats/TUM_{}.png"


def _run(argv, capsys) -> str:
    """Run the CLI expecting failure; the one-line error it printed."""
    assert main(argv) == 1, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"depthkit {argv[0]}: error: "), err
    return err


def _manifest(tmp_path, shared_data, *, encoding="utf-8", **row) -> str:
    """A one-row manifest of the TUM sample (absolute paths), with `row` overriding its fields."""
    root = shared_data / "rgbd"
    fields = {
        "source": "tum",
        "rgb": str(root / TUM.format("color")),
        "depth": str(root / TUM.format("depth")),
        "depth_format": "uint16_png",
        "scale_to_metres": "1/5000",
        "invalid": "0",
        **{k: "" for k in ("fx", "fy", "cx", "cy", "domain", "gt_type", "notes")},
        **row,
    }
    path = tmp_path / "m.csv"
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerow(fields)
    return str(path)


def test_unreadable_checkpoints_and_devices(tmp_path, capsys):
    photo = tmp_path / "a.png"
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(photo)
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    noise = tmp_path / "noise.pth"
    noise.write_bytes(np.random.default_rng(0).bytes(3000))
    header = tmp_path / "w.safetensors"
    header.write_bytes(b"\x00" * 30)
    out = str(tmp_path / "out")
    for bad in (text, noise, header):
        err = _run(["predict", str(photo), "--out", out, "--model", "test_dav2", "--checkpoint", str(bad)], capsys)
        assert f"{bad} is not a readable checkpoint" in err
    err = _run(
        ["predict", str(photo), "--out", out, "--model", "test_dav2", "--random-weights", "--device", "x"], capsys
    )
    assert "--device 'x' is not a torch device" in err
    assert not (tmp_path / "out").exists()


def test_out_paths_that_cannot_be_written(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert "--out" in _run(["synth", "--out", str(a_file), "--num", "1"], capsys)
    err = _run(["synth", "--out", str(a_file / "x"), "--num", "1", "--size", "28", "28"], capsys)
    assert f"{a_file} is a file, where a folder is needed" in err, err
    err = _run(["synth", "--out", str(tmp_path / "s"), "--num", "1", "--size", "0", "56"], capsys)
    assert "--size must be >= 1, got 0" in err
    assert "--shard-size must be >= 1" in _run(
        ["synth", "--out", str(tmp_path / "s"), "--num", "1", "--shard-size", "0"], capsys
    )
    assert "--seed must be >= 0" in _run(["synth", "--out", str(tmp_path / "s"), "--num", "1", "--seed", "-1"], capsys)
    # 2**32 would render the scenes of seed 0, shifted by one: the same images under other keys.
    err = _run(["synth", "--out", str(tmp_path / "s"), "--num", "1", "--seed", str(2**32)], capsys)
    assert "must stay below 2**32" in err
    assert not (tmp_path / "s").exists()
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(photos / "a.png")
    for prefix in ("a/b", ""):
        err = _run(
            ["data", "convert", "--images", str(photos), "--out", str(tmp_path / "c"), "--prefix", prefix], capsys
        )
        assert f"--prefix {prefix!r}: use letters" in err
    err = _run(["data", "convert", "--images", str(photos / "a.png"), "--out", str(tmp_path / "c")], capsys)
    assert "a.png is a file; give the folder of photos" in err
    assert not (tmp_path / "c").exists()
    args = ["export", "weights", "--model", "test_dav2", "--checkpoint", str(a_file), "--layout", "hf"]
    assert "the hf layout writes a folder" in _run([*args, "--out", str(tmp_path / "w.pth")], capsys)
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    args = ["export", "onnx", "--model", "test_dav2", "--weights", str(a_file), "--out", str(folder)]
    assert "is a folder" in _run(args, capsys)  # before the weights are even read
    # A shard an interrupted run never finished is removed by the next run, not kept beside the new shards.
    out = tmp_path / "shards"
    out.mkdir()
    (out / "synth-000000.tar.tmp").write_bytes(b"partial")
    assert main(["synth", "--out", str(out), "--num", "2", "--size", "28", "28"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "synth-000000.tar"]


def test_manifest_mistakes_name_the_file_and_field(tmp_path, shared_data, capsys):
    out = str(tmp_path / "shards")
    zero = _manifest(tmp_path, shared_data, scale_to_metres="1/0")
    assert "scale_to_metres must be positive, got '1/0'" in _run(
        ["data", "convert", "--manifest", zero, "--out", out], capsys
    )
    for fmt, reads in (("exr_float32", "EXR"), ("npy_float32", "NPY"), ("npz_float32", "NPZ (zip)")):
        wrong = _manifest(tmp_path, shared_data, depth_format=fmt, scale_to_metres="1")
        err = _run(["data", "convert", "--manifest", wrong, "--out", out], capsys)
        assert f"depth_format {fmt} reads {reads} files, but this is a PNG file" in err and "TUM_depth.png" in err
    negative = _manifest(tmp_path, shared_data, fx="-500", fy="500", cx="320", cy="240")
    assert "fx and fy must be positive" in _run(["data", "convert", "--manifest", negative, "--out", out], capsys)
    header_only = tmp_path / "empty.csv"
    header_only.write_text(Path(zero).read_text().splitlines()[0] + "\n")
    assert "a header but no rows" in _run(["data", "convert", "--manifest", str(header_only), "--out", out], capsys)
    args = ["eval", "--dataset", zero, "--model", "test_dav2", "--random-weights", "--split-file", str(zero)]
    assert "--split-file and --data-root are for named benchmarks" in _run(args, capsys)
    # A spreadsheet's "CSV UTF-8" (with a byte-order mark) reads like any CSV.
    bom = _manifest(tmp_path, shared_data, encoding="utf-8-sig")
    assert main(["data", "convert", "--manifest", bom, "--out", out]) == 0


def test_a_depth_map_without_valid_pixels_is_a_bad_row(tmp_path, shared_data, capsys):
    blank = tmp_path / "blank_depth.png"
    Image.fromarray(np.zeros((480, 640), np.uint16)).save(blank)  # 0 is the manifest's invalid value
    manifest = Path(_manifest(tmp_path, shared_data, depth=str(blank)))
    out = tmp_path / "shards"
    err = _run(["data", "convert", "--manifest", str(manifest), "--out", str(out)], capsys)
    assert "blank_depth.png has no valid pixel" in err
    assert not out.exists(), "a failed conversion leaves no output folder behind"
    # A good row first, in a shard of its own: that finished shard is removed with the failure too.
    color = shared_data / "rgbd" / TUM.format("color")
    blank_row = manifest.read_text().splitlines()[1].replace(str(color), str(tmp_path / "blank_color.png"))
    (tmp_path / "blank_color.png").write_bytes(color.read_bytes())
    manifest.write_text(Path(_manifest(tmp_path, shared_data)).read_text() + blank_row + "\n")
    args = ["data", "convert", "--manifest", str(manifest), "--out", str(out), "--shard-size", "1"]
    err = _run(args, capsys)
    assert "m.csv:3" in err and "has no valid pixel" in err and not out.exists()
    assert main([*args, "--on-error", "skip"]) == 0 and [p.name for p in out.glob("*.tar")] == ["shard-000000.tar"]


def test_eval_reads_a_manifest_with_absolute_paths(tmp_path, shared_data):
    from depthkit.eval.benchmarks import read_manifest_items

    (item,) = read_manifest_items(Path(_manifest(tmp_path, shared_data)))  # rgb and depth given as absolute paths
    assert item.name.endswith("TUM_color") and item.load()["target"].shape == (480, 640)


def test_pseudo_label_refuses_an_input_that_is_no_tar(tmp_path, capsys):
    not_a_shard = tmp_path / "in" / "photos.tar"
    not_a_shard.parent.mkdir()
    not_a_shard.write_text("source,rgb\n")
    argv = ["pseudo-label", "--model", "test_dav2", "--input", str(not_a_shard), "--output", str(tmp_path / "out")]
    assert f"input {not_a_shard} is not a tar shard" in _run([*argv, "--device", "cpu"], capsys)
    assert not (tmp_path / "out").exists()


def test_predict_never_reads_its_own_outputs(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((28, 42, 3), np.uint8)).save(photos / "a.png")
    tiny = ["--model", "test_dav2", "--random-weights", "--input-size", "28", "--no-progress"]
    for _ in range(2):  # the second run sees a_16bit.png and a_color.png in photos/out: not inputs
        assert main(["predict", str(photos), "--out", str(photos / "out"), "--save", "color,png16", *tiny]) == 0
    assert sorted(p.name for p in (photos / "out").iterdir()) == ["a_16bit.png", "a_color.png"]
