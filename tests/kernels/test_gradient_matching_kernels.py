"""Fused multi-scale gradient matching vs its plain-torch reference: outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from depthkit_kernels import gradient_matching

DTYPES = [torch.float32, torch.bfloat16]


def make_maps(shape, dtype, device, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred_BHW = torch.randn(shape, generator=g)
    target_BHW = 0.5 * pred_BHW + torch.rand(shape, generator=g)
    valid_BHW = torch.rand(shape, generator=g) > 0.2
    if shape[0] >= 3:
        valid_BHW[1] = False
    target_BHW[~valid_BHW] = float("inf")
    return pred_BHW.to(device, dtype), target_BHW.to(device, dtype), valid_BHW.to(device)


def run(maps, *, impl, scales, num_scales, seed=1):
    pred_BHW = maps[0].detach().clone().requires_grad_()
    pred_scale_B = target_scale_B = None
    if scales:
        g = torch.Generator().manual_seed(seed)
        num_images = pred_BHW.shape[0]
        pred_scale_B = (torch.rand(num_images, generator=g) + 0.5).to(pred_BHW.device).requires_grad_()
        target_scale_B = (torch.rand(num_images, generator=g) + 0.5).to(pred_BHW.device)
    out = gradient_matching(
        pred_BHW, *maps[1:], num_scales=num_scales, pred_scale_B=pred_scale_B, target_scale_B=target_scale_B, impl=impl
    )
    weight_B = torch.randn(out.loss_B.shape, generator=torch.Generator().manual_seed(seed + 1)).to(pred_BHW.device)
    (out.loss_B * weight_B).sum().backward()
    return out, pred_BHW.grad, None if pred_scale_B is None else pred_scale_B.grad


def check_parity(close, maps, dtype, *, scales=False, num_scales=4, max_mismatches=0):
    out_t, grad_t, grad_scale_t = run(maps, impl="triton", scales=scales, num_scales=num_scales)
    out_r, grad_r, grad_scale_r = run(maps, impl="torch", scales=scales, num_scales=num_scales)
    close(out_t.loss_B, out_r.loss_B, out_r.loss_B.dtype, what="loss")  # fp32 either way: fp32 tolerance
    assert torch.equal(out_t.num_valid_B.long(), out_r.num_valid_B.long())
    assert grad_t.dtype == dtype
    close(grad_t, grad_r, dtype, what="grad pred", max_mismatches=max_mismatches)
    if scales:
        close(grad_scale_t, grad_scale_r, dtype, what="grad pred_scale")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7, 9), (3, 16, 13), (2, 33, 17)])
def test_parity_shapes_dtypes(close, triton_device, dtype, shape):
    check_parity(close, make_maps(shape, dtype, triton_device), dtype, scales=shape[0] > 1)


@pytest.mark.parametrize("num_scales", [1, 5])
def test_parity_num_scales(close, triton_device, num_scales):
    check_parity(
        close, make_maps((2, 16, 13), torch.float32, triton_device, seed=2), torch.float32, num_scales=num_scales
    )


def test_parity_tiny_and_large_maps(close, triton_device):
    """Scales coarser than the map (3 x 2), and maps of several 32 x 32 tiles down and across."""
    check_parity(close, make_maps((2, 3, 2), torch.float32, triton_device, seed=3), torch.float32, scales=True)
    check_parity(close, make_maps((1, 50, 45), torch.float32, triton_device, seed=4), torch.float32, scales=True)
    check_parity(close, make_maps((2, 33, 97), torch.float32, triton_device, seed=6), torch.float32, scales=True)


def test_parity_scales_coarser_than_a_tile(close, triton_device):
    """8 scales: strides 64 and 128 exceed the 32 x 32 tile, so only some tiles' origins are on their grids."""
    maps = make_maps((1, 70, 140), torch.float32, triton_device, seed=7)
    check_parity(close, maps, torch.float32, scales=True, num_scales=8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_full_size_cuda(close, dtype):
    check_parity(close, make_maps((8, 518, 518), dtype, "cuda", seed=5), dtype, scales=True, max_mismatches=64)


def test_gradient_of_a_plain_sum(close, triton_device):
    """`loss_B.sum()` sends one value expanded over the batch (stride 0): the kernel reads it as it is."""
    maps = make_maps((3, 12, 11), torch.float32, triton_device, seed=5)
    grads = []
    for impl in ("triton", "torch"):
        pred_BHW = maps[0].detach().clone().requires_grad_()
        gradient_matching(pred_BHW, *maps[1:], impl=impl).loss_B.sum().backward()
        grads.append(pred_BHW.grad)
    assert grads[0].abs().sum() > 0
    close(grads[0], grads[1], torch.float32, what="grad pred")
