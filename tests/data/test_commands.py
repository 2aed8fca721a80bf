"""`depthkit data convert` and `depthkit synth` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from depthkit.cli import main
from depthkit.data.shards import decode_sample, iter_tar_samples, shard_paths


def test_convert_manifest_and_images(shared_data, tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "convert",
                "--manifest",
                str(shared_data / "rgbd" / "manifest.csv"),
                "--out",
                str(tmp_path / "rgbd"),
                "--shard-size",
                "20",
            ]
        )
        == 0
    )
    index = json.loads((tmp_path / "rgbd" / "index.json").read_text())
    assert index["num_samples"] == 27 and list(index["shards"].values()) == [20, 7]
    assert main(["data", "convert", "--images", str(shared_data / "unlabeled"), "--out", str(tmp_path / "u")]) == 0
    samples = [decode_sample(r) for p in shard_paths(tmp_path / "u") for r in iter_tar_samples(p)]
    assert len(samples) == 46 and all(s["image"].shape[2] == 3 for s in samples)
    assert "wrote 46 unlabeled samples" in capsys.readouterr().out


def test_refuses_to_mix_into_existing_output(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert main(["synth", "--out", out, "--num", "3", "--size", "28", "28"]) == 0
    assert main(["synth", "--out", out, "--num", "3", "--size", "28", "28"]) == 1
    assert "already holds 1 shard(s)" in capsys.readouterr().err
    assert main(["synth", "--out", out, "--num", "4", "--size", "28", "28", "--overwrite", "--unlabeled"]) == 0
    samples = [decode_sample(r) for r in iter_tar_samples(shard_paths(out)[0])]
    assert len(samples) == 4 and "target" not in samples[0]
    assert samples[0]["meta"]["kind"] == "unlabeled" and "output_space" not in samples[0]["meta"]  # no target


def test_synth_in_parallel_equals_serial(tmp_path):
    args = ["--num", "6", "--size", "28", "42", "--shard-size", "2", "--seed", "9"]
    assert main(["synth", "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["synth", "--out", str(tmp_path / "b"), *args, "--workers", "2"]) == 0
    for pa, pb in zip(shard_paths(tmp_path / "a"), shard_paths(tmp_path / "b"), strict=True):
        assert open(pa, "rb").read() == open(pb, "rb").read()  # shards are bit-identical, whatever the workers


def test_bad_manifest_gives_a_clean_error(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("source,rgb,depth\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "depthkit.cli",
            "data",
            "convert",
            "--manifest",
            str(manifest),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "m.csv: manifest lacks column(s) depth_format" in result.stderr
    assert "Traceback" not in result.stderr


def test_on_error_skip_drops_rows_with_bad_fields_and_counts_them(tmp_path, capsys):
    """docs/data.md: under `--on-error skip` a bad manifest field or an unknown depth_format drops that row, counted
    in the index; without it the first such row stops the run, naming its line."""
    import numpy as np
    from PIL import Image

    for name in ("a", "b", "c"):
        Image.fromarray(np.full((8, 10, 3), 90, np.uint8)).save(tmp_path / f"{name}.png")
        Image.fromarray(np.full((8, 10), 2000, np.uint16)).save(tmp_path / f"{name}_depth.png")
    header = "source,rgb,depth,depth_format,scale_to_metres,invalid,fx,fy,cx,cy,domain,gt_type,notes"
    rows = [
        "s,a.png,a_depth.png,uint16_pngx,0.001,0,,,,,indoor,x,",  # unknown depth_format
        "s,b.png,b_depth.png,uint16_png,abc,0,,,,,indoor,x,",  # scale is not a number
        "s,c.png,c_depth.png,uint16_png,0.001,0,,,,,indoor,x,",
    ]
    (tmp_path / "manifest.csv").write_text("\n".join([header, *rows]) + "\n")
    args = ["data", "convert", "--manifest", str(tmp_path / "manifest.csv"), "--out"]
    assert main([*args, str(tmp_path / "strict")]) == 1
    assert "manifest.csv:2: unknown depth_format 'uint16_pngx'" in capsys.readouterr().err
    assert not (tmp_path / "strict").exists()
    assert main([*args, str(tmp_path / "lenient"), "--on-error", "skip"]) == 0
    index = json.loads((tmp_path / "lenient" / "index.json").read_text())
    assert index["num_samples"] == 1
    assert [m.split(": ", 1)[0].rsplit("/", 1)[-1] for m in index["skipped"]] == ["manifest.csv:2", "manifest.csv:3"]


def test_a_killed_synth_leaves_a_folder_that_readers_refuse_until_rerun(tmp_path, capsys):
    """A writer killed mid-run (SIGKILL: no cleanup) leaves finished shards, a `.tar.tmp` and no index.json. Reading
    that folder would silently train on a part of the data: readers refuse it, naming the folder, until a rerun."""
    from depthkit.data.stream import ShardStream

    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--num", "4", "--size", "28", "28", "--shard-size", "2"]) == 0
    (out / "index.json").unlink()  # as a killed run leaves it: the index is written last
    (out / "synth-000002.tar.tmp").write_bytes(b"half a shard")
    with pytest.raises(ValueError, match=r"synth holds 1 unfinished shard\(s\) \(synth-000002.tar.tmp\) and no index"):
        shard_paths(out)
    with pytest.raises(ValueError, match="unfinished shard"):
        next(iter(ShardStream(str(out), batch_size=2)))
    assert main(["synth", "--out", str(out), "--num", "4", "--size", "28", "28", "--shard-size", "2"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["synth", "--out", str(out), "--num", "4", "--size", "28", "28", "--overwrite"]) == 0
    assert len(shard_paths(out)) == 1 and not list(out.glob("*.tmp"))


def test_a_writer_interrupted_over_an_older_dataset_leaves_no_index_to_vouch_for_it(tmp_path, monkeypatch):
    """`synth --overwrite` killed between two shards: no `.tar.tmp`, and the older dataset's index.json used to
    remain, so readers took the new shards for a complete dataset."""
    from depthkit.data import convert

    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--num", "8", "--size", "28", "28", "--shard-size", "2"]) == 0
    real = convert._synth_shard

    def killed_after_the_first_shard(job):
        if job[1] > 0:
            raise KeyboardInterrupt  # as far as the folder is concerned, a kill between shards
        return real(job)

    monkeypatch.setattr(convert, "_synth_shard", killed_after_the_first_shard)
    again = ["synth", "--out", str(out), "--num", "6", "--size", "28", "28", "--shard-size", "2", "--overwrite"]
    assert main(again)
    assert [p.name for p in out.glob("*.tar")] == ["synth-000000.tar"] and not (out / "index.json").exists()
    with pytest.raises(ValueError, match=r"holds the mark of a writer \(.depthkit-writing\) and no index.json"):
        shard_paths(out)
    monkeypatch.setattr(convert, "_synth_shard", real)
    assert main(again) == 0
    assert len(shard_paths(out)) == 3 and not (out / ".depthkit-writing").exists()


def test_the_python_writers_refuse_a_folder_that_holds_shards_unless_told_to_overwrite(tmp_path):
    """`write_synthetic` (and the converters) wrote into a folder with another dataset: its index was removed, its
    shards stayed and the folder kept the writer's mark, so neither dataset could be read."""
    from depthkit.data.convert import write_synthetic

    out = tmp_path / "synth"
    write_synthetic(out, num=4, size=(28, 28), shard_size=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match=r"synth already holds 2 shard\(s\) .*pass overwrite=True to replace them"):
        write_synthetic(out, num=2, size=(28, 28), seed=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the older dataset is untouched
    (out / "synth-000009.tar.tmp").write_bytes(b"half a shard")
    index = write_synthetic(out, num=2, size=(28, 28), seed=1, overwrite=True)
    assert [Path(p).name for p in shard_paths(out)] == ["synth-000000.tar"] and index["num_samples"] == 2
    assert not list(out.glob("*.tmp")) and not (out / ".depthkit-writing").exists()
