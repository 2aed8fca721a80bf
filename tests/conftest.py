from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels run through the interpreter. Triton fixes a kernel's mode when the kernel module is
# imported, so this must happen before any test module imports depthkit_kernels (directly or via depthkit.losses).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_configure(config):
    # Tiny models on a shared 2-core machine: one intra-op thread is about 10x faster than oversubscription.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
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
