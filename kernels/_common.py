"""Shared plumbing for the Triton ops: the dispatch rule, input checks, kernel resolution and the device helpers
the kernels share.

Dispatch (house rule 3): every op takes `impl="auto" | "triton" | "torch"`.
- "torch": the plain-torch reference (`depthkit_kernels.reference`), which is the op's spec.
- "triton": the fused kernels. On CPU tensors this raises `ValueError` unless `TRITON_INTERPRET=1` is set, in
  which case the kernels run in Triton's interpreter (slow; for tests on small shapes).
- "auto": Triton when every tensor is on CUDA, the reference elsewhere (also on CPU with the interpreter on).

Kernel resolution: `triton.jit` decides at *decoration* time whether a kernel is compiled or interpreted, from
`TRITON_INTERPRET`. So that the answer does not depend on who imported `depthkit_kernels` first, launchers call
`resolve(kernel)`, which re-wraps the kernel's Python function for the mode the environment asks for *now*.
`resolve` cannot re-wrap what a kernel calls, so the device functions the kernels share are decorated with
`jit_helper`, not `@triton.jit`: they run in the mode of the kernel calling them. Triton's own library functions
(`tl.sum`, `tl.max`, ...) keep the mode `triton.language` was imported in: set `TRITON_INTERPRET` before that.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

IMPLS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def first_order(backward):
    """Wrap an `autograd.Function.backward` written by hand: refuse to run it differentiably (`create_graph=True`,
    a gradient penalty). Its result has no graph, so a second-order term would be dropped without a word
    (`once_differentiable` sees only the incoming gradients, which need not require grad)."""

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            name = type(ctx).__name__.removesuffix("Backward")
            raise RuntimeError(
                f"{name}: the fused kernel's gradient is first order only; use impl='torch' for a "
                "second derivative (create_graph=True)"
            )
        return backward(ctx, *grads)

    return checked


def interpreter_enabled() -> bool:
    """Whether `TRITON_INTERPRET` is set now (read on every call, like Triton does)."""
    return bool(triton.knobs.runtime.interpret)


def use_triton(op: str, impl: str, *tensors: torch.Tensor) -> bool:
    """Apply the dispatch rule for `op`; True means: run the Triton kernels.

    Raises:
        ValueError: `impl` is unknown, or "triton" was asked for CPU tensors without `TRITON_INTERPRET=1`.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not one of {', '.join(map(repr, IMPLS))}")
    if impl == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        return on_cuda
    if on_cuda or interpreter_enabled():
        return True
    devices = sorted({str(t.device) for t in tensors})
    raise ValueError(
        f"{op}: impl='triton' needs CUDA tensors, got {', '.join(devices)}; use impl='auto' or 'torch', "
        "or set TRITON_INTERPRET=1 (before launching) to run the Triton interpreter on CPU"
    )


@functools.cache
def _as_interpreted(kernel: JITFunction) -> InterpretedFunction:
    return InterpretedFunction(kernel.fn)


@functools.cache
def _as_compiled(kernel: InterpretedFunction) -> JITFunction:
    return JITFunction(kernel.fn)


def resolve(kernel):
    """Return `kernel` compiled or interpreted, as `TRITON_INTERPRET` asks at call time."""
    if interpreter_enabled():
        return kernel if isinstance(kernel, InterpretedFunction) else _as_interpreted(kernel)
    return _as_compiled(kernel) if isinstance(kernel, InterpretedFunction) else kernel


class _JitHelper(JITFunction):
    """A device function that runs in the mode of the kernel calling it (see `jit_helper`)."""

    def __call__(self, *args, **kwargs):
        # Only an interpreted kernel calls a device function as Python; a compiled kernel inlines the JITFunction.
        return _as_interpreted(self)(*args, **kwargs)


