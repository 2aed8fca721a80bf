"""Fused feature alignment vs its plain-torch reference: outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from depthkit_kernels import feature_alignment

DTYPES = [torch.float32, torch.bfloat16]


def make_features(shape, dtype, device, *, seed=0, tolerance=0.85):
    """Student and target tokens whose cosines spread around the tolerance, but none within 1e-3 of it: compiled
    GPU code divides and takes square roots approximately (within 2 ulp), so a cosine at the boundary may fall on
    either side of it there, a whole patch in or out of the loss (the reference is not more right)."""
    g = torch.Generator().manual_seed(seed)
    target_BND = torch.randn(shape, generator=g)
    student_BND = target_BND + 0.7 * torch.randn(shape, generator=g)
    student_BND, target_BND = student_BND.to(dtype), target_BND.to(dtype)
    cos_BN = torch.nn.functional.cosine_similarity(student_BND.double(), target_BND.double(), dim=-1)
    student_BND[(cos_BN - tolerance).abs() < 1e-3] = target_BND[(cos_BN - tolerance).abs() < 1e-3]  # cos 1: out
    return student_BND.to(device), target_BND.to(device)


def run(student_BND, target_BND, *, impl, tolerance=0.85, seed=1):
    student_BND = student_BND.detach().clone().requires_grad_()
    out = feature_alignment(student_BND, target_BND, tolerance=tolerance, impl=impl)
    weight_B = torch.randn(out.loss_B.shape, generator=torch.Generator().manual_seed(seed)).to(student_BND.device)
    (out.loss_B * weight_B).sum().backward()
    return out, student_BND.grad


def check_parity(close, features, dtype, **kwargs):
    out_t, grad_t = run(*features, impl="triton", **kwargs)
    out_r, grad_r = run(*features, impl="torch", **kwargs)
    close(out_t.loss_B, out_r.loss_B, out_r.loss_B.dtype, what="loss")  # fp32 either way: fp32 tolerance
    assert torch.equal(out_t.num_included_B.long(), out_r.num_included_B.long())
    assert grad_t.dtype == dtype
    close(grad_t, grad_r, dtype, what="grad student")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 5, 7), (3, 37, 24), (2, 19, 200)])
def test_parity_shapes_dtypes(close, triton_device, dtype, shape):
    check_parity(close, make_features(shape, dtype, triton_device), dtype)


@pytest.mark.parametrize("tolerance", [-1.0, 1.0])
def test_parity_nothing_or_everything_included(close, triton_device, tolerance):
    check_parity(
        close, make_features((2, 9, 16), torch.float32, triton_device, seed=2), torch.float32, tolerance=tolerance
    )


def test_zero_student_feature_is_finite(close, triton_device):
    student_BND, target_BND = make_features((2, 9, 16), torch.float32, triton_device, seed=3)
    student_BND[0, 0] = 0.0
    out, grad = run(student_BND, target_BND, impl="triton")
    assert torch.isfinite(out.loss_B).all() and torch.isfinite(grad).all()
    check_parity(close, (student_BND, target_BND), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_full_size_cuda(close, dtype):
    check_parity(close, make_features((32, 1369, 1024), dtype, "cuda", seed=4), dtype)


def test_gradient_of_a_plain_sum(close, triton_device):
    """`loss_B.sum()` sends one value expanded over the batch (stride 0): the kernel reads it as it is."""
    student_BND, target_BND = make_features((3, 9, 16), torch.float32, triton_device, seed=4)
    grads = []
    for impl in ("triton", "torch"):
        student = student_BND.detach().clone().requires_grad_()
        feature_alignment(student, target_BND, impl=impl).loss_B.sum().backward()
        grads.append(student.grad)
    assert grads[0].abs().sum() > 0
    close(grads[0], grads[1], torch.float32, what="grad student")


def test_a_nan_student_patch_makes_the_loss_nan(triton_device):
    """A diverged student must show in the loss: a NaN cosine is not "above the tolerance" (both impls)."""
    student_BND, target_BND = make_features((2, 6, 16), torch.float32, triton_device, seed=6)
    student_BND[1, 2, 0] = float("nan")
    for impl in ("triton", "torch"):
        out = feature_alignment(student_BND, target_BND, impl=impl)
        assert torch.isfinite(out.loss_B[0]) and torch.isnan(out.loss_B[1]), impl
