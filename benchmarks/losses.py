"""Benchmark the fused loss kernels against the eager reference and `torch.compile` of the reference.

    python benchmarks/losses.py                  # CUDA: batch 32 at 518 x 518, fp32 and bf16, every op
    python benchmarks/losses.py --quick          # tiny sizes; on CPU only the eager reference (checks it runs)
    python benchmarks/losses.py --peak-gbps 3350 # override the GPU's peak memory bandwidth

For each op, dtype and mode ("fwd", "fwd+bwd") it times three implementations: "triton" (the fused kernels,
`impl="triton"`), "eager" (the plain-torch reference, `impl="torch"`) and "compile" (`torch.compile` of that
reference), prints them side by side with the speedups, and writes a CSV to
`benchmarks/results/losses_<device>.csv`. Timing on CUDA uses `triton.testing.do_bench` (median, L2 flushed).

Bandwidth, two ways, both divided by the GPU's peak (from `PEAK_GBPS` by device name, or `--peak-gbps`):
- "GB/s" / "%peak" (CSV `gbps`, `frac_peak`): the op's *ideal* traffic over the time. fwd reads each input
  once; fwd+bwd reads each input twice (forward and backward) and writes the gradient once.
- "%moved" (CSV `moved_gbytes`, `moved_frac_peak`): the traffic the fused kernels actually cause, modeled from
  their passes (`kernel_bytes`; e.g. the least-squares forward reads the maps twice, once for the moments and
  once for the loss, and the median's select reads them once more). This is the achieved fraction of
  the memory bandwidth, the issue's ">= 60%" measure; "%peak" is the end-to-end one, lower when a loss needs
  several passes by construction. Small per-image kernels, partial sums and L2 hits are not counted.

`--cudagraph` times device work only: each call is captured in a CUDA graph and replayed
(`triton.testing.do_bench_cudagraph`, median; L2 flushed by a 256 MB write whose time is subtracted), so the
host's launch overhead drops out. At batch 32 the
fused losses take well under a millisecond, and the default timing then also measures how fast Python and Triton
launch kernels; in training the host runs ahead of the network's kernels and that overhead is hidden, so the
device time is the one a training step pays. The CSV is then `losses_<device>-cudagraph.csv` (column `timing`).

`--profile` (CUDA) also prints, for the fused kernels of each op and mode, torch.profiler's table of 20 calls:
host time per op (Python, autograd, launches) beside device time per kernel, to tell launch-bound from slow kernels.

Not a unit test: nothing here asserts a speed. `tests/losses/test_benchmark_script.py` only checks that
`--quick` runs on CPU.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import depthkit_kernels as dk
from depthkit_kernels import reference

RESULTS_DIR = Path(__file__).resolve().parent / "results"
L2_FLUSH_BYTES = 256 * 2**20  # over any GPU's L2 (H100/H200: 50 MB; B200: 126 MB), as do_bench's own flush

# Vendor peak memory bandwidth in GB/s, matched in order against torch.cuda.get_device_name() (first hit wins).
PEAK_GBPS: list[tuple[str, float]] = [
    ("B200", 8000.0),
    ("H200", 4800.0),
    ("GH200", 4000.0),  # 96 GB HBM3; the 144 GB HBM3e part has 4900: pass --peak-gbps
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM ("H100 80GB HBM3")
    ("A100 80GB PCIe", 1935.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100", 1555.0),  # 40 GB parts
    ("L40S", 864.0),
    ("L40", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("V100", 900.0),
    ("T4", 320.0),
]


def peak_gbps(device_name: str) -> float | None:
    for key, gbps in PEAK_GBPS:
        if key in device_name:
            return gbps
    return None


@dataclass
class Case:
    """One benchmarked op: how to build inputs, call it per impl, and its ideal traffic."""

    name: str
    make: Callable[[int, int, int, torch.dtype, str], tuple]
    run: Callable[..., torch.Tensor]  # run(impl, *inputs) -> per-image loss (or values)
    reference: Callable[..., torch.Tensor] | None  # plain-torch function to torch.compile
    differentiable: bool = True
    feature: bool = False


def _maps(batch, height, width, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    pred_BHW = torch.rand((batch, height, width), generator=g).to(device, dtype)
    target_BHW = (0.5 * pred_BHW.float() + 0.1 * torch.rand(pred_BHW.shape, generator=g).to(device)).to(dtype)
    valid_BHW = (torch.rand(pred_BHW.shape, generator=g) > 0.1).to(device)
    return pred_BHW, target_BHW, valid_BHW


def _features(batch, height, width, dtype, device, *, patch=14, dim=1024):
    num_patches = (height // patch) * (width // patch)
    g = torch.Generator(device="cpu").manual_seed(0)
    target_BND = torch.randn((batch, num_patches, dim), generator=g).to(device, dtype)
    student_BND = (target_BND.float() + 0.7 * torch.randn(target_BND.shape, generator=g).to(device)).to(dtype)
    return student_BND, target_BND


def _lsq_ref(p, d, v):
    return reference.ssi_lsq_reference(p, d, v, metric="mse")[0]


def _lsq_midas_fp32(p, d, v):
    """Least-squares SSI as plain fp32 torch code writes it (MiDaS's `compute_scale_and_shift`: the 2x2 normal
    equations from masked sums, Cramer's rule). The reference solves in fp64 (its autograd backward underflows fp32
    for tiny predictions), which on its own makes eager several times slower: "ssi_lsq_vs_fp32_eager" compares the
    kernels with what a user would otherwise run."""
    p, d, m = p.float(), d.float(), v.float()
    a00, a01, a11 = (m * p * p).sum((1, 2)), (m * p).sum((1, 2)), m.sum((1, 2))
    b0, b1 = (m * p * d).sum((1, 2)), (m * d).sum((1, 2))
    det = a00 * a11 - a01 * a01
    solvable = det > 0
    det = torch.where(solvable, det, 1.0)
    scale = torch.where(solvable, (a11 * b0 - a01 * b1) / det, 0.0)
    shift = torch.where(solvable, (a00 * b1 - a01 * b0) / det, 0.0)
    residual = scale[:, None, None] * p + shift[:, None, None] - d
    return (m * residual * residual).sum((1, 2)) / a11.clamp_min(1)


def _median_ref(p, d, v):
    return reference.ssi_median_reference(p, d, v, metric="l1")[0]


def _median_trim_ref(p, d, v):
    return reference.ssi_median_reference(p, d, v, metric="l1", trim=0.1)[0]


def _gm_ref(p, d, v, s):
    return reference.gradient_matching_reference(p, d, v, pred_scale_B=s)


def _fa_ref(s, t):
    return reference.feature_alignment_reference(s, t)[0]


def _median_only_ref(x, v):
    return reference.masked_lower_median(x, v)


def _gm_make(b, h, w, dt, dev):
    return (*_maps(b, h, w, dt, dev), torch.full((b,), 1.3, device=dev))


CASES = [
    Case("ssi_lsq", _maps, lambda impl, p, d, v: dk.ssi_lsq(p, d, v, impl=impl).loss_B, _lsq_ref),
    Case(
        "ssi_lsq_vs_fp32_eager",
        _maps,
        lambda impl, p, d, v: _lsq_midas_fp32(p, d, v) if impl == "torch" else dk.ssi_lsq(p, d, v, impl=impl).loss_B,
        _lsq_midas_fp32,
    ),
    Case("ssi_median", _maps, lambda impl, p, d, v: dk.ssi_median(p, d, v, impl=impl).loss_B, _median_ref),
    Case(
        "ssi_median_trim0.1",
        _maps,
        lambda impl, p, d, v: dk.ssi_median(p, d, v, trim=0.1, impl=impl).loss_B,
        _median_trim_ref,
    ),
    Case(
        "gradient_matching",
        _gm_make,
        lambda impl, p, d, v, s: dk.gradient_matching(p, d, v, pred_scale_B=s, impl=impl).loss_B,
        _gm_ref,
    ),
    Case(
        "feature_alignment",
        _features,
        lambda impl, s, t: dk.feature_alignment(s, t, impl=impl).loss_B,
        _fa_ref,
        feature=True,
    ),
    Case(
        "masked_median",
        lambda b, h, w, dt, dev: _maps(b, h, w, dt, dev)[::2],
        lambda impl, x, v: dk.masked_median(x, v, impl=impl),
        _median_only_ref,
        differentiable=False,
    ),
]


def ideal_bytes(inputs: tuple, mode: str) -> int:
    read = sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))
    if mode == "fwd":
        return read
    return 2 * read + inputs[0].numel() * inputs[0].element_size()


def select_bytes(source_bytes: list[int], pixels: int) -> int:
    """The select over sources of `source_bytes` each (see kernels/select.py): the partition reads each source and
    the mask (1 byte a pixel) once and writes the candidates (uint32 keys, a fraction of the pixels: 2 MARGIN /
    sqrt(SAMPLE) when the sample is fair), which the 4 radix passes read. The sample (2048 pixels a row) is left
    out."""
    from depthkit_kernels import select

    candidates = round(pixels * 4 * 2 * select.MARGIN / math.sqrt(select.SAMPLE))
    return sum(b + pixels + (1 + select.NUM_PASSES) * candidates for b in source_bytes)


def kernel_bytes(name: str, inputs: tuple, mode: str) -> int:
    """The bytes the fused kernels of op `name` read and write, from their passes (see the kernels' docstrings).

    Per-image fields, per-chunk partial sums and the radix histograms are left out (kilobytes). P, D, V: one
    read of the prediction, the target, the mask (1 byte per pixel); L: the fp32 per-pixel loss map of the
    trimmed SSI (written once, read by the threshold's select and the sums); G: the gradient written.
    """
    if name == "feature_alignment":
        read = sum(t.numel() * t.element_size() for t in inputs)
        return read if mode == "fwd" else 2 * read + inputs[0].numel() * inputs[0].element_size()
    if name == "masked_median":  # inputs (x, valid)
        return select_bytes([inputs[0].numel() * inputs[0].element_size()], inputs[1].numel())
    name = name.removesuffix("_vs_fp32_eager")  # the same kernels, against another eager baseline
    p, d, v = (t.numel() * t.element_size() for t in inputs[:3])
    maps = p + d + v
    pixels = inputs[2].numel()
    loss_map = pixels * 4
    medians = select_bytes([p, d], pixels)
    forward = {
        "gradient_matching": maps,  # every scale in one pass; neighbours mostly from cache
        "ssi_lsq": 2 * maps,  # moments, then the loss
        "ssi_median": medians + 2 * maps,  # select of pred and target, MAD, loss
        # + the loss pass writes L, the select of L's threshold, sums below the threshold (read maps and L)
        "ssi_median_trim0.1": medians + 3 * maps + loss_map + select_bytes([loss_map], pixels) + loss_map,
    }[name]
    if mode == "fwd":
        return forward
    backward = maps + p + (loss_map if name == "ssi_median_trim0.1" else 0)  # one pass; writes G like pred
    return forward + backward


def time_ms(fn: Callable[[], object], *, cuda: bool, grad_to_none: list[torch.Tensor], graph: bool = False) -> float:
    if cuda:
        import triton.testing

        if graph:
            # A graph replays on the same inputs, which (a bf16 batch of 518^2 maps: 17 MB) may sit in the 50 MB
            # L2 from the last replay: each replay first overwrites a buffer larger than L2, whose own time is
            # measured apart and subtracted.
            flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")

            def flushed():
                flush.zero_()
                fn()

            bench = functools.partial(triton.testing.do_bench_cudagraph, rep=100, return_mode="median")
            return float(bench(flushed, grad_to_none=grad_to_none)) - float(bench(flush.zero_))
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def bench_case(case: Case, impl: str, mode: str, inputs: tuple, *, cuda: bool, graph: bool = False) -> float:
    inputs = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs)
    first = inputs[0]
    if mode == "fwd+bwd":
        first.requires_grad_(True)
    if impl == "compile":
        compiled = torch.compile(case.reference)

        def call():
            return compiled(*inputs)
    else:

        def call():
            return case.run("torch" if impl == "eager" else impl, *inputs)

    if mode == "fwd":

        def step():
            with torch.no_grad():
                return call()
    else:

        def step():
            call().sum().backward()

    return time_ms(step, cuda=cuda, grad_to_none=[first] if mode == "fwd+bwd" else [], graph=graph)


def profile_case(case: Case, mode: str, inputs: tuple, title: str, calls: int = 20) -> None:
    """Print torch.profiler's table for `calls` calls of the fused op (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    inputs = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs)
    first = inputs[0]
    if mode == "fwd+bwd":
        first.requires_grad_(True)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                case.run("triton", *inputs)
        else:
            first.grad = None
            case.run("triton", *inputs).sum().backward()

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    print(f"--- profile: {title}, {calls} calls (times are totals over the calls)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48))


def bench_median_vs_torch(
    batch: int, size: int, dtype: torch.dtype, dtype_name: str, device_name: str, graph: bool = False
) -> list:
    """Our exact masked median (sample, partition, radix select) against `torch.median(x, dim=1)` on all-valid maps.

    CSV rows with op "median_vs_torch.median"; there "speedup_vs_eager" is relative to torch.median.
    """
    x_BHW = _maps(batch, size, size, dtype, "cuda")[0]
    x_BM = x_BHW.view(batch, -1)  # B x HW
    all_valid_BHW = torch.ones_like(x_BHW, dtype=torch.bool)
    t_ours = time_ms(lambda: dk.masked_median(x_BHW, all_valid_BHW, impl="triton"), cuda=True, grad_to_none=[],
                     graph=graph)  # fmt: skip
    t_torch = time_ms(lambda: torch.median(x_BM, dim=1), cuda=True, grad_to_none=[], graph=graph)
    print(f"masked_median (triton) vs torch.median(dim=1), {dtype_name}: {t_ours:.4f} ms vs {t_torch:.4f} ms "
          f"= {t_torch / t_ours:.2f}x")  # fmt: skip
    common = {"device": device_name, "op": "median_vs_torch.median", "dtype": dtype_name, "mode": "fwd",
              "batch": batch, "height": size, "width": size,
              "timing": "cudagraph" if graph else "do_bench"}  # fmt: skip
    return [
        {**common, "impl": "triton", "ms": t_ours, "speedup_vs_eager": t_torch / t_ours},
        {**common, "impl": "torch.median", "ms": t_torch, "speedup_vs_eager": 1.0},
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes; on CPU only the eager reference")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=518, help="height = width")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--ops", default=",".join(c.name for c in CASES))
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth, GB/s")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--cudagraph", action="store_true", help="device time only: replay CUDA graphs (see above)")
    parser.add_argument("--profile", action="store_true", help="CUDA: torch.profiler table of the fused kernels")
    parser.add_argument(
        "--select-block",
        type=int,
        default=None,
        help="pixels per program of the select's partition and radix passes (a tuning experiment)",
    )
    parser.add_argument(
        "--impls", default=None, help="comma list of triton,eager,compile (default: all on CUDA, eager on CPU)"
    )
    args = parser.parse_args(argv)

    if args.select_block:
        from depthkit_kernels import select

        if args.select_block & (args.select_block - 1):
            parser.error("--select-block must be a power of two")
        select.SELECT_BLOCK = args.select_block
        print(f"radix select: {args.select_block} pixels per program")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        device_name = torch.cuda.get_device_name()
        impls = ["triton", "eager", "compile"]
    else:
        device_name = "cpu"
        if not args.quick:
            print("no CUDA device: running --quick with the eager reference only", file=sys.stderr)
        args.quick = True
        impls = ["eager"]
    if args.impls:
        impls = args.impls.split(",")
        if "eager" not in impls or not set(impls) <= {"triton", "eager", "compile"}:
            parser.error("--impls: a comma list of triton, eager, compile that includes eager")
    batch, size = (2, 37) if args.quick else (args.batch, args.size)
    peak = args.peak_gbps if args.peak_gbps is not None else (peak_gbps(device_name) if cuda else None)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    wanted_ops = set(args.ops.split(","))
    unknown = wanted_ops - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown ops: {', '.join(sorted(unknown))}")

    rows = []
    header = f"{'op':<20} {'dtype':<5} {'mode':<8} " + " ".join(f"{i + ' ms':>11}" for i in impls)
    header += f" {'x eager':>8} {'x compile':>9} {'GB/s':>8} {'%peak':>6} {'%moved':>6}"
    timing = "cudagraph" if args.cudagraph else ("do_bench" if cuda else "perf_counter")
    print(f"device: {device_name}, peak {peak if peak else '?'} GB/s, batch {batch}, {size}x{size}, timing {timing}")
    print(header)
    for case in CASES:
        if case.name not in wanted_ops:
            continue
        for dtype_name in args.dtypes.split(","):
            dtype = dtypes[dtype_name]
            inputs = case.make(batch, size, size, dtype, device)
            for mode in ("fwd", "fwd+bwd") if case.differentiable else ("fwd",):
                ms = {}
                for impl in impls:
                    try:
                        ms[impl] = bench_case(case, impl, mode, inputs, cuda=cuda, graph=args.cudagraph)
                    except Exception as exc:  # a compile (or capture) failure should not hide the other numbers
                        if impl != "compile" and not args.cudagraph:
                            raise
                        print(f"  {case.name} {dtype_name} {mode} {impl}: failed: {exc!r}"[:300], file=sys.stderr)
                        ms[impl] = math.nan
                best = ms.get("triton", ms["eager"])
                gbytes = ideal_bytes(inputs, mode) / 1e9
                moved = kernel_bytes(case.name, inputs, mode) / 1e9
                gbps = gbytes / (best / 1e3) if best == best else math.nan
                frac = gbps / peak if peak else math.nan
                moved_frac = moved / (best / 1e3) / peak if peak and "triton" in ms else math.nan
                x_eager = ms["eager"] / best if "triton" in ms else math.nan
                x_compile = ms["compile"] / best if "compile" in ms else math.nan
                line = f"{case.name:<20} {dtype_name:<5} {mode:<8} " + " ".join(f"{ms[i]:>11.4f}" for i in impls)
                line += f" {x_eager:>8.2f} {x_compile:>9.2f} {gbps:>8.1f} {100 * frac:>6.1f} {100 * moved_frac:>6.1f}"
                print(line)
                if args.profile and cuda and "triton" in impls:
                    profile_case(case, mode, inputs, f"{case.name} {dtype_name} {mode}")
                for impl in impls:
                    rows.append(
                        {
                            "device": device_name,
                            "op": case.name,
                            "dtype": dtype_name,
                            "mode": mode,
                            "impl": impl,
                            "batch": batch,
                            "height": size,
                            "width": size,
                            "timing": timing,
                            "ms": ms[impl],
                            "speedup_vs_eager": ms["eager"] / ms[impl],
                            "speedup_vs_compile": ms["compile"] / ms[impl] if "compile" in ms else math.nan,
                            "ideal_gbytes": gbytes,
                            "gbps": gbytes / (ms[impl] / 1e3),
                            "frac_peak": gbytes / (ms[impl] / 1e3) / peak if peak else math.nan,
                            "moved_gbytes": moved if impl == "triton" else math.nan,
                            "moved_frac_peak": moved_frac if impl == "triton" else math.nan,
                        }
                    )
    if cuda and "masked_median" in wanted_ops:
        for dtype_name in args.dtypes.split(","):
            rows.extend(bench_median_vs_torch(batch, size, dtypes[dtype_name], dtype_name, device_name, args.cudagraph))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ("-quick" if args.quick else "")
    tag += "-cudagraph" if args.cudagraph else ""
    out_path = args.out_dir / f"losses_{tag}.csv"
    fields = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with out_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
