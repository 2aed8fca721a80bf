"""Streaming: splitting across ranks and workers, shuffling, resume, pairing, CutMix, bad samples."""

from __future__ import annotations

import functools
import http.server
import itertools
import shutil
import tarfile
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from depthkit.data.cutmix import cutmix_boxes, mix_like, paste_boxes
from depthkit.data.shards import (
    ShardFormatError,
    ShardWriter,
    decode_sample,
    encode_sample,
    iter_tar_samples,
    shard_paths,
)
from depthkit.data.stream import (
    ShardStream,
    StreamState,
    make_loader,
    merge_stream_states,
)
from depthkit.data.tar_reader import iter_raw_samples
from depthkit.data.transforms import SampleTransform, TransformConfig


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_two_ranks_two_workers_read_every_shard_once(synth_shards):
    seen = Counter()
    for rank in range(2):
        stream = ShardStream(synth_shards, batch_size=2, rank=rank, world_size=2, shuffle_buffer=4, drop_last=False)
        seen.update(_keys(make_loader(stream, num_workers=2)))
    assert len(seen) == 48 and set(seen.values()) == {1}


def test_epochs_reshuffle_and_resampled_mode_runs_on(synth_shards):
    stream = ShardStream(synth_shards, batch_size=4, shuffle_buffer=8, drop_last=False)
    first = _keys(stream)
    stream.set_epoch(1)
    second = _keys(stream)
    assert sorted(first) == sorted(second) and first != second


@pytest.mark.parametrize("num_workers", [None, 0, 2])  # None: the stream iterated directly
def test_each_pass_is_the_next_epoch(synth_shards, num_workers):
    """Lightning calls no `set_epoch` on a dataset: each pass must bring a new order and new augmentation itself."""

    def passes(stream, n):
        source = stream if num_workers is None else make_loader(stream, num_workers=num_workers)
        return [list(source) for _ in range(n)]

    expected = []
    for epoch in range(3):
        stream = _strong_stream(synth_shards)
        stream.set_epoch(epoch)
        expected.append(passes(stream, 1)[0])
    assert len({tuple(k for b in p for k in b["key"]) for p in expected}) == 3
    for got, want in zip(passes(_strong_stream(synth_shards), 3), expected, strict=True):
        _assert_same_batches(got, want)
        assert {b["__epoch__"] for b in got} == {want[0]["__epoch__"]}


def test_an_evaluation_stream_repeats_its_pass(synth_shards):
    stream = ShardStream(synth_shards, batch_size=4, advance_epoch=False)
    loader = make_loader(stream, num_workers=1)
    assert _keys(loader) == _keys(loader) == _keys(stream)


def test_a_resampled_stream_augments_each_draw_of_a_sample_anew(synth_shards):
    transform = SampleTransform(TransformConfig(crop_size=28, patch_size=14, strong=True))
    stream = ShardStream(synth_shards, batch_size=4, transform=transform, resampled=True, seed=1)
    crops: dict[str, list[bytes]] = {}
    for batch in [b for _, b in zip(range(40), stream, strict=False)]:
        for key, image, strong in zip(batch["key"], batch["image"], batch["image_strong"], strict=True):
            crops.setdefault(key, []).append(image.numpy().tobytes() + strong.numpy().tobytes())
    drawn_again = [c for c in crops.values() if len(c) >= 3]
    assert drawn_again and all(len(set(c)) == len(c) for c in drawn_again)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_stream_skips_in_its_first_pass_only_and_resumes_later_epochs(synth_shards, num_workers):
    """The saved state's epoch is the one resumed (the stream need not be told), and its skip is not repeated."""
    uninterrupted = make_loader(_strong_stream(synth_shards), num_workers=num_workers)
    epochs = [list(uninterrupted) for _ in range(3)]
    state = StreamState()
    for batch in epochs[0] + epochs[1][:4]:
        state.update(batch)
    assert state.epoch == 1
    resumed = make_loader(_strong_stream(synth_shards, resume=state.state_dict()), num_workers=num_workers)
    _assert_same_batches(list(resumed), epochs[1][4:])
    _assert_same_batches(list(resumed), epochs[2])


