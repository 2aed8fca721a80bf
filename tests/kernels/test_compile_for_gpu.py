"""Compile every kernel variant the ops launch for an NVIDIA GPU (sm_90) ahead of time, without a GPU.

The interpreter is lenient (numpy semantics); the real compiler is not. Here each op runs in the interpreter at
a few shapes (`SHAPES`) while its launches are recorded, then every distinct (kernel, argument types, constexprs,
the launcher's specializations: an int equal to 1 as a constant, multiples of 16 and aligned pointers marked) is
compiled down to a cubin with Triton's bundled ptxas, and checked for register spills (`ptxas -v`). This
catches frontend/type/lowering errors on machines without a GPU; it says nothing about speed or about results
on the device (the `gpu` tests do that).

Slow (about a minute): run with `pytest -m slow tests/kernels/test_compile_for_gpu.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import depthkit_kernels as dk
from depthkit_kernels import select

pytestmark = pytest.mark.slow

TYPE_NAMES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.int64: "i64",
}
MODULES = ["select", "ssi", "gradient_matching", "feature_alignment"]


class _Recorder:
    def __init__(self, kernel, resolved, log):
        self.kernel, self.resolved, self.log = kernel, resolved, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.kernel, args, kwargs))
            return self.resolved[grid](*args, **kwargs)

        return launch


def _record_launches(monkeypatch):
    import importlib

    from depthkit_kernels import _common

    log = []
    for name in MODULES:
        module = importlib.import_module(f"depthkit_kernels.{name}")
        monkeypatch.setattr(module, "resolve", lambda k, _log=log: _Recorder(k, _common.resolve(k), _log))
    return log


# Shapes whose launches specialize differently on a GPU: odd sizes; one image and H*W divisible by 16 (Triton makes an
# int equal to 1 a constant and marks multiples of 16, which gives vector loads); more than 16 chunks per image.
SHAPES = [(2, 9, 7), (1, 32, 48), (1, 180, 200)]


def _run_every_op():
    g = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            _run_ops_at(shape, dtype, g)


def _run_ops_at(shape, dtype, g):
    pred_BHW = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    target_BHW = torch.rand(shape, generator=g).to(dtype)
    valid_BHW = torch.rand(shape, generator=g) > 0.2
    for trim in (0.0, 0.1):
        for metric in ("mse", "l1"):
            out = dk.ssi_lsq(pred_BHW, target_BHW, valid_BHW, metric=metric, trim=trim, impl="triton")
            (out.loss_B.sum() + out.scale_B.sum() + out.shift_B.sum()).backward()
            out = dk.ssi_median(pred_BHW, target_BHW, valid_BHW, metric=metric, trim=trim, impl="triton")
            (out.loss_B.sum() + out.pred_scale_B.sum()).backward()
        for op in (dk.ssi_lsq, dk.ssi_median):  # the loss alone: the other upstream gradients are absent
            op(pred_BHW, target_BHW, valid_BHW, trim=trim, impl="triton").loss_B.sum().backward()
    scale_B = torch.ones(shape[0], requires_grad=True)
    for scales in ((None, None), (scale_B, torch.ones(shape[0]))):
        dk.gradient_matching(pred_BHW, target_BHW, valid_BHW, pred_scale_B=scales[0], target_scale_B=scales[1],
                             impl="triton").loss_B.sum().backward()  # fmt: skip
    student_BND = torch.randn((shape[0], 5, 24), generator=g).to(dtype).requires_grad_()
    features = torch.randn((shape[0], 5, 24)).to(dtype)
    dk.feature_alignment(student_BND, features, impl="triton").loss_B.sum().backward()
    dk.masked_median(pred_BHW, valid_BHW, impl="triton")


def _signature(kernel, args, kwargs):
    fn = kernel.fn if hasattr(kernel, "fn") else kernel
    import inspect

    params = list(inspect.signature(fn).parameters)
    signature, constexprs, div16 = {}, {}, []
    for name, value in zip(params, args, strict=False):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPE_NAMES[value.dtype]
            if value.data_ptr() % 16 == 0:  # as Triton's launcher marks an aligned pointer
                div16.append(name)
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int) and value == 1:  # Triton compiles an int argument equal to 1 as a constant
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:  # and marks a multiple of 16 (vector loads)
                div16.append(name)
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value)}")
    for name, value in kwargs.items():
        if name in ("num_warps", "num_stages"):
            continue
        signature[name] = "constexpr"
        constexprs[name] = value
    return fn, signature, constexprs, {"num_warps": kwargs.get("num_warps", 4)}, div16


COMPILE_SCRIPT = """
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

failures, spills = [], []
variants = json.load(sys.stdin)
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
for module_name, name, signature, constexprs, options, div16 in variants:
    fn = getattr(importlib.import_module(module_name), name)
    fn = JITFunction(fn.fn if hasattr(fn, "fn") else fn)
    attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in div16}
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        assert "cubin" in compiled.asm
    except Exception as exc:
        failures.append(f"{name} {constexprs}: {type(exc).__name__}: {str(exc)[-1500:]}")
        continue
    if os.path.exists(ptxas):  # register spills are a performance bug for these memory-bound kernels
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(compiled.asm["ptx"])
        info = subprocess.run([ptxas, "-v", "-arch=sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True)
        os.unlink(f.name)
        stores = [int(x) for x in re.findall(r"(\\d+) bytes spill stores", info.stderr)]
        if any(stores):
            spills.append(f"{name} {constexprs} {options}: {max(stores)} bytes spilled")
print(json.dumps({"compiled": len(variants), "failures": failures, "spills": spills}))
"""


def test_every_kernel_variant_compiles_for_sm90(monkeypatch, triton_device):
    """Record in this (interpreting) process, compile in a fresh one: the interpreter patches triton.language."""
    if triton_device != "cpu":
        pytest.skip("on a GPU machine the other tests compile and run the kernels for real")
    log = _record_launches(monkeypatch)
    monkeypatch.setattr("depthkit_kernels.select.FORCE_CUMSUM", True)  # what a compiled launch would use
    _run_every_op()
    variants = {}
    for kernel, args, kwargs in log:
        fn, signature, constexprs, options, div16 = _signature(kernel, args, kwargs)
        if "SAMPLE" in constexprs:  # the interpreter samples fewer pixels (its sort is slow)
            constexprs["SAMPLE"] = select.SAMPLE
        key = (fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), tuple(div16))
        variants.setdefault(key, (fn.__module__, fn.__name__, signature, constexprs, options, div16))
    assert len(variants) > 20
    # The GPU's specializations are among them: an image count of 1 compiled as a constant, H*W marked a multiple of 16.
    assert any(v[2].get("num_images") == "constexpr" for v in variants.values())
    assert any("HW" in v[5] for v in variants.values())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT],
        input=json.dumps(list(variants.values())),
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if result.returncode != 0 and "No module named 'triton.backends" in result.stderr:  # pragma: no cover
        pytest.skip("this Triton has no ahead-of-time compile API")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["compiled"] == len(variants)
    assert any(v[1] == "_radix_scan_kernel" and v[3]["CUMSUM"] for v in variants.values())
    assert any(v[1] == "_sample_bounds_kernel" and v[3]["SAMPLE"] == select.SAMPLE for v in variants.values())
    assert not report["failures"], "\n".join(report["failures"])
    assert not report["spills"], "\n".join(report["spills"])
