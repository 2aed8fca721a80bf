from __future__ import annotations

import numpy as np
import pytest

from depthkit.data.convert import write_synthetic
from depthkit.data.shards import ShardWriter, decode_sample, encode_sample, iter_tar_samples, shard_paths


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Synthetic labeled / val / unlabeled shards and pseudo-label shards (teacher stand-in: true disparity)."""
    root = tmp_path_factory.mktemp("train_data")
    write_synthetic(root / "labeled", num=64, size=(64, 80), seed=11, shard_size=8)
    write_synthetic(root / "val", num=16, size=(64, 80), seed=12, shard_size=8)
    write_synthetic(root / "unlabeled_src", num=32, size=(64, 80), seed=13, shard_size=8)
    write_synthetic(root / "unlabeled", num=32, size=(64, 80), seed=13, shard_size=8, labeled=False)
    pseudo = root / "pseudo"
    for path in shard_paths(root / "unlabeled_src"):
        name = path.rsplit("/", 1)[-1]
        with ShardWriter(pseudo, prefix=name.removesuffix(".tar"), shard_size=10**6) as writer:
            for raw in iter_tar_samples(path):
                s = decode_sample(raw)
                disparity = np.where(s["valid"], 1.0 / np.maximum(s["target"], 1e-3), np.nan).astype(np.float32)
                writer.write(
                    encode_sample(
                        {
                            "__key__": s["__key__"],
                            "target": disparity,
                            "meta": {"kind": "pseudo", "output_space": "affine_disparity"},
                        }
                    )
                )
        (pseudo / f"{name.removesuffix('.tar')}-000000.tar").rename(pseudo / name)
    return root
