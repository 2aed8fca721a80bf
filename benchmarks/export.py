"""Benchmark ONNX Runtime (CPU) against PyTorch eager (CPU) for the same model and input.

    python benchmarks/export.py                                   # test_dav2 (random weights), 518 x 518, batch 1
    python benchmarks/export.py --model dav2_vits --size 518x686  # random weights unless --weights PATH
    python benchmarks/export.py --model dav2_vits --weights depth_anything_v2_vits.pth --threads 4 --csv

Exports the model to a temporary file (`depthkit.export.export_onnx`, fp32, dynamic axes, not verified here),
checks that both give the same output on the benchmark input, then times the graph call alone on both sides: the
normalized `B x 3 x H x W` float32 input in, the `B x H x W` prediction out (no image decoding or resizing). Both use
the same number of CPU threads. Timing: `--warmup` untimed runs, then `--iters` timed runs; the median is reported,
and the ratio torch / onnxruntime (> 1: ONNX Runtime is faster). `--csv` appends the row to
`benchmarks/results/export_cpu.csv`.

Not a unit test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _time(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="test_dav2", help="registered model name (default test_dav2)")
    parser.add_argument("--weights", help="weights for --model (default: seeded random weights)")
    parser.add_argument("--size", default="518x518", help="input HxW (default 518x518)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: torch's default)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--csv", action="store_true", help="append the result to benchmarks/results/export_cpu.csv")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where --csv writes")
    args = parser.parse_args(argv)

    from depthkit.export import TOLERANCES, OnnxDepthModel, export_onnx
    from depthkit.export.exporter import PaddedDepthModel, parse_size
    from depthkit.models import create_model

    height, width = parse_size(args.size)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(args.model, checkpoint_path=args.weights).eval()
    if not args.weights:  # a random head outputs all zeros after its ReLU; lift it so the output check means something
        with torch.no_grad():
            model.head.scratch.output_conv2[2].bias.fill_(1.0)
    image_BCHW = torch.randn(args.batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.model}.onnx"
        try:
            export_onnx(model, path, opset=args.opset, size_hw=(height, width), verify=False, log=None)
        except ValueError as err:  # e.g. a --size that is not a multiple of the patch size
            parser.error(str(err))
        session = OnnxDepthModel(path, num_threads=threads)
        graph_input = image_BCHW.numpy()
        reference = PaddedDepthModel(model).eval()
        with torch.inference_mode():
            expected = reference(image_BCHW).numpy()
        got = session(graph_input)
        scale = float(np.abs(expected).max()) or 1.0
        max_rel = float(np.abs(got - expected).max()) / scale  # as `depthkit.export.verification` measures it

        def run_torch():
            with torch.inference_mode():
                reference(image_BCHW)

        torch_s = statistics.median(_time(run_torch, args.warmup, args.iters))
        ort_s = statistics.median(_time(lambda: session(graph_input), args.warmup, args.iters))
    row = {
        "model": args.model,
        "weights": "given" if args.weights else "random",
        "batch": args.batch,
        "height": height,
        "width": width,
        "threads": threads,
        "opset": args.opset,
        "torch_eager_ms": round(torch_s * 1e3, 3),
        "onnxruntime_ms": round(ort_s * 1e3, 3),
        "ratio_torch_over_ort": round(torch_s / ort_s, 3),
        "max_rel_err": f"{max_rel:.2e}",
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
    }
    print(
        f"{'model':<12} {'B x H x W':>14} {'threads':>7} {'torch eager ms':>15} {'onnxruntime ms':>15} "
        f"{'torch/ort':>10} {'max rel err':>12}"
    )
    print(
        f"{args.model:<12} {f'{args.batch} x {height} x {width}':>14} {threads:>7} {row['torch_eager_ms']:>15.2f} "
        f"{row['onnxruntime_ms']:>15.2f} {row['ratio_torch_over_ort']:>10.2f} {row['max_rel_err']:>12}"
    )
    if max_rel > TOLERANCES["fp32"]:
        print(f"FAIL: the graph differs from PyTorch by {max_rel:.2e} > {TOLERANCES['fp32']:.0e}", file=sys.stderr)
        return 1
    if args.csv:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out_path = args.out_dir / "export_cpu.csv"
        new = not out_path.exists()
        with out_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        print(f"appended to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
