"""Pseudo-labeling: labels, provenance, failed images, TTA, resume after SIGKILL, ranks, teacher mixing, errors."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import depthkit
from depthkit.cli import main
from depthkit.data.convert import write_synthetic
from depthkit.data.shards import decode_sample, iter_tar_samples, shard_paths
from depthkit.data.stream import ShardStream
from depthkit.models import create_model
from depthkit.models.preprocess import official_resize_hw, resize_image
from depthkit.pseudo_label import PseudoLabelConfig, decode_confidence, read_index, resolve_launch, run_pseudo_label

RESOLUTION = 28  # network inputs of 28 x 42 and so on: milliseconds per image with the tiny model


def _config(inputs, out, ckpt, **kw) -> PseudoLabelConfig:
    base = dict(
        inputs=tuple(map(str, inputs)) if isinstance(inputs, list) else (str(inputs),),
        output=str(out),
        model="test_dav2",
        checkpoint=str(ckpt),
        resolution=RESOLUTION,
        batch_size=3,
        num_workers=0,
        device="cpu",
        progress=False,
        label_size="image",  # labels comparable with single-image inference (`model.infer`) at the image's size
    )
    return PseudoLabelConfig(**{**base, **kw})


def _labels(out) -> dict[str, list[dict]]:
    """Every output shard's raw samples, by shard name, in file order."""
    return {Path(p).name: list(iter_tar_samples(p)) for p in shard_paths(str(out))}


def _images(inputs) -> dict[str, np.ndarray]:
    images = {}
    for path in shard_paths(str(inputs)):
        for raw in iter_tar_samples(path):
            try:
                images[raw["__key__"]] = decode_sample(raw)["image"]
            except ValueError:
                pass
    return images


def _teacher(ckpt):
    return create_model("test_dav2", checkpoint_path=ckpt).eval()


def test_labels_match_single_image_inference_with_provenance(mixed, teacher_ckpt, tmp_path):
    summary = run_pseudo_label(_config(mixed, tmp_path / "out", teacher_ckpt))
    assert (summary.num_labeled, summary.num_failed, summary.num_shards_labeled) == (7, 1, 2)
    model, images = _teacher(teacher_ckpt), _images(mixed)
    labels = _labels(tmp_path / "out")
    assert list(labels) == ["mixed-000000.tar", "mixed-000001.tar"]
    keys = [raw["__key__"] for raws in labels.values() for raw in raws]
    assert keys == [f"img{i:02d}" for i in range(8) if i != 5]  # input order, the bad image left out
    sha256 = __import__("hashlib").sha256(Path(teacher_ckpt).read_bytes()).hexdigest()
    expected = {key: model.infer(images[key], input_size=RESOLUTION).values for key in keys}
    for raw in (r for raws in labels.values() for r in raws):
        sample = decode_sample(raw, kind="pseudo")
        assert set(raw) == {"__key__", "__url__", "json", "target.npz"}
        torch.testing.assert_close(sample["target"], expected[raw["__key__"]], rtol=1e-5, atol=1e-6)
        assert sample["valid"].all()
        meta = sample["meta"]
        assert (meta["kind"], meta["output_space"], meta["target_encoding"]) == ("pseudo", "affine_disparity", "npz")
        assert (meta["source"], meta["licence"]) == ("test", "cc0")
        prov = meta["provenance"]
        assert prov["teacher_sha256"] == sha256 and prov["model"] == "test_dav2"
        assert (prov["resolution"], prov["tta"], prov["precision"]) == (RESOLUTION, "none", "fp32")
        assert prov["depthkit_version"] == depthkit.__version__ and prov["time"].endswith("Z")
        assert prov["checkpoint_file"] == "teacher.pth"
    index = read_index(tmp_path / "out")
    assert index["complete"] and index["shards"] == {"mixed-000000.tar": 4, "mixed-000001.tar": 3}
    assert list(index["failed"]["mixed-000001.tar"]) == ["img05"]
    assert "cannot decode image" in index["failed"]["mixed-000001.tar"]["img05"]
    assert index["teacher"]["teacher_sha256"] == sha256 and index["teacher"]["resolution"] == RESOLUTION

    # The student's pipeline reads the labels back, paired with their images by key (the bad image skipped).
    stream = ShardStream(str(mixed), kind="pseudo", labels=str(tmp_path / "out"), batch_size=1, drop_last=False)
    seen = []
    for batch in stream:
        key = batch["key"][0]
        seen.append(key)
        assert batch["target"].shape[1:] == batch["image"].shape[2:]
        assert batch["meta"][0]["pseudo"]["provenance"]["teacher_sha256"] == sha256
        torch.testing.assert_close(batch["target"][0].numpy(), expected[key], rtol=1e-5, atol=1e-6)
    assert seen == keys


