from __future__ import annotations

from pathlib import Path

import pytest
import torch
from export_helpers import EXPORT_SIZE, VERIFY_SIZES, tiny_model

from depthkit.models import save_checkpoint


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run much faster on one thread when the CPU is shared; restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="session")
def checkpoint(model, export_dir) -> Path:
    return save_checkpoint(model, export_dir / "tiny.pth", layout="official")


@pytest.fixture(scope="session")
def photos(shared_data) -> list[Path]:
    """A handful of the real sample photos: colour and greyscale, several sizes and aspect ratios."""
    from depthkit.models.predict import IMAGE_SUFFIXES

    folder = shared_data / "unlabeled"
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    assert len(found) >= 8
    return found[:: max(1, len(found) // 6)][:6]


@pytest.fixture(scope="session")
def exported(model, export_dir, photos):
    """The tiny model exported (fp32, dynamic batch/height/width) and verified at `VERIFY_SIZES`."""
    from depthkit.export import export_onnx

    torch.set_num_threads(1)
    return export_onnx(
        model,
        export_dir / "tiny.onnx",
        size_hw=EXPORT_SIZE,
        verify_sizes=VERIFY_SIZES,
        verify_images=photos[:2],
        log=None,
    )
