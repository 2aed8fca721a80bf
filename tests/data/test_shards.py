"""Shard format: round trips, plain-tool compatibility, atomic writes and bad input."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import numpy as np
import pytest

from depthkit.data.manifest import load_row, read_manifest
from depthkit.data.shards import (
    ShardFormatError,
    ShardWriter,
    decode_sample,
    encode_sample,
    encode_target,
    iter_tar_samples,
    shard_paths,
)


def _decoded(folder) -> dict:
    return {s["__key__"]: s for path in shard_paths(folder) for s in map(decode_sample, iter_tar_samples(path))}


def test_manifest_to_shards_round_trip_is_exact(shared_data, rgbd_shards):
    decoded = _decoded(rgbd_shards)
    rows = read_manifest(shared_data / "rgbd" / "manifest.csv")
    assert set(decoded) == {r.key for r in rows}
    for row in rows:
        expected, got = load_row(row), decoded[row.key]
        np.testing.assert_array_equal(got["image"], expected["image"], err_msg=row.key)
        np.testing.assert_array_equal(got["valid"], expected["valid"], err_msg=row.key)
        np.testing.assert_array_equal(got["target"], expected["target"], err_msg=row.key)
        assert got["meta"]["output_space"] == expected["meta"]["output_space"]
        assert got["meta"]["intrinsics"] == expected["meta"]["intrinsics"]
        assert got["meta"]["format_version"] == 1


def test_integer_sources_are_stored_as_png16_and_float_ones_as_npz(rgbd_shards):
    names = [m for p in shard_paths(rgbd_shards) for m in tarfile.open(p).getnames()]
    assert any(n.endswith("TUM_color.target.png") for n in names)
    assert any(n.endswith("NYU_color.target.npz") for n in names)  # raw Kinect: nonlinear, float
    assert not any(n.endswith((".jpg.target", "depth.jpg")) for n in names)


def test_plain_webdataset_and_tar_open_shards(rgbd_shards):
    import webdataset as wds

    path = shard_paths(rgbd_shards)[0]
    samples = list(wds.WebDataset(path, shardshuffle=False).decode("rgb8"))
    assert len(samples) == 10
    assert all("json" in s and ("target.png" in s or "target.npz" in s) for s in samples)
    with tarfile.open(path) as tar:
        assert all(m.isfile() for m in tar.getmembers())


def test_encode_target_is_lossless():
    rng = np.random.default_rng(0)
    mm = (rng.integers(1, 60000, (7, 9)) * 0.001).astype(np.float32)  # as a mm PNG decodes
    valid = rng.random((7, 9)) > 0.3
    ext, data = encode_target(mm.astype(np.float32), valid, scale=0.001)
    assert ext == "target.png"
    floats = rng.random((7, 9)).astype(np.float32) * 10
    ext2, data2 = encode_target(floats, valid, scale=0.001)
    assert ext2 == "target.npz"  # not exact on a 1 mm grid, so it falls back to float32
    for target, ext_, blob in ((mm.astype(np.float32), ext, data), (floats, ext2, data2)):
        raw = {
            "__key__": "k",
            "__url__": "u",
            ext_: blob,
            "json": json.dumps(
                {"format_version": 1, "kind": "pseudo", "output_space": "affine_disparity", "target_scale": 0.001}
            ).encode(),
        }
        sample = decode_sample(raw)
        np.testing.assert_array_equal(sample["valid"], valid)
        np.testing.assert_array_equal(sample["target"][valid], target[valid])


def _decode_npz_target(blob: bytes) -> dict:
    meta = {"format_version": 1, "kind": "pseudo", "output_space": "affine_disparity"}
    return decode_sample({"__key__": "k", "__url__": "u", "target.npz": blob, "json": json.dumps(meta).encode()})


@pytest.mark.parametrize("level", [0, 1, 9])
def test_npz_target_at_any_zlib_level_is_plain_numpy_and_lossless(level):
    rng = np.random.default_rng(2)
    target = (rng.random((33, 47)) * 50).astype(np.float32)
    valid = rng.random(target.shape) > 0.2
    ext, blob = encode_target(target, valid, compress_level=level)
    assert ext == "target.npz"
    with np.load(io.BytesIO(blob)) as npz:  # what numpy.savez_compressed writes, read by plain numpy
        assert npz.files == ["target"] and npz["target"].dtype == np.float32
    sample = _decode_npz_target(blob)
    np.testing.assert_array_equal(sample["valid"], valid)
    np.testing.assert_array_equal(sample["target"][valid], target[valid])
    if level == 1:
        assert len(blob) < 1.1 * len(encode_target(target, valid)[1])  # level 6: hardly smaller


def test_byte_plane_npz_target_is_bit_exact_smaller_and_named_when_broken():
    """A network-like map (smooth, noisy low mantissa bits, negative values, invalid pixels): the byte planes give back
    every bit; the high bytes deflate, the low ones are stored; a Fortran-ordered map gives the same bytes."""
    rng = np.random.default_rng(4)
    y, x = np.mgrid[0:61, 0:83]
    target = (np.sin(x / 9.0) + np.cos(y / 7.0) + rng.normal(0, 1e-3, x.shape)).astype(np.float32)
    valid = rng.random(target.shape) > 0.1
    ext, blob = encode_target(target, valid, planes=True, compress_level=1)
    assert ext == "target.npz"
    with np.load(io.BytesIO(blob)) as npz:
        assert sorted(npz.files) == ["target_hi", "target_lo"] and npz["target_hi"].shape == (2, 61, 83)
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        kinds = {info.filename: info.compress_type for info in archive.infolist()}
    assert kinds == {"target_hi.npy": zipfile.ZIP_DEFLATED, "target_lo.npy": zipfile.ZIP_STORED}
    assert encode_target(np.asfortranarray(target), valid, planes=True, compress_level=1)[1] == blob
    sample = _decode_npz_target(blob)
    np.testing.assert_array_equal(sample["valid"], valid)
    assert sample["target"].dtype == np.float32
    assert np.array_equal(sample["target"].view(np.uint32)[valid], target.view(np.uint32)[valid])
    assert len(blob) < len(encode_target(target, valid, compress_level=1)[1])
    flat = np.round(target, 1)  # whole values repeat: the low bytes deflate too
    assert len(encode_target(flat, valid, planes=True, compress_level=1)[1]) < len(blob) / 2
    broken = io.BytesIO()
    with zipfile.ZipFile(broken, "w") as archive, np.load(io.BytesIO(blob)) as npz:
        with archive.open("target_hi.npy", "w") as member:
            np.lib.format.write_array(member, npz["target_hi"])
    with pytest.raises(ShardFormatError, match="KEY.target.npz has no 'target' array \\(nor its byte planes\\)"):
        _decode_npz_target(broken.getvalue())


def test_half_npz_target_rounds_to_float16_and_falls_back_to_float32_out_of_range():
    rng = np.random.default_rng(3)
    target = np.exp(rng.uniform(-12, 10, (40, 50))).astype(np.float32)  # 6e-6 .. 22000: subnormal to large
    valid = rng.random(target.shape) > 0.2
    ext, blob = encode_target(target, valid, half=True, compress_level=1)
    with np.load(io.BytesIO(blob)) as npz:
        assert npz["target"].dtype == np.float16
    sample = _decode_npz_target(blob)
    np.testing.assert_array_equal(sample["valid"], valid)  # NaN marks invalid in float16 too
    expected = target.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(sample["target"][valid], expected[valid])
    normal = valid & (target >= 2.0**-14)
    assert np.all(np.abs(sample["target"] - target)[normal] <= 2.0**-11 * target[normal])
    assert np.all(np.abs(sample["target"] - target)[valid & ~normal] <= 2.0**-25)
    # A valid value beyond float16's range keeps the whole map float32 (lossless); an invalid one does not count.
    big = target.copy()
    big[~valid] = 1e6
    with np.load(io.BytesIO(encode_target(big, valid, half=True)[1])) as npz:
        assert npz["target"].dtype == np.float16
    big[valid.nonzero()[0][0], valid.nonzero()[1][0]] = 70000.0
    ext, blob = encode_target(big, valid, half=True)
    with np.load(io.BytesIO(blob)) as npz:
        assert npz["target"].dtype == np.float32
    np.testing.assert_array_equal(_decode_npz_target(blob)["target"][valid], big[valid])


def _sample(key="k0", h=6, w=8):
    rng = np.random.default_rng(1)
    return {
        "__key__": key,
        "image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
        "target": rng.uniform(1, 5, (h, w)).astype(np.float32),
        "valid": np.ones((h, w), bool),
        "meta": {"output_space": "metric_depth", "source": "test"},
    }


def test_writer_renames_only_complete_shards(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, shard_size=2) as writer:
        for i in range(3):
            writer.write(encode_sample(_sample(f"k{i}")))
        raise RuntimeError("crash in the middle of the second shard")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]


def test_an_aborted_shard_leaves_no_temporary_file_when_the_disk_is_full(tmp_path, monkeypatch):
    """`abort` closed the tar first, which writes its end blocks: on a full disk that failed again, and the partial
    temporary file stayed."""
    from depthkit.data.shards import TarWriter

    writer = TarWriter(tmp_path / "x.tar")
    writer.add_sample(encode_sample(_sample("k0")))

    def disk_full():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer._tar, "close", disk_full)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_names_the_shard_being_written(tmp_path, monkeypatch):
    """The OS error of a failed write carries no file name: the command's one-line error said only
    "[Errno 28] No space left on device"."""
    from depthkit.data.shards import TarWriter

    writer = TarWriter(tmp_path / "x.tar")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer._tar, "addfile", disk_full)
    with pytest.raises(OSError, match=r"No space left on device: .*x\.tar'"):
        writer.add_sample(encode_sample(_sample("k0")))
    monkeypatch.setattr(writer._tar, "close", disk_full)
    with pytest.raises(OSError, match=r"No space left on device: .*x\.tar'"):
        writer.close()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_atomic_write_names_its_file(tmp_path):
    from depthkit._files import replacing, write_bytes_atomic

    with pytest.raises(OSError, match=r"No space left on device: .*out\.json'"):
        with replacing(tmp_path / "out.json"):
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    write_bytes_atomic(tmp_path / "ok.json", b"{}")
    assert (tmp_path / "ok.json").read_bytes() == b"{}"


def test_a_full_disk_at_the_fsync_names_the_file(tmp_path, monkeypatch):
    """On NFS a full disk may show only when the file is synced (indexes, records, checkpoints)."""
    from depthkit._files import write_json_atomic

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", disk_full)
    with pytest.raises(OSError, match=r"No space left on device: .*index\.json'"):
        write_json_atomic(tmp_path / "index.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.pop("k0.json"), "no KEY.json metadata"),
        (lambda m: m.update({"k0.png": b"not an image"}), "cannot decode image"),
        (lambda m: m.pop("k0.target.npz"), "no target member"),
        (lambda m: m.update({"k0.json": b"{broken"}), "not valid JSON"),
        (
            lambda m: m.update({"k0.json": json.dumps({"format_version": 99, "kind": "labeled"}).encode()}),
            "format_version 99",
        ),
        (lambda m: m.update({"k0.target.npz": _npz(np.ones((3, 3), np.float32))}), "target is 3x3 but image is 8x6"),
        (lambda m: m.update({"k0.target.npz": _npz(np.full((6, 8), np.inf, np.float32))}), "inf"),
    ],
)
def test_bad_samples_name_shard_and_key(mutate, message):
    members = encode_sample(_sample())
    mutate(members)
    raw = {"__key__": "k0", "__url__": "data/shard-000007.tar"}
    raw.update({name.split(".", 1)[1]: data for name, data in members.items()})
    with pytest.raises(ShardFormatError, match="shard data/shard-000007.tar, key k0") as info:
        decode_sample(raw)
    assert message in str(info.value)


def _npz(array) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, target=array)
    return buf.getvalue()


def test_nan_at_valid_pixels_is_refused_when_writing():
    sample = _sample()
    sample["target"][0, 0] = np.nan
    with pytest.raises(ValueError, match="k0: target has NaN/inf at pixels marked valid"):
        encode_sample(sample)


def test_keys_with_dots_are_refused():
    with pytest.raises(ValueError, match="must not contain"):
        encode_sample(_sample("a.b"))


def test_shard_paths_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .tar shards in folder"):
        shard_paths(tmp_path)
    with pytest.raises(FileNotFoundError, match="shard not found"):
        shard_paths(str(tmp_path / "x-{000..001}.tar"))


def test_a_labeled_sample_of_mismatched_sizes_is_refused_when_written():
    """Written anyway, it failed much later, in training, far from the code that made it."""
    image = np.zeros((4, 6, 3), np.uint8)
    sample = {"__key__": "k", "image": image, "meta": {"output_space": "metric_depth"}}
    with pytest.raises(ValueError, match=r"k: target \(4, 5\), valid \(4, 5\) and image \(4, 6\) must be H x W"):
        encode_sample({**sample, "target": np.ones((4, 5), np.float32)})
    with pytest.raises(ValueError, match=r"k: target \(4, 6\), valid \(4, 5\)"):
        encode_sample({**sample, "target": np.ones((4, 6), np.float32), "valid": np.ones((4, 5), bool)})


def test_write_synthetic_refuses_impossible_counts_and_sizes(tmp_path):
    from depthkit.data.convert import write_synthetic

    for kwargs, message in [
        ({"num": -3}, "num must be an integer >= 1, got -3"),
        ({"num": 2, "shard_size": 0}, "shard_size must be an integer >= 1, got 0"),
        ({"num": 2, "size": 40}, r"size must be \(height, width\) in pixels, got 40"),
    ]:
        with pytest.raises(ValueError, match=message):
            write_synthetic(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_sample_counts_come_from_each_folders_index_where_known(tmp_path):
    from depthkit.data.shards import index_sample_counts

    (tmp_path / "a").mkdir()
    (tmp_path / "a/index.json").write_text('{"kind": "unlabeled", "shards": {"s0.tar": 3, "s1.tar": "3"}}')
    (tmp_path / "b").mkdir()  # shards of another tool: no index
    urls = [str(tmp_path / "a/s0.tar"), str(tmp_path / "a/s1.tar"), str(tmp_path / "b/s0.tar"), "http://h/a/s0.tar"]
    assert index_sample_counts(urls) == [3, None, None, None]
