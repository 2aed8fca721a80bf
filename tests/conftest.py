from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels run through the interpreter. Triton fixes a kernel's mode when the kernel module is
# imported, so this must happen before any test module imports depthkit_kernels (directly or via depthkit.losses).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The repository's `kernels/` folder is installed as `depthkit_kernels`. Under its folder name it would shadow PyPI's
# `kernels`, which transformers imports, and `python -m pytest` puts the working directory (the repository) on
# sys.path: take the repository off it. depthkit and depthkit_kernels come from the install.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != REPO_ROOT]


def _check_installed_from_this_checkout() -> None:
    """The tests import the installed depthkit: from a second checkout (a clone, a git worktree) run with another
    checkout's venv they would test that checkout's code, and pass or fail for the wrong reasons."""
    import depthkit
    import depthkit_kernels

    for module, folder in ((depthkit, REPO_ROOT / "depthkit"), (depthkit_kernels, REPO_ROOT / "kernels")):
        if Path(module.__file__).resolve().parent != folder:
            raise pytest.UsageError(
                f"{module.__name__} is imported from {Path(module.__file__).parent}, not from this checkout "
                f"({REPO_ROOT}): install it here (`make install`, or `pip install -e .` in this venv)"
            )


_check_installed_from_this_checkout()

# Tests never reach a model hub: transformers (a dev dependency, for the layout round trips) stays offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CAN_RUN_TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")

# Per-dtype tolerances (Liger style). Both paths compute in fp32; bf16 differs by the final rounding of the
# gradients to bf16. `atol` is relative to the largest reference magnitude of the compared tensor.
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
    torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2},
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *, what: str = "", max_mismatches: int = 0
) -> None:
    """`torch.testing.assert_close` with the dtype's tolerances, atol scaled by the reference's magnitude.

    `max_mismatches` lets that many elements differ: at full size a few pixels sit exactly on a decision
    boundary (sign of a ~0 residual, a loss tied with the trim threshold) that fp32 summation order can flip.
    """
    tol = TOLERANCES[dtype]
    actual, expected = actual.detach().float(), expected.detach().float()
    scale = max(expected.abs().max().item(), 1e-30) if expected.numel() else 1.0
    atol = tol["atol"] * scale
    if max_mismatches:
        bad = ~torch.isclose(actual, expected, atol=atol, rtol=tol["rtol"])
        if int(bad.sum()) <= max_mismatches:
            return
    torch.testing.assert_close(actual, expected, atol=atol, rtol=tol["rtol"], msg=lambda m: f"{what}: {m}")


@pytest.fixture
def close():
    return assert_close


@pytest.fixture
def device() -> str:
    """Where the tests put their tensors: CUDA when available, else CPU."""
    return DEVICE


@pytest.fixture
def triton_device() -> str:
    """Like `device`, but skips the test when the Triton kernels cannot run (no CUDA, interpreter off)."""
    if not CAN_RUN_TRITON:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    return DEVICE


SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_configure(config):
    # Tiny models on a shared 2-core machine: one intra-op thread is about 10x faster than oversubscription.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip without CUDA; `slow` tests run only when asked for (`-m slow`), as pyproject.toml says."""
    run_slow = "slow" in (config.getoption("-m") or "")
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_slow = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample data beside the checkout (../shared/data); see its README."""
    if not (SHARED_DATA / "rgbd" / "manifest.csv").is_file():
        pytest.fail(f"real sample data not found at {SHARED_DATA}; the checkout expects ../shared/data beside it")
    return SHARED_DATA
