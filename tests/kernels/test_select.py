"""The select (exact k-th smallest per image) vs sorting, on both of its paths: from the sampled candidates,
and over the whole row when the sample misleads or the candidates overflow."""

from __future__ import annotations

import pytest
import torch

from depthkit_kernels import masked_median, reference
from depthkit_kernels._common import valid_bytes
from depthkit_kernels.select import (
    MODE_KEEP,
    MODE_MEDIAN,
    PATH_CANDIDATES,
    PATH_EMPTY,
    PATH_HI,
    PATH_LO,
    PATH_WHOLE_ROW,
    ROW_PATH,
    radix_select,
    sample_size,
    select_with_state,
)


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


def _select_rows(x_BHW, valid_BHW, *, mode=MODE_MEDIAN, trim=0.0):
    """The select's values and, per row, the path that found it (`PATH_*`)."""
    b = x_BHW.shape[0]
    values_B, counts_B, state = select_with_state([x_BHW.reshape(b, -1)], valid_bytes(valid_BHW), mode=mode, trim=trim)
    assert torch.equal(counts_B.long(), valid_BHW.sum(dim=(1, 2)))
    return values_B, state[:, ROW_PATH].cpu().tolist()


def test_rows_come_from_the_candidates_when_the_sample_is_fair(triton_device):
    """The fast path is taken (else the select is as slow as before), and exact."""
    g = torch.Generator().manual_seed(5)
    x_BHW = torch.randn((3, 40, 50), generator=g).to(triton_device)
    valid_BHW = (torch.rand((3, 40, 50), generator=g) > 0.1).to(triton_device)
    num_valid_B = valid_BHW.sum(dim=(1, 2))
    for mode, trim, rank_B in ((MODE_MEDIAN, 0.0, (num_valid_B - 1) // 2), (MODE_KEEP, 0.1, None)):
        rank_B = reference.num_kept(num_valid_B, trim) - 1 if rank_B is None else rank_B
        values_B, paths = _select_rows(x_BHW, valid_BHW, mode=mode, trim=trim)
        assert paths == [PATH_CANDIDATES] * 3
        torch.testing.assert_close(values_B, reference.masked_kth_smallest(x_BHW, valid_BHW, rank_B), atol=0, rtol=0)


def _sampled(hw: int) -> torch.Tensor:
    """The pixels the select samples in a row of `hw` (more than it samples), compiled or interpreted."""
    return (torch.arange(sample_size()) * hw) // sample_size()


def test_a_misleading_sample_falls_back_to_the_whole_row(triton_device):
    """The evenly spaced sample sees only huge values: rank k lies below lo, and the row is read whole. With the
    value order reversed it lies above hi. A sample that sees only a tie (lo = hi) holding under half the row:
    above it. An empty row takes no pass."""
    x_BHW = torch.randn((4, 80, 80), generator=torch.Generator().manual_seed(6))
    flat = x_BHW.view(4, -1)
    spaced = _sampled(flat.shape[1])
    flat[0, spaced] = 1e6
    flat[1, spaced] = -1e6
    flat[2] = flat[2].abs() + 1.0
    flat[2, spaced] = 0.0
    unsampled = torch.ones(flat.shape[1], dtype=torch.bool)
    unsampled[spaced] = False
    flat[2, unsampled.nonzero().flatten()[:800]] = 0.0
    valid_BHW = torch.ones_like(x_BHW, dtype=torch.bool)
    valid_BHW[3] = False
    x_BHW, valid_BHW = x_BHW.to(triton_device), valid_BHW.to(triton_device)
    values_B, paths = _select_rows(x_BHW, valid_BHW)
    assert 800 < (flat[2] == 0).sum() < flat.shape[1] // 2
    assert paths == [PATH_WHOLE_ROW, PATH_WHOLE_ROW, PATH_WHOLE_ROW, PATH_EMPTY]
    torch.testing.assert_close(values_B, reference.masked_lower_median(x_BHW, valid_BHW), atol=0, rtol=0)


def test_candidates_that_overflow_fall_back_to_the_whole_row(triton_device):
    """More candidates than the buffer's quarter of the row holds: distinct values, and the sample sees 2 valid
    pixels only, so lo and hi are the extreme keys. The smallest values come last, so a select over the
    candidates that fit would miss them."""
    x_BHW = torch.linspace(2.0, 1.0, 10000).view(1, 100, 100)
    valid_BHW = torch.ones_like(x_BHW, dtype=torch.bool)
    valid_BHW.view(-1)[_sampled(10000)[2:]] = False
    x_BHW, valid_BHW = x_BHW.to(triton_device), valid_BHW.to(triton_device)
    values_B, paths = _select_rows(x_BHW, valid_BHW)
    assert paths == [PATH_WHOLE_ROW]
    torch.testing.assert_close(values_B, reference.masked_lower_median(x_BHW, valid_BHW), atol=0, rtol=0)


def test_ties_at_a_bound_are_counted_not_selected(triton_device):
    """Rows of 6400 pixels (a buffer of 4096) with a large tie: sky at disparity 0 holding the median (the bound
    lo is the answer), depth clamped at its maximum holding it (hi is), and a tie at 0 just below the median (the
    candidates, without the tie, fit the buffer)."""
    g = torch.Generator().manual_seed(7)
    x_BHW = torch.rand((3, 80, 80), generator=g) + 1.0
    x_BHW[0].view(-1)[torch.randperm(6400, generator=g)[:3840]] = 0.0  # 60% sky
    x_BHW[1].view(-1)[torch.randperm(6400, generator=g)[:3328]] = 80.0  # 52% at the maximum
    x_BHW[2].view(-1)[torch.randperm(6400, generator=g)[:2880]] = 0.0  # 45% sky
    x_BHW = x_BHW.to(triton_device)
    valid_BHW = torch.ones_like(x_BHW, dtype=torch.bool)
    values_B, paths = _select_rows(x_BHW, valid_BHW)
    assert paths == [PATH_LO, PATH_HI, PATH_CANDIDATES]
    torch.testing.assert_close(values_B, reference.masked_lower_median(x_BHW, valid_BHW), atol=0, rtol=0)


@pytest.mark.gpu
def test_median_full_size_cuda():
    x_BHW, valid_BHW = make_values((32, 518, 518), "cuda", seed=3)
    expected_B = reference.masked_lower_median(x_BHW, valid_BHW)
    torch.testing.assert_close(masked_median(x_BHW, valid_BHW, impl="triton"), expected_B, atol=0, rtol=0)
    _, paths = _select_rows(x_BHW, valid_BHW)
    whole = [row for row, path in enumerate(paths) if path == PATH_WHOLE_ROW]
    assert not whole, f"rows read whole: {whole}"  # the 2048-pixel sample should never mislead here
