"""Shared constants and the tiny test model of the export tests (imported by name: pytest puts this folder on
sys.path)."""

from __future__ import annotations

import torch

from depthkit.models import create_model

EXPORT_SIZE = (56, 84)  # 4 x 6 patches: not the 5 x 5 position grid of the tiny encoder
VERIFY_SIZES = [(42, 112), (70, 70), (98, 56), (45, 61)]  # landscape, the native grid, portrait, not multiples


def tiny_model(name: str = "test_dav2"):
    """A seeded tiny model whose output varies over the image (random heads output almost all ReLU-zero)."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    if name == "test_dav2":
        with torch.no_grad():
            last_conv = model.head.scratch.output_conv2[2]
            last_conv.weight.mul_(-30.0)  # output in about [0.7, 2.1], no zeros, on photos and on noise
            last_conv.bias.fill_(0.5)
    return model