def test_a_spawned_worker_gets_the_parents_topology(synth_shards, monkeypatch):
    """A worker started by spawn pickles the stream; it has no process group of its own to ask."""
    import pickle

    from depthkit.data.stream import topology

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    sent = pickle.dumps(ShardStream(synth_shards))  # in the parent
    monkeypatch.delenv("RANK")  # the worker's environment
    monkeypatch.delenv("WORLD_SIZE")
    copy = pickle.loads(sent)
    assert topology(copy.rank, copy.world_size) == (1, 2)
    endless = ShardStream(synth_shards, batch_size=4, resampled=True)
    batches = [b for _, b in zip(range(20), endless, strict=False)]  # 80 samples from 48: it keeps going
    assert len(batches) == 20


def _assert_same_batches(resumed: list[dict], full: list[dict]) -> None:
    assert [b["key"] for b in resumed] == [b["key"] for b in full]
    for a, b in zip(resumed, full, strict=True):
        # Augmentation is seeded per sample and CutMix per batch position: same crops, jitter and boxes.
        for name in ("image", "target", "image_strong", "cutmix_mask", "cutmix_index"):
            torch.testing.assert_close(a[name], b[name], msg=name)


def _strong_stream(shards, **kw) -> ShardStream:
    transform = SampleTransform(TransformConfig(crop_size=28, patch_size=14, strong=True))
    return ShardStream(shards, batch_size=3, transform=transform, shuffle_buffer=5, seed=7, cutmix_p=0.5, **kw)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly(synth_shards, num_workers):
    full = list(make_loader(_strong_stream(synth_shards), num_workers=num_workers))
    assert any(b["cutmix_mask"].any() for b in full[5:])
    state = StreamState()
    for batch in full[:5]:
        state.update(batch)
    resumed = list(make_loader(_strong_stream(synth_shards, resume=state.state_dict()), num_workers=num_workers))
    _assert_same_batches(resumed, full[5:])


def test_resume_of_two_ranks_from_their_joined_state(synth_shards):
    """A checkpoint is written by rank 0 alone: it holds the positions of every rank's workers, joined."""
    full = [list(make_loader(_strong_stream(synth_shards, rank=r, world_size=2), num_workers=2)) for r in range(2)]
    states = [StreamState() for _ in range(2)]
    for rank in range(2):
        for batch in full[rank][:3]:
            states[rank].update(batch)
    joined = merge_stream_states([state.state_dict() for state in states])
    assert sorted(joined["consumed"]) == ["0", "1", "2", "3"]  # global workers of both ranks
    for rank in range(2):
        stream = _strong_stream(synth_shards, rank=rank, world_size=2, resume=joined)
        _assert_same_batches(list(make_loader(stream, num_workers=2)), full[rank][3:])


def test_each_global_worker_is_saved_from_the_rank_that_owns_it():
    """After a resume every rank holds every worker's entry; only the owner's copy moves on. A plain join let rank
    1's stale copy of worker 0 win, and the second resume replayed rank 0's data."""
    resumed = {"epoch": 0, "total_workers": 4, "next_worker": 0}
    rank0 = {**resumed, "consumed": {"0": 80, "1": 80, "2": 40, "3": 40}, "skipped": {"0": 2, "2": 1}}
    rank1 = {**resumed, "consumed": {"0": 40, "1": 40, "2": 80, "3": 80}, "skipped": {"0": 1, "2": 3}}
    merged = merge_stream_states([rank0, rank1])
    assert merged["consumed"] == {"0": 80, "1": 80, "2": 80, "3": 80}
    assert merged["skipped"] == {"0": 2, "2": 3}


def test_a_rank_without_shards_in_epoch_mode_is_an_error_not_a_hang(synth_shards):
    """8 shards, 4 ranks x 3 workers: rank 3's workers (9-11) get none, and the other ranks would wait for it."""
    with pytest.raises(ValueError, match="8 shard\\(s\\) for 4 ranks x 3 loader worker\\(s\\): rank 3 has none"):
        list(make_loader(ShardStream(synth_shards, rank=3, world_size=4), num_workers=3))
    assert _keys(make_loader(ShardStream(synth_shards, rank=2, world_size=4, batch_size=2), num_workers=3))  # 2 shards
    resampled = make_loader(ShardStream(synth_shards, rank=3, world_size=4, resampled=True), num_workers=3)
    assert next(iter(resampled))["key"]  # the sweeps are dealt on: every worker has shards


def test_resume_with_another_topology_is_refused(synth_shards):
    state = {"epoch": 0, "total_workers": 4, "consumed": {"0": 3}}
    with pytest.raises(ValueError, match="cannot resume a stream of 4 global workers with 1"):
        next(iter(ShardStream(synth_shards, resume=state)))


