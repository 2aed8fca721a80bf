from __future__ import annotations

import numpy as np
import pytest
import torch

from depthkit.data.convert import write_synthetic
from depthkit.data.shards import ShardWriter, encode_image, encode_sample


@pytest.fixture(scope="session")
def unlabeled(tmp_path_factory):
    """6 unlabeled shards x 2 synthetic scenes (42 x 56 px), with the data layer's index.json."""
    out = tmp_path_factory.mktemp("unlabeled")
    write_synthetic(out, num=12, size=(42, 56), seed=5, labeled=False, shard_size=2)
    return out


@pytest.fixture(scope="session")
def mixed(tmp_path_factory):
    """2 shards of images of mixed sizes (several network sizes per shard) and one undecodable image."""
    out = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    sizes = [(30, 40), (40, 30), (30, 41), (56, 28), (30, 40), (33, 47), (40, 30), (30, 40)]
    with ShardWriter(out, prefix="mixed", shard_size=4) as writer:
        for i, (h, w) in enumerate(sizes):
            meta = {"kind": "unlabeled", "source": "test", "licence": "cc0"}
            sample = {"__key__": f"img{i:02d}", "meta": meta, "image": rng.integers(0, 256, (h, w, 3), np.uint8)}
            if i == 5:
                sample["image_bytes"] = ("jpg", b"not a jpeg at all")
            else:
                sample["image_bytes"] = ("png", encode_image(sample["image"]))
            writer.write(encode_sample(sample))
    return out


def _save_teacher(path, seed: int, name: str = "test_dav2"):
    from depthkit.models import create_model, save_checkpoint

    torch.manual_seed(seed)
    model = create_model(name)
    with torch.no_grad():  # random heads often end below the ReLU: lift the output so labels are not all zero
        model.head.scratch.output_conv2[2].bias.fill_(1.0)
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory):
    return _save_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pth", seed=0)


@pytest.fixture(scope="session")
def other_teacher_ckpt(tmp_path_factory):
    return _save_teacher(tmp_path_factory.mktemp("teacher") / "other.pth", seed=1)


@pytest.fixture(scope="session")
def v1_ckpt(tmp_path_factory):
    return _save_teacher(tmp_path_factory.mktemp("teacher") / "v1.pth", seed=0, name="test_dav1")
