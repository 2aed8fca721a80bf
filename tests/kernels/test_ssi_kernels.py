"""Fused SSI kernels (least squares and median/MAD) vs their plain-torch references: outputs and gradients.

Without CUDA the kernels run in the Triton interpreter (see conftest.py), so shapes are small and odd.
"""

from __future__ import annotations

import pytest
import torch

from depthkit_kernels import ssi_lsq, ssi_median

SHAPES = [(1, 7, 9), (3, 16, 13), (2, 33, 17)]
DTYPES = [torch.float32, torch.bfloat16]
OPS = {"lsq": ssi_lsq, "median": ssi_median}


def make_maps(shape, dtype, device, *, seed=0, ties=False):
    """Correlated prediction/target disparity-like maps with a random mask and garbage (inf/NaN) where invalid.

    With B >= 3, image 1 has no valid pixel and image 2 exactly one.
    """
    g = torch.Generator().manual_seed(seed)
    if ties:
        pred_BHW = torch.randint(-3, 4, shape, generator=g).float()
        target_BHW = torch.randint(0, 5, shape, generator=g).float()
    else:
        pred_BHW = torch.randn(shape, generator=g)
        target_BHW = 0.7 * pred_BHW + torch.rand(shape, generator=g) + 0.5
    valid_BHW = torch.rand(shape, generator=g) > 0.25
    if shape[0] >= 3:
        valid_BHW[1] = False
        valid_BHW[2] = False
        valid_BHW[2, shape[1] // 2, shape[2] // 2] = True
    target_BHW[~valid_BHW] = float("inf")
    target_BHW[0, 0, :2] = float("nan")
    valid_BHW[0, 0, :2] = False
    return pred_BHW.to(device, dtype), target_BHW.to(device, dtype), valid_BHW.to(device)


def run(op, pred_BHW, target_BHW, valid_BHW, *, impl, seed=1, **kwargs):
    """Forward with `impl`, backward of a random combination of every differentiable output."""
    pred_BHW = pred_BHW.detach().clone().requires_grad_()
    outputs = op(pred_BHW, target_BHW, valid_BHW, impl=impl, **kwargs)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g).to(o.device) for o in outputs]
    total = sum((o * w).sum() for o, w in zip(outputs, weights, strict=True) if o.requires_grad)
    total.backward()
    return outputs, pred_BHW.grad


def check_parity(close, op, maps, dtype, max_mismatches=0, **kwargs):
    out_t, grad_t = run(op, *maps, impl="triton", **kwargs)
    out_r, grad_r = run(op, *maps, impl="torch", **kwargs)
    for name, a, b in zip(out_r._fields, out_t, out_r, strict=True):
        assert a.requires_grad == b.requires_grad, name
        if b.dtype.is_floating_point:
            assert torch.isfinite(a).all(), name
            close(a, b, b.dtype, what=name)  # fp32 outputs (computed in fp32 either way): fp32 tolerance
        else:
            assert torch.equal(a.long(), b.long()), name
    assert grad_t.dtype == dtype and grad_t.shape == maps[0].shape
    assert torch.isfinite(grad_t.float()).all()
    close(grad_t, grad_r, dtype, what="grad pred", max_mismatches=max_mismatches)