def test_transform_crops_to_multiples_of_14_without_blending_invalid(rgbd_shards):
    cfg = TransformConfig(crop_size=(98, 126), patch_size=14)
    stream = ShardStream(rgbd_shards, batch_size=4, transform=SampleTransform(cfg), drop_last=False)
    batch = next(iter(stream))
    assert batch["image"].shape == (4, 3, 98, 126) and batch["image"].dtype == torch.uint8
    assert batch["target"].shape == (4, 98, 126) and batch["valid"].dtype == torch.bool
    assert torch.all(batch["target"][~batch["valid"]] == 0)
    # nearest-neighbour resizing: every valid target value existed in the source map (a blend of a depth with an
    # invalid 0, or of two depths, would not)
    sources = {}
    for raw in (r for path in shard_paths(rgbd_shards) for r in iter_tar_samples(path)):
        source = decode_sample(raw)
        sources[raw["__key__"]] = source["target"][source["valid"]]
    for key, target_HW, valid_HW in zip(batch["key"], batch["target"], batch["valid"], strict=True):
        assert valid_HW.any() and np.isin(target_HW[valid_HW].numpy(), sources[key]).all(), key


def test_transform_of_png16_steps_is_exactly_the_transform_of_the_decoded_target(rgbd_shards):
    """ShardStream hands png16 targets over as steps; cropping before converting must not change a bit."""
    transform = SampleTransform(TransformConfig(crop_size=(98, 126), patch_size=14))
    num_steps = 0
    for raw in (r for path in shard_paths(rgbd_shards) for r in iter_tar_samples(path)):
        as_steps = decode_sample(raw, target_steps=True)
        num_steps += "target_steps" in as_steps
        a, b = transform(decode_sample(raw)), transform(as_steps)
        assert b["target"].dtype == np.float32 and b["valid"].dtype == bool and "target_steps" not in b
        for name in ("image", "target", "valid"):
            np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(a["target"].view(np.uint32), b["target"].view(np.uint32))
    assert num_steps > 0


def test_strong_augmentation_and_cutmix(synth_shards):
    cfg = TransformConfig(crop_size=42, patch_size=14, strong=True)
    stream = ShardStream(synth_shards, kind="labeled", batch_size=8, transform=SampleTransform(cfg), cutmix_p=1.0)
    batch = next(iter(stream))
    mask, index = batch["cutmix_mask"], batch["cutmix_index"]
    assert mask.shape == (8, 42, 42) and mask.any(dim=(1, 2)).all()
    assert torch.all(index != torch.arange(8))
    mixed = mix_like(batch["target"], mask, index)
    b = 0
    torch.testing.assert_close(mixed[b][mask[b]], batch["target"][index[b]][mask[b]])
    torch.testing.assert_close(mixed[b][~mask[b]], batch["target"][b][~mask[b]])
    assert not torch.equal(batch["image_strong"], batch["image"])


def test_cutmix_without_the_photometric_augmentation(synth_shards):
    """`photometric=False` (V2's small students, Depth-Anything-V2#207): the student's image is the plain crop,
    mixed by CutMix only."""
    cfg = TransformConfig(crop_size=42, patch_size=14, strong=True, photometric=False)
    stream = ShardStream(synth_shards, kind="labeled", batch_size=8, transform=SampleTransform(cfg), cutmix_p=0.5)
    batch = next(iter(stream))
    expected = mix_like(batch["image"], batch["cutmix_mask"], batch["cutmix_index"])
    assert batch["cutmix_mask"].any() and torch.equal(batch["image_strong"], expected)
    unmixed = ~batch["cutmix_mask"].any(dim=(1, 2))
    assert unmixed.any() and torch.equal(batch["image_strong"][unmixed], batch["image"][unmixed])


def test_cutmix_probability_zero_and_box_areas():
    gen = torch.Generator().manual_seed(0)
    mask, index, boxes = cutmix_boxes(6, 50, 60, p=0.0, generator=gen)
    assert not mask.any() and torch.equal(index, torch.arange(6)) and boxes == []
    mask, index, _ = cutmix_boxes(200, 50, 60, p=0.5, generator=gen)
    mixed = mask.any(dim=(1, 2))
    assert 0.35 < mixed.float().mean() < 0.65
    areas = mask[mixed].float().mean(dim=(1, 2))
    assert areas.min() >= 0.01 and areas.max() <= 0.45


