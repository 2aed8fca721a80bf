from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample data beside the checkout (../shared/data); see its README."""
    if not (SHARED_DATA / "rgbd" / "manifest.csv").is_file():
        pytest.fail(f"real sample data not found at {SHARED_DATA}; the checkout expects ../shared/data beside it")
    return SHARED_DATA