@pytest.mark.parametrize("alignment", ["lsq", "median"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_parity_shapes_dtypes(close, triton_device, alignment, dtype, shape):
    check_parity(close, OPS[alignment], make_maps(shape, dtype, triton_device), dtype)


@pytest.mark.parametrize("alignment", ["lsq", "median"])
@pytest.mark.parametrize("metric", ["mse", "l1"])
@pytest.mark.parametrize("trim", [0.0, 0.2])
def test_parity_metric_trim(close, triton_device, alignment, metric, trim):
    maps = make_maps((3, 16, 13), torch.float32, triton_device, seed=2)
    check_parity(close, OPS[alignment], maps, torch.float32, metric=metric, trim=trim)


@pytest.mark.parametrize("alignment", ["lsq", "median"])
def test_parity_with_ties(close, triton_device, alignment):
    """Integer maps: many pixels tie at the median and at the trim threshold."""
    maps = make_maps((2, 13, 11), torch.float32, triton_device, seed=3, ties=True)
    check_parity(close, OPS[alignment], maps, torch.float32, trim=0.3)


@pytest.mark.parametrize("alignment", ["lsq", "median"])
def test_parity_several_chunks(close, triton_device, alignment):
    """More pixels than one block of the loss kernels (2048) and of the radix select (4096)."""
    maps = make_maps((2, 67, 65), torch.float32, triton_device, seed=4)
    check_parity(close, OPS[alignment], maps, torch.float32, trim=0.1)


@pytest.mark.parametrize(("alignment", "used"), [("lsq", 0), ("lsq", 1), ("lsq", 2), ("median", 0), ("median", 1)])
def test_gradient_of_one_output_alone(close, triton_device, alignment, used):
    """Backward from a single output: the others' upstream gradients are None (absent in the kernel), and the
    `.sum()` of the loss sends one value expanded over the batch (stride 0), which the kernel reads as it is."""
    maps = make_maps((3, 11, 10), torch.float32, triton_device, seed=9)
    op = OPS[alignment]
    grads = []
    for impl in ("triton", "torch"):
        pred_BHW = maps[0].detach().clone().requires_grad_()
        op(pred_BHW, *maps[1:], trim=0.1, impl=impl)[used].sum().backward()
        grads.append(pred_BHW.grad)
    assert grads[0].abs().sum() > 0
    close(grads[0], grads[1], torch.float32, what=f"grad of output {used} alone")


@pytest.mark.parametrize("alignment", ["lsq", "median"])
def test_constant_prediction_is_finite(close, triton_device, alignment):
    pred_BHW, target_BHW, valid_BHW = make_maps((3, 7, 9), torch.float32, triton_device, seed=5)
    pred_BHW = torch.full_like(pred_BHW, 0.37)
    check_parity(close, OPS[alignment], (pred_BHW, target_BHW, valid_BHW), torch.float32)
    out, grad = run(OPS[alignment], pred_BHW, target_BHW, valid_BHW, impl="triton")
    assert all(torch.isfinite(o.float()).all() for o in out)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("alignment", ["lsq", "median"])
def test_non_contiguous_inputs(close, triton_device, alignment):
    pred_BWH, target_BWH, valid_BWH = make_maps((2, 9, 7), torch.float32, triton_device, seed=6)
    maps_t = (pred_BWH.transpose(1, 2), target_BWH.transpose(1, 2), valid_BWH.transpose(1, 2))
    assert not maps_t[0].is_contiguous()
    out_t, grad_t = run(OPS[alignment], *maps_t, impl="triton")
    out_c, grad_c = run(OPS[alignment], *(m.contiguous() for m in maps_t), impl="triton")
    close(out_t[0], out_c[0], torch.float32, what="loss")
    close(grad_t, grad_c, torch.float32, what="grad")


def test_lsq_recovers_affine_map(triton_device):
    g = torch.Generator().manual_seed(7)
    pred_BHW = torch.randn((2, 16, 13), generator=g).to(triton_device)
    target_BHW = 2.5 * pred_BHW - 0.75
    valid_BHW = torch.ones_like(pred_BHW, dtype=torch.bool)
    out = ssi_lsq(pred_BHW, target_BHW, valid_BHW, impl="triton")
    torch.testing.assert_close(out.scale_B, torch.full_like(out.scale_B, 2.5))
    torch.testing.assert_close(out.shift_B, torch.full_like(out.shift_B, -0.75))
    assert out.loss_B.abs().max() < 1e-10


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_lsq_is_shift_invariant_for_a_large_offset(triton_device, impl):
    """A prediction of spread 1 around 1e4 is no constant (the singularity test once said so from ~1100 on)."""
    pred_BHW, target_BHW, valid_BHW = make_maps((2, 16, 13), torch.float32, triton_device, seed=8)

    def loss_and_grad(offset: float):
        pred = (pred_BHW + offset).requires_grad_()
        out = ssi_lsq(pred, target_BHW, valid_BHW, impl=impl)
        out.loss_B.sum().backward()
        return out, pred.grad

    (near, grad_near), (far, grad_far) = loss_and_grad(0.0), loss_and_grad(1e4)
    assert (far.scale_B != 0).all()
    torch.testing.assert_close(far.loss_B, near.loss_B, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(grad_far, grad_near, rtol=1e-2, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("alignment", ["lsq", "median"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trim", [0.0, 0.1])
def test_parity_full_size_cuda(close, alignment, dtype, trim):
    maps = make_maps((8, 518, 518), dtype, "cuda", seed=8)
    check_parity(close, OPS[alignment], maps, dtype, trim=trim, max_mismatches=64)