def test_pasting_the_boxes_mixes_as_the_mask_says_with_overlapping_boxes():
    """Every sample mixed (boxes overlap their partners' boxes): each box gets the partner's pixels as they were."""
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (5, 3, 40, 30), dtype=torch.uint8, generator=gen)
    cutmix = cutmix_boxes(5, 40, 30, p=1.0, area=(0.3, 0.4), generator=gen)
    assert len(cutmix.boxes) == 5
    expected = mix_like(images, cutmix.mask_BHW, cutmix.index_B)
    assert torch.equal(paste_boxes(images.clone(), cutmix), expected)
    channels_last = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # as collate stacks HWC images
    assert torch.equal(paste_boxes(channels_last, cutmix), expected)


def _write_pseudo_labels(image_dir, label_dir, drop_key=None):
    """Pseudo-label shards with the same names and keys as the image shards (one key left out)."""
    from depthkit.data.shards import decode_sample, iter_tar_samples

    for path in shard_paths(image_dir):
        name = path.rsplit("/", 1)[-1]
        with ShardWriter(label_dir, prefix="x", shard_size=10**6) as writer:
            for raw in iter_tar_samples(path):
                sample = decode_sample(raw)
                if sample["__key__"] == drop_key:
                    continue
                h, w = sample["image"].shape[:2]
                target = np.full((h, w), float(len(sample["__key__"])), np.float32)
                writer.write(
                    encode_sample(
                        {
                            "__key__": sample["__key__"],
                            "target": target,
                            "meta": {
                                "kind": "pseudo",
                                "output_space": "affine_disparity",
                                "provenance": {"teacher": "t"},
                            },
                        }
                    )
                )
        (label_dir / "x-000000.tar").rename(label_dir / name)


def test_pseudo_label_shards_pair_with_images_by_key(synth_shards, tmp_path):
    labels = tmp_path / "labels"
    _write_pseudo_labels(synth_shards, labels, drop_key="synth_000003_00000004")
    stream = ShardStream(synth_shards, kind="pseudo", labels=str(labels), batch_size=5, drop_last=False)
    keys = []
    for batch in stream:
        keys += batch["key"]
        assert all(m["pseudo"]["kind"] == "pseudo" for m in batch["meta"])
        assert batch["target"].shape[1:] == batch["image"].shape[2:]
    assert len(keys) == 47 and "synth_000003_00000004" not in keys


def test_pseudo_labels_out_of_order_are_an_error(synth_shards, tmp_path):
    labels = tmp_path / "labels"
    _write_pseudo_labels(synth_shards, labels)
    first = shard_paths(synth_shards)[0].rsplit("/", 1)[-1]
    shutil.copy(labels / shard_paths(synth_shards)[1].rsplit("/", 1)[-1], labels / first)
    stream = ShardStream(synth_shards, kind="pseudo", labels=str(labels), batch_size=5)
    with pytest.raises(ShardFormatError, match="has no image in the same order"):
        list(stream)


def test_a_resampled_stream_without_any_sample_is_an_error_not_a_spin(synth_shards, tmp_path):
    """Drawing shards forever from shards that yield nothing would never return (a student that never steps)."""
    labels = tmp_path / "labels"
    labels.mkdir()
    for url in shard_paths(synth_shards):
        tarfile.open(labels / url.rsplit("/", 1)[-1], "w").close()  # every image failed in the pseudo-labeler
    stream = ShardStream(synth_shards, kind="pseudo", labels=str(labels), batch_size=2, resampled=True)
    with pytest.raises(ValueError, match="hold no image with a pseudo-label in .*recorded as failed"):
        next(iter(stream))
    _write_pseudo_labels(synth_shards, labels)  # one empty shard among good ones is no error
    tarfile.open(labels / shard_paths(synth_shards)[0].rsplit("/", 1)[-1], "w").close()
    batches = iter(ShardStream(synth_shards, kind="pseudo", labels=str(labels), batch_size=2, resampled=True))
    assert all(len(next(batches)["key"]) == 2 for _ in range(40))


