from __future__ import annotations

import pytest

from depthkit.data.convert import write_synthetic


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory):
    """8 shards x 6 labeled synthetic scenes (48 x 64 px)."""
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, num=48, size=(48, 64), seed=3, shard_size=6)
    return out


@pytest.fixture(scope="session")
def rgbd_shards(shared_data, tmp_path_factory):
    from depthkit.data.convert import convert_manifest

    out = tmp_path_factory.mktemp("rgbd")
    convert_manifest(shared_data / "rgbd" / "manifest.csv", out, shard_size=10)
    return out