def test_labels_of_images_larger_than_the_network_stay_at_its_size_and_read_with_their_images(
    mixed, teacher_ckpt, tmp_path
):
    """`label_size="network"` (the default) keeps the prediction itself for an image with more pixels than its network
    input; upsampled as the official `infer_image` does, it is the `label_size="image"` label. The student reads it
    with its image; a record from before the option counts as "image"."""
    run_pseudo_label(_config(mixed, tmp_path / "image", teacher_ckpt, label_size="image"))
    run_pseudo_label(_config(mixed, tmp_path / "network", teacher_ckpt, label_size="network"))
    full = {
        raw["__key__"]: decode_sample(raw, kind="pseudo")
        for raws in _labels(tmp_path / "image").values()
        for raw in raws
    }
    smaller = 0
    for raw in (r for raws in _labels(tmp_path / "network").values() for r in raws):
        target_hw = decode_sample(raw, kind="pseudo")["target"]
        image_hw = full[raw["__key__"]]["target"].shape
        network_hw = official_resize_hw(*image_hw, RESOLUTION, 14)
        if image_hw[0] * image_hw[1] > network_hw[0] * network_hw[1]:
            assert target_hw.shape == network_hw
            smaller += 1
            upsampled = torch.nn.functional.interpolate(
                torch.from_numpy(target_hw)[None, None], size=image_hw, mode="bilinear", align_corners=True
            )[0, 0]
            torch.testing.assert_close(upsampled.numpy(), full[raw["__key__"]]["target"], rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(target_hw, full[raw["__key__"]]["target"])
    assert smaller >= 2  # the fixture has images on both sides of their network size
    from depthkit.data.transforms import SampleTransform, TransformConfig

    crop = SampleTransform(TransformConfig(crop_size=28, random_crop=False, hflip=False))
    batches = [
        ShardStream(str(mixed), kind="pseudo", labels=str(tmp_path / folder), batch_size=7, transform=crop).__iter__()
        for folder in ("network", "image")
    ]
    network, image = next(batches[0]), next(batches[1])
    assert network["target"].shape == network["image"].shape[:1] + network["image"].shape[2:] == (7, 28, 28)
    torch.testing.assert_close(network["target"], image["target"], rtol=0.05, atol=0.05)  # resampled apart
    with pytest.raises(ValueError, match="label_size: 'network' -> 'image'"):
        run_pseudo_label(_config(mixed, tmp_path / "network", teacher_ckpt, label_size="image"))
    for record in (tmp_path / "image" / "records").glob("*.json"):  # as written before `label_size` existed
        saved = json.loads(record.read_text())
        del saved["settings"]["label_size"]
        record.write_text(json.dumps(saved))
    with pytest.raises(
        ValueError,
        match=r"label_size: 'image' -> 'network'.*rerun with the output's own settings \(--label-size image\)",
    ):
        run_pseudo_label(_config(mixed, tmp_path / "image", teacher_ckpt, label_size="network"))
    assert run_pseudo_label(_config(mixed, tmp_path / "image", teacher_ckpt, label_size="image")).num_labeled == 0
    assert read_index(tmp_path / "image")["teacher"]["label_size"] == "image"  # one teacher, not "mixed"


def test_a_label_fits_its_image_up_to_the_patch_rounding_of_its_aspect_ratio():
    from depthkit.data.stream import label_fits

    assert label_fits((518, 770), (1500, 2250)) and label_fits((30, 40), (30, 40)) and label_fits((28, 42), (30, 40))
    assert label_fits((518, 784), (520, 781))  # rounded up past the image's own width
    assert not label_fits((770, 518), (1500, 2250)) and not label_fits((518, 518), (1500, 2250))


def test_truncated_shard_and_early_batches(mixed, teacher_ckpt, tmp_path, monkeypatch):
    """A tar cut off mid-member keeps what was readable and records the rest; running every bucket early (the
    memory bound at its extreme) changes no label and no order."""
    import shutil
    import tarfile

    from depthkit.pseudo_label import job

    monkeypatch.setattr(job._Labeler, "MAX_WAITING_BATCHES", 0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(mixed / "mixed-000000.tar", inputs)
    with tarfile.open(mixed / "mixed-000001.tar") as tar:
        member = tar.getmember("img06.png")
    data = (mixed / "mixed-000001.tar").read_bytes()
    (inputs / "mixed-000001.tar").write_bytes(data[: member.offset_data + member.size // 2])
    summary = run_pseudo_label(_config(inputs, tmp_path / "out", teacher_ckpt))
    assert (summary.num_labeled, summary.num_failed) == (5, 1)
    index = read_index(tmp_path / "out")
    assert index["shards"] == {"mixed-000000.tar": 4, "mixed-000001.tar": 1}
    failed = index["failed"]["mixed-000001.tar"]
    assert sorted(failed) == ["*", "img05"] and "corrupt or unreadable tar after key img05" in failed["*"]
    model, images = _teacher(teacher_ckpt), _images(mixed)
    labels = [r for raws in _labels(tmp_path / "out").values() for r in raws]
    assert [r["__key__"] for r in labels] == ["img00", "img01", "img02", "img03", "img04"]
    for raw in labels:
        expected = model.infer(images[raw["__key__"]], input_size=RESOLUTION).values
        torch.testing.assert_close(decode_sample(raw)["target"], expected, rtol=1e-5, atol=1e-6)


def test_an_image_too_elongated_for_any_network_input_fails_alone(teacher_ckpt, tmp_path):
    """A 2 x 40 strip would become a 28 x 560 input here (518 x 10360 at the default size): recorded as failed,
    like an undecodable image, and the rest of the shard is labeled."""
    from depthkit.data.shards import ShardWriter, encode_image, encode_sample

    rng = np.random.default_rng(3)
    with ShardWriter(tmp_path / "in", prefix="strip", shard_size=10) as writer:
        for key, (h, w) in (("a", (30, 40)), ("strip", (2, 40)), ("b", (40, 30))):
            image = rng.integers(0, 256, (h, w, 3), np.uint8)
            sample = {"__key__": key, "meta": {"kind": "unlabeled"}, "image": image}
            writer.write(encode_sample({**sample, "image_bytes": ("png", encode_image(image))}))
    summary = run_pseudo_label(_config(tmp_path / "in", tmp_path / "out", teacher_ckpt))
    assert (summary.num_labeled, summary.num_failed) == (2, 1)
    (failed,) = read_index(tmp_path / "out")["failed"].values()
    assert list(failed) == ["strip"] and "a 2x40 image is too elongated (beyond 16:1)" in failed["strip"]
    assert [r["__key__"] for raws in _labels(tmp_path / "out").values() for r in raws] == ["a", "b"]


def test_flip_tta_is_the_flip_average_and_gives_a_confidence(unlabeled, teacher_ckpt, tmp_path):
    first_two = [str(p) for p in shard_paths(str(unlabeled))[:2]]
    run_pseudo_label(_config(first_two, tmp_path / "tta", teacher_ckpt, tta="hflip", confidence=True))
    model, images = _teacher(teacher_ckpt), _images(unlabeled)
    for raws in _labels(tmp_path / "tta").values():
        for raw in raws:
            sample = decode_sample(raw, kind="pseudo")
            image_HW3 = images[raw["__key__"]]
            size_hw = official_resize_hw(*image_HW3.shape[:2], RESOLUTION, 14)
            x_13hw = model.normalize(resize_image(torch.tensor(image_HW3).permute(2, 0, 1) / 255.0, size_hw)[None])
            with torch.inference_mode():
                a_hw, b_hw = model(x_13hw)[0], model(x_13hw.flip(-1))[0].flip(-1)
            expected = torch.nn.functional.interpolate(
                ((a_hw + b_hw) / 2)[None, None], size=image_HW3.shape[:2], mode="bilinear", align_corners=True
            )[0, 0]
            torch.testing.assert_close(torch.from_numpy(sample["target"]), expected, rtol=1e-5, atol=1e-6)
            plain = model.infer(image_HW3, input_size=RESOLUTION).values
            assert np.abs(sample["target"] - plain).max() > 1e-4, "TTA output equals the plain output"
            conf = decode_confidence(raw["confidence.png"])
            assert conf.shape == image_HW3.shape[:2] and conf.min() >= 0 and conf.max() <= 1
            # exp(-|a - b| / s), s the mean absolute deviation of the flip average from its median, resized back.
            mean_hw = (a_hw + b_hw) / 2
            spread = (mean_hw - mean_hw.flatten().median()).abs().mean()
            expected_conf = torch.nn.functional.interpolate(
                torch.exp(-(a_hw - b_hw).abs() / spread)[None, None],
                size=image_HW3.shape[:2],
                mode="bilinear",
                align_corners=True,
            )[0, 0]
            torch.testing.assert_close(torch.from_numpy(conf).float(), expected_conf, rtol=0, atol=5e-5)  # 16 bits
            assert conf.std() > 1e-3, "a constant confidence says nothing"
            assert sample["meta"]["provenance"]["tta"] == "hflip"


def test_png16_encoding_stores_the_rounded_prediction_exactly(unlabeled, teacher_ckpt, tmp_path):
    from depthkit.pseudo_label.job import quantize_png16

    first_two = [str(p) for p in shard_paths(str(unlabeled))[:2]]
    run_pseudo_label(_config(first_two, tmp_path / "out", teacher_ckpt, encoding="png16"))
    model, images = _teacher(teacher_ckpt), _images(unlabeled)
    for raws in _labels(tmp_path / "out").values():
        for raw in raws:
            assert set(raw) == {"__key__", "__url__", "json", "target.png"}
            sample = decode_sample(raw, kind="pseudo")
            assert sample["meta"]["target_encoding"] == "png16" and sample["meta"]["provenance"]["encoding"] == "png16"
            plain = model.infer(images[raw["__key__"]], input_size=RESOLUTION).values
            step = float(plain.max()) / 65535
            assert np.abs(sample["target"] - plain).max() <= 0.51 * step + 1e-6
            quantized, scale = quantize_png16(plain)
            assert scale == pytest.approx(step, rel=1e-5) and np.abs(sample["target"] - quantized).max() <= 1.01 * step
    # On its own grid the encoding is exact: what is written is what is read.
    from depthkit.pseudo_label.job import encode_label

    pred = np.random.default_rng(0).random((7, 9), dtype=np.float32) * 3
    pred[0, 0] = 0.0
    quantized, _ = quantize_png16(pred)
    members = encode_label("k", pred, None, {"kind": "pseudo", "output_space": "affine_disparity"}, encoding="png16")
    raw = {"__key__": "k", "__url__": "mem", **{name.split(".", 1)[1]: data for name, data in members.items()}}
    decoded = decode_sample(raw, kind="pseudo")
    np.testing.assert_array_equal(decoded["target"], quantized)
    assert decoded["valid"].all() and quantized[0, 0] > 0


def test_f16_encoding_stores_float16_labels(unlabeled, teacher_ckpt, tmp_path):
    first_two = [str(p) for p in shard_paths(str(unlabeled))[:2]]
    run_pseudo_label(_config(first_two, tmp_path / "out", teacher_ckpt, encoding="f16"))
    model, images = _teacher(teacher_ckpt), _images(unlabeled)
    raws = [raw for raws in _labels(tmp_path / "out").values() for raw in raws]
    assert len(raws) == sum(len(list(iter_tar_samples(p))) for p in first_two)
    for raw in raws:
        with np.load(io.BytesIO(raw["target.npz"])) as npz:
            assert npz["target"].dtype == np.float16
        sample = decode_sample(raw, kind="pseudo")
        assert sample["meta"]["target_encoding"] == "npz" and sample["meta"]["provenance"]["encoding"] == "f16"
        plain = model.infer(images[raw["__key__"]], input_size=RESOLUTION).values
        # float16 rounding (2^-11 relative) on top of the batch's float32 differences from single-image inference
        np.testing.assert_allclose(sample["target"], plain, rtol=2.0**-11 + 1e-5, atol=1e-6)
        assert np.abs(sample["target"] - plain).max() > 0  # rounded, not float32


def test_a_training_checkpoint_is_a_teacher_without_model_name(unlabeled, teacher_ckpt, tmp_path):
    model = _teacher(teacher_ckpt)
    ckpt = tmp_path / "teacher.ckpt"  # as `depthkit fit` writes it: the model's name in hyper_parameters
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": "test_dav2", "model_overrides": None}}, ckpt)
    first = [str(shard_paths(str(unlabeled))[0])]
    run_pseudo_label(_config(first, tmp_path / "out", ckpt, model=None))
    raws = [raw for raws in _labels(tmp_path / "out").values() for raw in raws]
    images = _images(unlabeled)
    for raw in raws:
        sample = decode_sample(raw, kind="pseudo")
        assert sample["meta"]["provenance"]["model"] == "test_dav2"
        expected = model.infer(images[raw["__key__"]], input_size=RESOLUTION).values
        torch.testing.assert_close(sample["target"], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="holds a test_dav2 model"):
        run_pseudo_label(_config(first, tmp_path / "out2", ckpt, model="test_dav1"))


def _run_cli(argv: list[str]) -> None:
    torch.set_num_threads(1)  # the same in every child: identical floating-point work
    sys.exit(main(argv))


def _child(argv: list[str]) -> multiprocessing.Process:
    process = multiprocessing.get_context("fork").Process(target=_run_cli, args=(argv,))
    process.start()
    return process


def _sleep(ignore_sigint: bool, ready) -> None:
    # Set either way: a shell's background job (CI) starts with SIGINT ignored, and a child inherits that.
    signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else signal.default_int_handler)
    ready.set()
    time.sleep(600)


def test_ranks_still_running_after_the_launchers_ctrl_c_are_stopped():
    """A SIGINT sent to the launcher alone (not the terminal's, which every rank gets) reached no rank: they labeled
    on to the end. Now they get one after a grace period, and a rank that ignores it is killed."""
    from depthkit.pseudo_label.launch import stop_ranks

    context = multiprocessing.get_context("fork")
    ready = [context.Event() for _ in range(2)]
    ranks = [context.Process(target=_sleep, args=(ignore, r)) for ignore, r in zip((False, True), ready, strict=True)]
    for rank, started in zip(ranks, ready, strict=True):
        rank.start()
        assert started.wait(60), "the rank did not start"
    stop_ranks(ranks[:1], grace_s=0.2, timeout_s=60.0)  # returns as soon as it has stopped
    stop_ranks(ranks[1:], grace_s=0.2, timeout_s=0.5)
    assert not any(rank.is_alive() for rank in ranks)
    assert [rank.exitcode for rank in ranks] == [1, -signal.SIGKILL]  # KeyboardInterrupt; killed


NUM_KILL_SHARDS = 40


def test_sigkill_then_rerun_equals_an_uninterrupted_run(teacher_ckpt, tmp_path):
    # Enough shards that an idle machine cannot finish them all between the first record and the kill.
    unlabeled = tmp_path / "input"
    write_synthetic(unlabeled, num=2 * NUM_KILL_SHARDS, size=(42, 56), seed=5, labeled=False, shard_size=2)

    def argv(out):
        return ["pseudo-label", "--model", "test_dav2", "--checkpoint", str(teacher_ckpt), "--input", str(unlabeled),
                "--output", str(out), "--resolution", str(RESOLUTION), "--batch-size", "2", "--num-workers", "0",
                "--device", "cpu", "--no-progress"]  # fmt: skip

    reference = _child(argv(tmp_path / "ref"))
    killed = _child(argv(tmp_path / "killed"))
    index_path = tmp_path / "killed" / "index.json"
    deadline = time.monotonic() + 180  # a loaded CI machine may take long to start the child
    while time.monotonic() < deadline and killed.is_alive():
        try:
            if json.loads(index_path.read_text())["shards"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    os.kill(killed.pid, signal.SIGKILL)
    killed.join()
    reference.join()
    assert reference.exitcode == 0 and killed.exitcode == -signal.SIGKILL
    num_done = len(read_index(tmp_path / "killed")["shards"])
    assert 1 <= num_done < NUM_KILL_SHARDS, f"the kill should land mid-run, but {num_done} shards were finished"

    rerun = _child(argv(tmp_path / "killed"))
    rerun.join()
    assert rerun.exitcode == 0
    index = read_index(tmp_path / "killed")
    assert index["complete"] and index["num_samples"] == 2 * NUM_KILL_SHARDS
    assert not list((tmp_path / "killed").glob("*.tmp"))
    got, want = _labels(tmp_path / "killed"), _labels(tmp_path / "ref")
    assert list(got) == list(want)
    keys = Counter(raw["__key__"] for raws in got.values() for raw in raws)
    assert set(keys) == set(_images(unlabeled)) and set(keys.values()) == {1}  # every key exactly once
    for name in want:
        assert [r["__key__"] for r in got[name]] == [r["__key__"] for r in want[name]]
        for a, b in zip(got[name], want[name], strict=True):
            sa, sb = decode_sample(a), decode_sample(b)
            np.testing.assert_array_equal(sa["target"], sb["target"])  # bit-identical labels
            sa["meta"]["provenance"].pop("time"), sb["meta"]["provenance"].pop("time")
            assert sa["meta"] == sb["meta"]


def test_rerun_skips_finished_and_redoes_unfinished_shards(unlabeled, teacher_ckpt, tmp_path):
    config = _config(unlabeled, tmp_path / "out", teacher_ckpt)
    run_pseudo_label(config)
    before = _labels(tmp_path / "out")
    # A kill between the rename and the record leaves a tar without a record; a kill mid-shard leaves a .tmp.
    (tmp_path / "out" / "records" / "synth-000001.tar.json").unlink()
    (tmp_path / "out" / "synth-000003.tar").rename(tmp_path / "out" / "synth-000003.tar.tmp")
    (tmp_path / "out" / "records" / "synth-000003.tar.json").unlink()
    assert read_index(tmp_path / "out")["complete"]  # the stale index is rebuilt from the records on the rerun
    summary = run_pseudo_label(config)
    assert (summary.num_shards_labeled, summary.num_shards_skipped) == (2, 4)
    assert (summary.num_labeled, summary.num_skipped) == (4, 8)
    after = _labels(tmp_path / "out")
    for name, raws in before.items():
        for a, b in zip(raws, after[name], strict=True):
            np.testing.assert_array_equal(decode_sample(a)["target"], decode_sample(b)["target"])
    assert read_index(tmp_path / "out")["complete"] and not list((tmp_path / "out").glob("*.tmp"))


def test_a_rerun_on_changed_inputs_of_the_same_names_is_refused(unlabeled, teacher_ckpt, tmp_path):
    """Outputs are matched to inputs by file name: labels of other images must not be kept as finished."""
    inputs = tmp_path / "in"
    shutil.copytree(unlabeled, inputs)
    run_pseudo_label(_config(inputs, tmp_path / "out", teacher_ckpt))
    write_synthetic(tmp_path / "new", num=12, size=(42, 60), seed=6, labeled=False, shard_size=2)
    for shard in (tmp_path / "new").glob("*.tar"):  # other images, under the same shard names
        shutil.copy(shard, inputs / shard.name)
    changed = r"holds synth-000000.tar, labeled from .*first key 'synth_000005_00000000'.*\), but the input .* now has"
    with pytest.raises(ValueError, match=changed):
        run_pseudo_label(_config(inputs, tmp_path / "out", teacher_ckpt))


def test_a_rerun_on_re_encoded_images_of_the_same_keys_is_refused(unlabeled, teacher_ckpt, tmp_path):
    """Re-exported photos keep their keys, and tar pads archives to 10 KiB records, so size and first key stayed the
    same and the old labels were kept for the new images. The member list's digest tells them apart."""
    import io
    import tarfile

    from PIL import Image

    inputs = tmp_path / "in"
    shutil.copytree(unlabeled, inputs)
    run_pseudo_label(_config(inputs, tmp_path / "out", teacher_ckpt))
    shard = sorted(inputs.glob("*.tar"))[0]
    size = shard.stat().st_size
    members = []
    with tarfile.open(shard) as tar:
        for member in tar:
            data = tar.extractfile(member).read()
            if member.name.endswith(".jpg"):  # the same picture, saved again at another quality
                buffer = io.BytesIO()
                Image.open(io.BytesIO(data)).save(buffer, format="JPEG", quality=60)
                data = buffer.getvalue()
            members.append((member.name, data))
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert shard.stat().st_size == size  # what the old check compared, with the first key
    with pytest.raises(ValueError, match=rf"holds {shard.name}, .*members .*the inputs changed"):
        run_pseudo_label(_config(inputs, tmp_path / "out", teacher_ckpt))


def test_two_processes_split_the_shards_without_overlap_or_gap(unlabeled, teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["pseudo-label", "--model", "test_dav2", "--checkpoint", str(teacher_ckpt), "--input", str(unlabeled),
            "--output", str(out), "--resolution", str(RESOLUTION), "--devices", "2", "--device", "cpu",
            "--num-workers", "0", "--num-encoders", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "labeled 12 image(s) in 6 shard(s)" in capsys.readouterr().out
    index = read_index(out)
    names = [Path(p).name for p in shard_paths(str(unlabeled))]
    assert index["complete"] and sorted(index["records"]) == names
    assert {name: index["records"][name]["rank"] for name in names} == {n: i % 2 for i, n in enumerate(names)}
    keys = Counter(raw["__key__"] for raws in _labels(out).values() for raw in raws)
    assert set(keys) == set(_images(unlabeled)) and set(keys.values()) == {1}


def test_a_different_teacher_or_setting_is_refused_unless_allowed(
    unlabeled, teacher_ckpt, other_teacher_ckpt, tmp_path
):
    first_two = [str(p) for p in shard_paths(str(unlabeled))[:2]]
    run_pseudo_label(_config(first_two, tmp_path / "out", teacher_ckpt))
    with pytest.raises(ValueError, match="different teacher.*teacher_sha256.*--allow-mixed-teachers"):
        run_pseudo_label(_config(unlabeled, tmp_path / "out", other_teacher_ckpt))
    with pytest.raises(ValueError, match="resolution: 28 -> 42"):
        run_pseudo_label(_config(unlabeled, tmp_path / "out", teacher_ckpt, resolution=42))
    assert len(read_index(tmp_path / "out")["shards"]) == 2  # nothing was written by the refused runs
    summary = run_pseudo_label(_config(unlabeled, tmp_path / "out", other_teacher_ckpt, allow_mixed_teachers=True))
    assert (summary.num_shards_labeled, summary.num_shards_skipped) == (4, 2)
    index = read_index(tmp_path / "out")
    assert index["complete"] and index["teacher"] == "mixed" and len(index["teachers"]) == 2


def test_start_errors_are_clear_and_come_before_any_work(unlabeled, teacher_ckpt, v1_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="shard not found: .*nope-000009.tar"):
        run_pseudo_label(_config(unlabeled / "nope-000009.tar", out, teacher_ckpt))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is no checkpoint")
    with pytest.raises(ValueError, match="garbage.pth is not a readable checkpoint"):
        run_pseudo_label(_config(unlabeled, out, garbage))
    with pytest.raises(ValueError, match="does not match the model"):
        run_pseudo_label(_config(unlabeled, out, v1_ckpt))  # a test_dav1 checkpoint for test_dav2
    with pytest.raises(FileNotFoundError, match="teacher checkpoint not found"):
        run_pseudo_label(_config(unlabeled, out, tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="would overwrite the input shard"):
        run_pseudo_label(_config(unlabeled, unlabeled, teacher_ckpt))
    with pytest.raises(ValueError, match=r"input shard .*-000000.tar is given twice \(check --input\)"):
        run_pseudo_label(_config([unlabeled, unlabeled], out, teacher_ckpt))
    assert not out.exists()
    images = tmp_path / "images"  # someone's image shards, named as the labels would be
    images.mkdir()
    first = sorted(unlabeled.glob("*.tar"))[0]
    shutil.copy(first, images / first.name)
    with pytest.raises(ValueError, match=rf"holds {first.name}, which the labels would replace, and no index.json"):
        run_pseudo_label(_config(unlabeled, images, teacher_ckpt))
    assert (images / first.name).read_bytes() == first.read_bytes()
    argv = ["pseudo-label", "--checkpoint", str(garbage), "--model", "test_dav2", "--input", str(unlabeled),
            "--output", str(out), "--device", "cpu", "--devices", "2"]  # fmt: skip
    assert main(argv) == 1  # checked by the launcher before it spawns anything
    assert "depthkit pseudo-label: error:" in capsys.readouterr().err and not out.exists()
    assert main(argv[:-4] + ["--confidence"]) == 1
    assert "--confidence comes from the flip pass" in capsys.readouterr().err
    assert main(argv[:-4] + ["--num-encoders", "0"]) == 1
    assert "--num-encoders must be >= 1, got 0" in capsys.readouterr().err and not out.exists()


def test_launch_topology(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
                 "NODE_RANK", "GROUP_RANK", "SLURM_NODEID"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert resolve_launch().mode == "run" and resolve_launch().world_size == 1
    spawn = resolve_launch(devices=4)
    assert (spawn.mode, spawn.world_size, spawn.devices) == ("spawn", 4, 4)
    with pytest.raises(ValueError, match="node's rank is unknown"):
        resolve_launch(devices=2, num_nodes=2)
    node = resolve_launch(devices=2, num_nodes=3, node_rank=2)
    assert (node.mode, node.world_size, node.node_rank) == ("spawn", 6, 2)
    # A batch script of an 8-task allocation (sbatch sets SLURM_PROCID and SLURM_NTASKS, but runs one process):
    # depthkit spawns the devices, rather than labeling rank 0's share alone.
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    batch = resolve_launch(devices=2)
    assert (batch.mode, batch.rank, batch.world_size) == ("spawn", 0, 2)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")  # srun's tasks
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    for slurm in (resolve_launch(devices=4, num_nodes=2), resolve_launch()):  # without --devices: srun's tasks
        assert (slurm.mode, slurm.rank, slurm.world_size, slurm.local_rank) == ("run", 5, 8, 1)
    with pytest.raises(ValueError, match="srun started 8 tasks, but --devices x --num-nodes = 2"):
        resolve_launch(devices=2)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")  # one task per node, each spawning its 4 devices
    monkeypatch.setenv("SLURM_NODEID", "1")
    per_node = resolve_launch(devices=4, num_nodes=2)
    assert (per_node.mode, per_node.rank, per_node.world_size, per_node.node_rank) == ("spawn", 4, 8, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    torchrun = resolve_launch()
    assert (torchrun.mode, torchrun.rank, torchrun.world_size, torchrun.local_rank) == ("run", 3, 4, 3)
    with pytest.raises(ValueError, match="the launcher started 4 process"):
        resolve_launch(devices=8)


def test_command_module_imports_no_torch():
    code = "import sys, depthkit.pseudo_label.commands; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_commands_choices_are_the_jobs():
    """The command spells its choices out (importing the job would import torch): they must stay the job's."""
    import argparse

    from depthkit.pseudo_label.commands import register
    from depthkit.pseudo_label.job import DEVICES, ENCODINGS
    from depthkit.pseudo_label.teacher import LABEL_SIZES, PRECISIONS, TTA_MODES

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    (command,) = parser._subparsers._group_actions[0].choices.values()
    choices = {action.dest: tuple(action.choices) for action in command._actions if action.choices}
    assert choices["encoding"] == ENCODINGS and choices["label_size"] == LABEL_SIZES
    assert choices["device"] == DEVICES and choices["tta"] == TTA_MODES
    assert set(choices["precision"]) == {"auto", *PRECISIONS}


def test_labeling_nothing_at_all_is_an_error(unlabeled, teacher_ckpt, tmp_path, capsys):
    """Label shards given as input: every sample fails (no image); a run that labels nothing must not exit 0."""
    labels_only = tmp_path / "labels_only"
    argv = ["pseudo-label", "--checkpoint", str(teacher_ckpt), "--model", "test_dav2", "--device", "cpu",
            "--resolution", str(RESOLUTION), "--no-progress"]  # fmt: skip
    assert main([*argv, "--input", str(unlabeled), "--output", str(labels_only)]) == 0
    capsys.readouterr()
    assert main([*argv, "--input", str(labels_only), "--output", str(tmp_path / "again")]) == 1
    err = capsys.readouterr().err
    assert "no input image could be labeled (12 failed, 0 shard(s)" in err and "are the inputs image shards?" in err


@pytest.mark.gpu
def test_a_batch_collected_after_the_next_launch_holds_its_own_labels(teacher_ckpt):
    """On CUDA `launch_batch` returns before the copy to the host is done: the job launches batch 2, then collects
    batch 1. Each must hold its own images' labels (the per-image inference of the same model on the same GPU)."""
    from depthkit.pseudo_label import launch_batch

    model = _teacher(teacher_ckpt).cuda()
    rng = np.random.default_rng(3)
    batches = [[torch.from_numpy(rng.integers(0, 256, (30, 40, 3), np.uint8)) for _ in range(4)] for _ in range(2)]
    size_hw = official_resize_hw(30, 40, RESOLUTION, model.meta.patch_size)
    first = launch_batch(model, [image.pin_memory() for image in batches[0]], size_hw)
    second = launch_batch(model, [image.pin_memory() for image in batches[1]], size_hw)
    for pending, images in ((first, batches[0]), (second, batches[1])):
        for (pred_HW, conf_HW), image in zip(pending.result(), images, strict=True):
            expected = model.infer(image.numpy(), input_size=RESOLUTION).values
            assert conf_HW is None and pred_HW.shape == image.shape[:2]
            torch.testing.assert_close(pred_HW, expected, rtol=1e-4, atol=1e-5)
        assert pending.done()


def test_label_batch_refuses_images_it_would_misread(teacher_ckpt):
    """A float [0, 1] tensor would be divided by 255 again; the rest failed deep inside torch."""
    from depthkit.pseudo_label import label_batch

    model = _teacher(teacher_ckpt)
    image = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (30, 40, 3), np.uint8))
    size_hw = official_resize_hw(30, 40, RESOLUTION, model.meta.patch_size)
    for bad, what in [
        (image.float() / 255, "torch.float32 (30, 40, 3)"),
        (image.numpy(), "uint8 (30, 40, 3)"),
        (image[:, :, 0], "torch.uint8 (30, 40)"),
        (image.permute(2, 0, 1), "torch.uint8 (3, 30, 40)"),
    ]:
        with pytest.raises(
            ValueError, match=rf"image 1: expected a uint8 torch tensor H x W x 3.*got {re.escape(what)}"
        ):
            label_batch(model, [image, bad], size_hw)
    with pytest.raises(ValueError, match="no images to label"):
        label_batch(model, [], size_hw)


def test_each_writer_has_its_own_temporary_shard_and_leftovers_are_removed(unlabeled, teacher_ckpt, tmp_path):
    """Two jobs on one output shared `X.tar.tmp`: the second emptied it and wrote on after the first had renamed it,
    so a finished shard held the other teacher's labels under the first one's record. Each process now writes its
    own temporary file; a job about to write a shard removes what others left of it (a killed run's part)."""
    from depthkit.data.shards import TarWriter, temporary_tar

    out = tmp_path / "out"
    out.mkdir()
    name = Path(shard_paths(str(unlabeled))[0]).name
    leftovers = [out / f"{Path(name).stem}.otherhost-999.tar.tmp", out / f"{name}.tmp"]
    for path in leftovers:
        path.write_bytes(b"another process's part of the shard")
    writer = TarWriter(out / "x.tar")
    assert writer.tmp_path == temporary_tar(out / "x.tar") and str(os.getpid()) in writer.tmp_path.name
    writer.abort()
    run_pseudo_label(_config(unlabeled, out, teacher_ckpt))
    assert not any(path.exists() for path in leftovers) and not list(out.glob("*.tmp"))
    assert read_index(out)["complete"]


def test_a_large_jobs_index_is_one_line_and_reads_the_same(tmp_path, monkeypatch):
    from depthkit.pseudo_label.index import IndexWriter, read_index, write_record

    for i in range(3):
        (tmp_path / f"s{i}.tar").write_bytes(b"")
        write_record(tmp_path, {"shard": f"s{i}.tar", "num_samples": i + 1, "failed": [], "settings": {"tta": "none"}})
    indented = IndexWriter(tmp_path, [f"s{i}.tar" for i in range(4)]).refresh(force=True)
    assert len((tmp_path / "index.json").read_text().splitlines()) > 3
    monkeypatch.setattr(IndexWriter, "INDENTED_UP_TO", 2)
    one_line = IndexWriter(tmp_path, [f"s{i}.tar" for i in range(4)]).refresh(force=True)
    assert len((tmp_path / "index.json").read_text().splitlines()) == 1
    assert read_index(tmp_path) == one_line and {**one_line, "updated": None} == {**indented, "updated": None}
    assert one_line["pending"] == ["s3.tar"] and one_line["num_samples"] == 6


def test_an_output_folder_of_other_data_is_refused_naming_its_index(unlabeled, teacher_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.json").write_text('{"kind": "labeled", "shards": {}}')
    with pytest.raises(ValueError, match="holds index.json of kind 'labeled', not pseudo-labels"):
        run_pseudo_label(_config(unlabeled, out, teacher_ckpt))
    (out / "index.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="its index.json is unreadable or not a JSON object"):
        run_pseudo_label(_config(unlabeled, out, teacher_ckpt))


_HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX if sys.argv[2] == "exclusive" else fcntl.LOCK_SH)
os.pwrite(fd, b"node7, pid 4242", 0)
print("held", flush=True)
sys.stdin.read()
"""


def _hold(path, mode):
    """Another process holding a POSIX lock on `path` (as another job's rank does) until its stdin closes."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(path), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_job_on_the_same_output_stops_naming_the_first(unlabeled, teacher_ckpt, tmp_path):
    """Launched twice (or requeued while the first still runs), two jobs would label the same shards and race for the
    records: the second one stops before any work, whether it has the same world size (its rank's lock is held) or
    another (the first job's world lock is). A job's locks go with its process."""
    from depthkit.pseudo_label.job import LOCKS_DIR

    locks = tmp_path / "out" / LOCKS_DIR
    locks.mkdir(parents=True)
    for name, mode, message in (
        ("rank0.lock", "exclusive", r"another job's rank 0 is labeling into it \(node7, pid 4242\)"),
        ("world2.lock", "shared", r"a job of 2 ranks is labeling into it \(this one has 1\)"),
    ):
        holder = _hold(locks / name, mode)
        try:
            with pytest.raises(ValueError, match=message):
                run_pseudo_label(_config(unlabeled, tmp_path / "out", teacher_ckpt))
            assert not list((tmp_path / "out").glob("*.tar"))
        finally:
            holder.stdin.close()
            holder.wait(timeout=30)
    assert run_pseudo_label(_config(unlabeled, tmp_path / "out", teacher_ckpt)).num_labeled == 12  # both gone