def test_bad_samples_raise_or_are_counted(tmp_path, synth_shards, caplog):
    folder = tmp_path / "shards"
    folder.mkdir()
    shutil.copy(shard_paths(synth_shards)[0], folder / "a.tar")
    # a shard with an undecodable image and a sample without a target
    with ShardWriter(folder, prefix="b", shard_size=100) as writer:
        rng = np.random.default_rng(0)
        good = {
            "__key__": "good",
            "image": rng.integers(0, 255, (48, 64, 3), dtype=np.uint8),
            "target": np.ones((48, 64), np.float32),
            "meta": {"output_space": "metric_depth"},
        }
        writer.write(encode_sample(good))
        broken = encode_sample({**good, "__key__": "broken"})
        broken["broken.png"] = b"garbage"
        writer.write(broken)
        no_target = encode_sample({**good, "__key__": "notarget"})
        del no_target["notarget.target.npz"]  # no target_scale given: stored as float npz
        writer.write(no_target)
    # and a truncated tar
    data = open(shard_paths(synth_shards)[1], "rb").read()
    (folder / "c.tar").write_bytes(data[: len(data) // 2])

    with pytest.raises(ShardFormatError, match=r"b-000000.tar, key broken: .*cannot decode image"):
        list(ShardStream(folder / "b-000000.tar", batch_size=1))
    with pytest.raises(ShardFormatError, match=r"c.tar"):
        list(ShardStream(folder / "c.tar", batch_size=1))
    batches = list(ShardStream(folder, batch_size=1, on_error="skip"))
    state = StreamState()
    for batch in batches:
        state.update(batch)
    keys = [k for b in batches for k in b["key"]]
    assert "good" in keys and "broken" not in keys and "notarget" not in keys
    assert 6 + 1 <= len(keys) < 6 + 1 + 6  # shard a, 'good', and the part of c before the cut
    # broken, notarget, and the truncated shard's tail (a partial last sample, or a tar error)
    assert "skipped 3 bad sample(s)" in caplog.text
    assert 1 <= state.num_skipped <= 3  # batches carry the running count up to the last batch


@pytest.mark.parametrize("damage", ["cut", "header", "zeroed header"])
def test_a_tar_cut_between_members_or_with_a_damaged_header_is_an_error(damage, synth_shards, tmp_path):
    """Python's tarfile takes these for the end of the archive: the samples after them would vanish silently. A
    zeroed header (a bad sector) even looks like the end-of-archive marker: only the data after it tells."""
    path = shard_paths(synth_shards)[0]
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
    first_of_third = next(m for m in members if m.name.startswith(keys[2] + "."))
    data = open(path, "rb").read()
    at = first_of_third.offset  # a header block, between the second sample and the third
    filler = b"x" if damage == "header" else b"\0"
    broken = data[:at] if damage == "cut" else data[:at] + filler * 512 + data[at + 512 :]
    (tmp_path / "broken.tar").write_bytes(broken)
    read = []
    with pytest.raises(ShardFormatError, match=rf"broken.tar: corrupt or unreadable tar after key {keys[0]}"):
        for raw in iter_raw_samples(str(tmp_path / "broken.tar")):
            read.append(raw["__key__"])
    assert read == keys[:1]  # what came before the damage, less the sample read last (the cut may be inside it)


def test_a_tar_cut_inside_a_sample_reports_the_cut_not_a_missing_member(synth_shards, tmp_path):
    path = shard_paths(synth_shards)[0]
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
    second_of_third = [m for m in members if m.name.startswith(keys[2] + ".")][1]
    (tmp_path / "broken.tar").write_bytes(open(path, "rb").read()[: second_of_third.offset])
    with pytest.raises(ShardFormatError, match=rf"broken.tar: corrupt or unreadable tar after key {keys[1]}"):
        list(ShardStream(tmp_path / "broken.tar", batch_size=1))


def test_first_key_skips_folder_entries(tmp_path):
    """`tar -cf s.tar .` starts with the entry "./": the first sample is the first file's."""
    import io

    from depthkit.data.tar_reader import first_key

    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        folder = tarfile.TarInfo("./")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        member = tarfile.TarInfo("./000.jpg")
        member.size = 3
        tar.addfile(member, io.BytesIO(b"abc"))
    assert first_key(str(tmp_path / "s.tar")) == "./000"
    assert [s["__key__"] for s in iter_raw_samples(str(tmp_path / "s.tar"))] == ["./000"]


def test_stream_arguments_that_would_mislead_are_refused(synth_shards):
    """One of rank / world_size alone took the other from the environment: every rank read the same shards."""
    with pytest.raises(ValueError, match="rank=1, world_size=None: give both, or neither"):
        ShardStream(synth_shards, batch_size=2, rank=1)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 2.5"):
        ShardStream(synth_shards, batch_size=2.5)


@pytest.fixture
def http_root(synth_shards):
    """Serve the synthetic shards over http from a local server thread (no outside network)."""
    handler = functools.partial(_QuietHandler, directory=str(synth_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


def _local_names(folder) -> list[str]:
    return [p.rsplit("/", 1)[-1] for p in shard_paths(folder)]


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset opens http(s) URLs with curl, not on PATH")
def test_http_brace_and_pipe_urls_stream_like_local_files(synth_shards, http_root):
    names = _local_names(synth_shards)
    assert names[0].endswith("000000.tar") and len(names) == 8
    stem = names[0][: -len("000000.tar")]
    url = f"{http_root}/{stem}{{000000..000007}}.tar"
    assert len(shard_paths(url)) == 8
    local = ShardStream(synth_shards, batch_size=4, drop_last=False)
    remote = ShardStream(url, batch_size=4, drop_last=False, rank=1, world_size=2)
    remote_other = ShardStream(url, batch_size=4, drop_last=False, rank=0, world_size=2)
    local_batches = list(local)
    remote_keys = _keys(remote) + _keys(remote_other)
    assert sorted(remote_keys) == sorted(_keys(local_batches)) and len(remote_keys) == 48
    piped = ShardStream(f"pipe:cat {synth_shards}/{names[0]}", batch_size=6, drop_last=False)
    (batch,) = list(piped)
    first = next(b for b in local_batches if batch["key"][0] in b["key"])
    i = first["key"].index(batch["key"][0])
    torch.testing.assert_close(batch["target"][0], first["target"][i])


def test_missing_http_shard_names_the_url(synth_shards, http_root):
    url = f"{http_root}/no-such-shard-000000.tar"
    with pytest.raises(ShardFormatError, match="no-such-shard-000000.tar: could not be fetched \\(curl exited with 22"):
        list(ShardStream(url, batch_size=2, drop_last=False))


def test_a_url_scheme_that_is_not_streamed_and_an_empty_list_are_refused_up_front():
    with pytest.raises(ValueError, match="s3:// is not read directly .* 'pipe:aws s3 cp s3://b/x.tar -'"):
        ShardStream("s3://b/x.tar")
    with pytest.raises(FileNotFoundError, match="no shards given"):
        ShardStream([])


def test_bad_stream_arguments_are_named(synth_shards):
    with pytest.raises(ValueError, match="cutmix_p=2.0 is not a probability"):
        ShardStream(synth_shards, cutmix_p=2.0)
    for rank, world_size in ((0, 0), (2, 2), (-1, 2)):
        with pytest.raises(ValueError, match="expected 0 <= rank < world_size"):
            ShardStream(synth_shards, rank=rank, world_size=world_size)


def _without_index(shards, tmp_path):
    """The same shards with no index.json: no sample counts, so a resume reads what it skips."""
    copy = tmp_path / "noindex"
    shutil.copytree(shards, copy)
    (copy / "index.json").unlink()
    return copy


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_every_batch_of_an_epoch_with_and_without_sample_counts(synth_shards, tmp_path, num_workers):
    """With counts (index.json) a resume steps over the consumed samples by position, reading only the shuffle
    buffer's; without, it reads and drops them: either way the rest of the epoch, its shuffled tail included."""
    plain = _without_index(synth_shards, tmp_path)
    full = list(make_loader(_strong_stream(synth_shards), num_workers=num_workers))
    for stop in range(1, len(full)):
        state = StreamState()
        for batch in full[:stop]:
            state.update(batch)
        for shards in (synth_shards, plain):
            stream = _strong_stream(shards, resume=state.state_dict())
            _assert_same_batches(list(make_loader(stream, num_workers=num_workers)), full[stop:])


def test_a_resampled_resume_reads_only_the_shuffle_buffers_shards(synth_shards, tmp_path, monkeypatch):
    """A resampled stream's position covers the whole run: reading it all again grew with the run's length."""
    from depthkit.data import stream as stream_module

    opened = Counter()
    real = stream_module.iter_raw_samples

    def counted(url):
        opened[url] += 1
        return real(url)

    def stream(shards, **kw):
        return _strong_stream(shards, resampled=True, **kw)

    full = [b for _, b in zip(range(60), stream(synth_shards), strict=False)]
    state = StreamState()
    for batch in full[:50]:
        state.update(batch)
    monkeypatch.setattr(stream_module, "iter_raw_samples", counted)
    opened_by = {}
    for shards in (synth_shards, _without_index(synth_shards, tmp_path)):
        opened.clear()
        resumed = stream(shards, resume=state.state_dict())
        _assert_same_batches([b for _, b in zip(range(10), resumed, strict=False)], full[50:])
        opened_by[shards] = sum(opened.values())
    # Counts: at most the 5 buffered samples' shards, then the 30 samples read on (6 per shard). Without: the 150
    # consumed ones again, too.
    assert opened_by[synth_shards] <= 5 + 30 // 6 + 1 < 150 // 6 <= max(opened_by.values())


@pytest.mark.parametrize("shuffle_buffer", [0, 4])
def test_a_resume_past_a_corrupt_shard_continues_exactly(synth_shards, tmp_path, shuffle_buffer):
    """A cut shard yields its good samples and one placeholder, not its index count: the resume cannot step over it
    by counts (it landed elsewhere, replaying samples), so it reads and drops."""
    shards = tmp_path / "cut"
    shutil.copytree(synth_shards, shards)
    first = shard_paths(shards)[np.random.default_rng([0, 0]).permutation(8)[0]]  # epoch 0's first shard
    data = open(first, "rb").read()
    open(first, "wb").write(data[: len(data) // 2])
    kw = {"batch_size": 2, "shuffle_buffer": shuffle_buffer, "on_error": "skip"}
    full = list(ShardStream(shards, **kw))
    assert full[-1]["__bad_shards__"] == 1
    for stop in range(1, len(full)):
        state = StreamState()
        for batch in full[:stop]:
            state.update(batch)
        assert [b["key"] for b in ShardStream(shards, resume=state.state_dict(), **kw)] == [
            b["key"] for b in full[stop:]
        ]


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 1), (2, 2), (3, 4)])
def test_a_resampled_stream_reads_every_shard_once_per_sweep(synth_shards, world_size, num_workers):
    """Step-based training sweeps its data: drawing shards with replacement (as before) left about a third of them
    unread in a run as long as one sweep (the Depth Anything V1 student's one pass over its unlabeled images)."""
    from depthkit.data.stream import shard_paths

    num_shards, total = len(shard_paths(synth_shards)), world_size * num_workers
    orders = []
    for rank in range(world_size):
        stream = ShardStream(synth_shards, resampled=True, seed=5, rank=rank, world_size=world_size)
        orders += [
            list(itertools.islice(stream._shard_order(rank * num_workers + w, total), 24)) for w in range(num_workers)
        ]
    dealt = [orders[position % total][position // total] for position in range(24 * total)]  # round-robin order
    sweeps = [dealt[i : i + num_shards] for i in range(0, len(dealt) - num_shards + 1, num_shards)]
    assert len(sweeps) >= 3 and all(sorted(sweep) == list(range(num_shards)) for sweep in sweeps)
    assert len({tuple(sweep) for sweep in sweeps}) == len(sweeps)  # each sweep in a new order

    # Through the loader: 2 ranks x 2 workers, 2 batches of 6 (2 whole shards) each: one sweep, every sample once.
    seen = Counter()
    for rank in range(2):
        stream = ShardStream(synth_shards, batch_size=6, resampled=True, rank=rank, world_size=2)
        seen.update(k for _, b in zip(range(4), make_loader(stream, num_workers=2), strict=False) for k in b["key"])
    assert len(seen) == 48 and set(seen.values()) == {1}


def test_each_pass_of_a_resampled_stream_draws_anew(synth_shards):
    stream = ShardStream(synth_shards, batch_size=4, resampled=True)
    passes = [[k for _, b in zip(range(6), stream, strict=False) for k in b["key"]] for _ in range(2)]
    assert passes[0] != passes[1]


def test_shards_named_one_by_one_in_a_killed_writers_folder_are_refused(synth_shards, tmp_path):
    shards = tmp_path / "killed"
    shutil.copytree(synth_shards, shards)
    (shards / "index.json").unlink()
    (shards / ".depthkit-writing").touch()
    for spec in (str(shards / "*.tar"), str(shards / "synth-{000000..000001}.tar"), [str(shards / "synth-000000.tar")]):
        with pytest.raises(ValueError, match="holds the mark of a writer"):
            shard_paths(spec)
