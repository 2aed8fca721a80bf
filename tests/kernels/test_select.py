"""Radix select (exact k-th smallest per image) vs sorting."""

from __future__ import annotations

import pytest
import torch

from depthkit_kernels import masked_median, reference
from depthkit_kernels._common import valid_bytes
from depthkit_kernels.select import MODE_KEEP, radix_select


def make_values(shape, device, *, seed=0):
    """Values over many magnitudes and signs, ties, -0.0/+0.0, and rows with 0, 1 and 2 valid pixels."""
    g = torch.Generator().manual_seed(seed)
    num_images = shape[0]
    magnitude_B = 10.0 ** torch.linspace(-4, 4, num_images)
    x_BHW = torch.randn(shape, generator=g) * magnitude_B[:, None, None]
    x_BHW[:, 0, :] = torch.randint(-2, 3, (shape[0], shape[2]), generator=g).float()  # ties
    x_BHW[:, 1, ::2] = -0.0
    valid_BHW = torch.rand(shape, generator=g) > 0.3
    if num_images >= 4:
        valid_BHW[1] = False
        valid_BHW[2] = False
        valid_BHW[2, 0, 0] = True
        valid_BHW[3] = False
        valid_BHW[3, 0, :2] = True
    return x_BHW.to(device), valid_BHW.to(device)


@pytest.mark.parametrize("shape", [(4, 7, 9), (5, 16, 13), (1, 70, 61)])
def test_median_is_exact(triton_device, shape):
    x_BHW, valid_BHW = make_values(shape, triton_device)
    expected_B = reference.masked_lower_median(x_BHW, valid_BHW)
    actual_B = masked_median(x_BHW, valid_BHW, impl="triton")
    torch.testing.assert_close(actual_B, expected_B, atol=0, rtol=0)


def test_median_bf16_and_two_sources(triton_device):
    """pred and target medians come out of the same launches (2B rows)."""
    x_BHW, valid_BHW = make_values((4, 9, 11), triton_device, seed=1)
    y_BHW = (x_BHW * -3.0 + 1.0).to(torch.bfloat16)
    rows = [x_BHW.view(4, -1), y_BHW.view(4, -1)]
    values_R, counts_B = radix_select(rows, valid_bytes(valid_BHW))
    torch.testing.assert_close(values_R[:4], reference.masked_lower_median(x_BHW, valid_BHW), atol=0, rtol=0)
    torch.testing.assert_close(values_R[4:], reference.masked_lower_median(y_BHW, valid_BHW), atol=0, rtol=0)
    assert torch.equal(counts_B.long(), valid_BHW.sum(dim=(1, 2)))


@pytest.mark.parametrize("trim", [0.1, 0.25, 0.9])
def test_keep_rank_is_exact(triton_device, trim):
    x_BHW, valid_BHW = make_values((4, 13, 11), triton_device, seed=2)
    loss_BHW = x_BHW.abs()
    rank_B = reference.num_kept(valid_BHW.sum(dim=(1, 2)), trim) - 1
    expected_B = reference.masked_kth_smallest(loss_BHW, valid_BHW, rank_B)
    values_B, _ = radix_select([loss_BHW.view(4, -1)], valid_bytes(valid_BHW), mode=MODE_KEEP, trim=trim)
    torch.testing.assert_close(values_B, expected_B, atol=0, rtol=0)


def test_compiled_scan_variant(triton_device, monkeypatch):
    """The compiled kernels scan histograms with tl.cumsum; the interpreter defaults to a faster equivalent."""
    monkeypatch.setattr("depthkit_kernels.select.FORCE_CUMSUM", True)
    x_BHW, valid_BHW = make_values((4, 7, 9), triton_device, seed=4)
    expected_B = reference.masked_lower_median(x_BHW, valid_BHW)
    torch.testing.assert_close(masked_median(x_BHW, valid_BHW, impl="triton"), expected_B, atol=0, rtol=0)


@pytest.mark.gpu
def test_median_full_size_cuda():
    x_BHW, valid_BHW = make_values((32, 518, 518), "cuda", seed=3)
    expected_B = reference.masked_lower_median(x_BHW, valid_BHW)
    torch.testing.assert_close(masked_median(x_BHW, valid_BHW, impl="triton"), expected_B, atol=0, rtol=0)