def jit_helper(fn) -> JITFunction:
    """`@triton.jit` for device functions that kernels call, without fixing their mode at import.

    A plain `@triton.jit` helper keeps its import-time mode while `resolve` re-wraps its callers: an interpreted
    kernel calling a compiled helper fails with "Cannot call @triton.jit'd outside of the scope of a kernel", a
    compiled one calling an interpreted helper with "Unsupported function referenced". This one is a JITFunction,
    which the compiler inlines into the kernel, and runs itself in the interpreter when an interpreted kernel calls it.
    """
    return _JitHelper(fn)


@jit_helper
def chunk(HW, BLOCK: tl.constexpr):
    """Grid (images, chunks): this program's image b, chunk c, its offsets in the image, their bounds mask, and
    the image's start in the B x HW maps."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    inb = offs < HW
    base = b.to(tl.int64) * HW
    return b, c, offs, inb, base


@jit_helper
def load_maps(pred_ptr, target_ptr, valid_ptr, base, offs, inb):
    """The valid mask of a chunk and its pred / target in fp32, 0 where invalid (inf/NaN there reach no sum)."""
    v = (tl.load(valid_ptr + base + offs, mask=inb, other=0) != 0) & inb
    p = tl.where(v, tl.load(pred_ptr + base + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
    d = tl.where(v, tl.load(target_ptr + base + offs, mask=inb, other=0.0).to(tl.float32), 0.0)
    return v, p, d


@jit_helper
def sign(x):
    """The sign of x as -1.0, 0.0 or 1.0 (0.0 at 0 and at NaN)."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


def check_maps(op: str, pred_BHW: torch.Tensor, target_BHW: torch.Tensor, valid_BHW: torch.Tensor) -> None:
    """Validate the (prediction, target, valid) triple shared by the dense losses.

    Raises:
        ValueError: wrong rank, mismatched shapes/devices, a non-bool mask, an unsupported dtype or empty input.
    """
    if pred_BHW.dim() != 3:
        raise ValueError(f"{op}: expected B x H x W maps, got pred of shape {tuple(pred_BHW.shape)}")
    if target_BHW.shape != pred_BHW.shape or valid_BHW.shape != pred_BHW.shape:
        raise ValueError(
            f"{op}: shapes differ: pred {tuple(pred_BHW.shape)}, target {tuple(target_BHW.shape)}, "
            f"valid {tuple(valid_BHW.shape)}"
        )
    if valid_BHW.dtype != torch.bool:
        raise ValueError(f"{op}: valid must be a bool mask, got {valid_BHW.dtype}")
    for name, t in (("pred", pred_BHW), ("target", target_BHW)):
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if len({pred_BHW.device, target_BHW.device, valid_BHW.device}) != 1:
        raise ValueError(f"{op}: tensors are on different devices")
    if pred_BHW.numel() == 0:
        raise ValueError(f"{op}: empty input of shape {tuple(pred_BHW.shape)}")


def flat_contiguous(x_BHW: torch.Tensor) -> torch.Tensor:
    """B x (H*W) contiguous view, copying only when the input is not contiguous."""
    return x_BHW.contiguous().view(x_BHW.shape[0], -1)  # B x HW


def valid_bytes(valid_BHW: torch.Tensor) -> torch.Tensor:
    """The bool mask as a contiguous B x HW uint8 view (zero-copy when already contiguous)."""
    return valid_BHW.contiguous().view(torch.uint8).view(valid_BHW.shape[0], -1)  # B x HW


def upstream_grad(g: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """A per-image upstream gradient as kernel arguments `(tensor, element stride 0 or 1, present)`.

    Autograd passes None for an output nobody used: it becomes absent (`like`, any fp32 tensor, stands in for the
    pointer). The gradient of a `.sum()` is one value expanded (stride 0): it is read as it is, not materialized.
    The stride is a kernel constexpr (0 or 1; anything else is copied), so reading it costs no register.
    """
    if g is None:
        return like, 1, False
    g = g if g.dtype == torch.float32 else g.float()
    if g.stride(0) not in (0, 1):
        g = g.contiguous()
    return g, g.stride(0), True
