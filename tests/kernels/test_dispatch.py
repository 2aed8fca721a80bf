"""The dispatch rule shared by every op: impl="auto" | "triton" | "torch"."""

from __future__ import annotations

import functools

import pytest
import torch

import depthkit_kernels as dk
from depthkit_kernels import _common


def _maps():
    pred_BHW = torch.randn(2, 5, 7)
    return pred_BHW, pred_BHW + 1.0, torch.ones(2, 5, 7, dtype=torch.bool)


CALLS = {
    "ssi_lsq": lambda impl: dk.ssi_lsq(*_maps(), impl=impl),
    "ssi_median": lambda impl: dk.ssi_median(*_maps(), impl=impl),
    "gradient_matching": lambda impl: dk.gradient_matching(*_maps(), impl=impl),
    "feature_alignment": lambda impl: dk.feature_alignment(torch.randn(2, 3, 4), torch.randn(2, 3, 4), impl=impl),
    "masked_median": lambda impl: dk.masked_median(_maps()[0], _maps()[2], impl=impl),
}


@pytest.mark.parametrize("op", CALLS)
def test_triton_on_cpu_without_interpreter_raises(monkeypatch, op):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        CALLS[op]("triton")


@pytest.mark.parametrize("op", CALLS)
def test_unknown_impl_raises(op):
    with pytest.raises(ValueError, match="impl"):
        CALLS[op]("cuda")


@pytest.mark.parametrize("op", CALLS)
def test_auto_on_cpu_uses_the_reference(monkeypatch, op):
    """Even with the interpreter on, "auto" never picks Triton for CPU tensors."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def fail(*args, **kwargs):
        raise AssertionError("auto picked Triton on CPU")

    for fn in (dk.SSILsqFunction, dk.SSIMedianFunction, dk.GradientMatchingFunction, dk.FeatureAlignmentFunction):
        monkeypatch.setattr(fn, "apply", fail)
    monkeypatch.setattr("depthkit_kernels.radix_select", fail)
    CALLS[op]("auto")


def test_use_triton_rules(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _common.use_triton("op", "torch", x)
    assert not _common.use_triton("op", "auto", x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _common.use_triton("op", "triton", x)
    assert not _common.use_triton("op", "auto", x)


def test_kernels_follow_the_environment_at_call_time(monkeypatch):
    """A kernel imported in one mode is re-wrapped for the mode TRITON_INTERPRET asks for when it is launched."""
    from triton.runtime.interpreter import InterpretedFunction

    from depthkit_kernels.ssi import _lsq_stats_kernel

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(_common.resolve(_lsq_stats_kernel), InterpretedFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not isinstance(_common.resolve(_lsq_stats_kernel), InterpretedFunction)


def test_kernels_resolve_for_compiling_with_their_helpers(monkeypatch):
    """Imported interpreted (CPU test runs), each kernel still resolves for compiling with the `jit_helper`s it calls:
    the cache key walks them, and a `@triton.jit` helper interpreted since import fails it ("Unsupported function
    referenced")."""
    import importlib

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    modules = [
        importlib.import_module(f"depthkit_kernels.{m}") for m in ("ssi", "gradient_matching", "feature_alignment")
    ]
    kernels = [k for m in modules for name, k in vars(m).items() if name.endswith("_kernel")]
    assert len(kernels) == 12
    for kernel in kernels:
        assert _common.resolve(kernel).cache_key


@pytest.mark.parametrize(
    "bad",
    [
        lambda p, t, v: (p[0], t[0], v[0]),  # not B x H x W
        lambda p, t, v: (p, t[:, :-1], v),  # shape mismatch
        lambda p, t, v: (p, t, v.float()),  # float mask
        lambda p, t, v: (p.double(), t, v),  # float64
    ],
)
def test_bad_inputs_raise(bad):
    with pytest.raises(ValueError):
        dk.ssi_lsq(*bad(*_maps()), impl="torch")


def test_bad_options_raise():
    with pytest.raises(ValueError, match="metric"):
        dk.ssi_lsq(*_maps(), metric="huber")
    with pytest.raises(ValueError, match="trim"):
        dk.ssi_median(*_maps(), trim=1.0)
    with pytest.raises(ValueError, match="num_scales"):
        dk.gradient_matching(*_maps(), num_scales=0)


DIFFERENTIABLE = {  # (pred, target, valid, impl) -> loss_B
    "ssi_lsq": lambda p, t, v, impl: dk.ssi_lsq(p, t, v, impl=impl).loss_B,
    "ssi_median": lambda p, t, v, impl: dk.ssi_median(p, t, v, metric="mse", impl=impl).loss_B,
    "gradient_matching": lambda p, t, v, impl: dk.gradient_matching(p, t, v, impl=impl).loss_B,
    "feature_alignment": lambda p, t, v, impl: dk.feature_alignment(p, t, impl=impl).loss_B,
}


@pytest.mark.parametrize("op", DIFFERENTIABLE)
def test_a_second_derivative_is_refused_not_dropped(monkeypatch, op):
    """The kernels' gradient has no graph: a gradient penalty through it would silently count for nothing."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pred, target, valid = _maps()
    pred = (pred + 0.3 * torch.randn_like(pred)).requires_grad_(True)
    loss = functools.partial(DIFFERENTIABLE[op], pred, target, valid)
    (grad,) = torch.autograd.grad(loss("torch").sum(), pred, create_graph=True)
    assert grad.requires_grad  # the reference's gradient is differentiable
    (first,) = torch.autograd.grad(loss("triton").sum(), pred)  # first order: fine
    torch.testing.assert_close(first, grad.detach(), rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="first order only; use impl='torch'"):
        torch.autograd.grad(loss("triton").sum(), pred, create_graph=True)


@pytest.mark.parametrize("op", DIFFERENTIABLE)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_target_that_requires_grad_is_a_label_in_either_impl(monkeypatch, op, impl):
    """Targets get no gradient: a loss of a target alone has no graph (the Triton path once had one, to nowhere)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pred, target, valid = _maps()
    target.requires_grad_(True)
    assert not DIFFERENTIABLE[op](pred, target, valid, impl).requires_grad
    pred.requires_grad_(True)
    DIFFERENTIABLE[op](pred, target, valid, impl).sum().backward()
    assert target.grad is None and pred.grad is not None


@pytest.mark.parametrize("trim", [1.0, 1 - 1e-9, -0.1, float("nan")])
def test_a_trim_that_keeps_nothing_in_fp32_is_refused(trim):
    for op in (dk.ssi_lsq, dk.ssi_median):
        with pytest.raises(ValueError, match="must be in \\[0, 1\\) \\(also in fp32\\)"):
            op(*_maps(), trim=trim)


def test_the_trimmed_count_keeps_at_least_one_pixel():
    from depthkit_kernels.reference import num_kept

    assert num_kept(torch.tensor([0, 1, 2, 10, 1000]), 0.999).tolist() == [0, 1, 1, 1, 1]


@pytest.mark.parametrize("eps", [0.0, float("nan"), float("inf")])
def test_a_median_eps_that_would_void_the_loss_is_refused(eps):
    with pytest.raises(ValueError, match="eps=.* must be > 0 and finite"):
        dk.ssi_median(*_maps(), eps=eps)
