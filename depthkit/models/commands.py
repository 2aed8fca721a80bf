"""`depthkit predict`: depth maps for image files, folders or globs.

Only argparse is imported at module level; the handler imports torch and the model lazily.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    predict = subparsers.add_parser(
        "predict",
        help="predict depth for images (files, folders, globs)",
        description="Run a depth model over images and write colorized PNGs, 16-bit PNGs and/or .npy arrays. "
        "Without --checkpoint the model's official weights are taken from the local checkpoint folder "
        "($DEPTHKIT_HOME/checkpoints, default ~/.cache/depthkit/checkpoints); nothing is downloaded.",
        epilog="Outputs per image NAME (its path relative to the input folder): NAME_color.png (colormap, near = "
        "bright), NAME_16bit.png (relative models: per-image min-max to 0..65535 with min/max in the PNG text chunk "
        "'depthkit'; metric models: metres * 256), NAME.npy (float32, the model's output space). Bad images are "
        "reported and skipped.",
    )
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or globs")
    predict.add_argument(
        "--model",
        help="registered model name, e.g. dav2_vits (required unless --onnx or a `depthkit fit` --checkpoint)",
    )
    predict.add_argument(
        "--onnx",
        metavar="PATH",
        help="run this `depthkit export onnx` graph with ONNX Runtime instead of torch (no torch imported; the model "
        "name and normalization come from the graph)",
    )
    predict.add_argument(
        "--checkpoint",
        help="weights: a `depthkit fit` .ckpt (it names its model), official .pth, depthkit .pth/.safetensors or "
        "a HF folder",
    )
    predict.add_argument(
        "--random-weights", action="store_true", help="no weights at all (seeded random init; for smoke tests)"
    )
    predict.add_argument("--out", required=True, help="output folder (mirrors input folders)")
    predict.add_argument(
        "--save", default="color,png16,npy", help="comma-separated outputs: color, png16, npy (default: all)"
    )
    predict.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    predict.add_argument(
        "--device",
        default="auto",
        help="auto (default: CUDA when available), cpu, cuda, cuda:1, ... (--onnx: its CUDA)",
    )
    predict.add_argument(
        "--input-size",
        type=int,
        default=518,
        help="short side of the network input, rounded to the patch size (an --onnx graph's static sides keep their "
        "size)",
    )
    predict.add_argument("--cmap", default="inferno", help="matplotlib colormap of the color output")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    predict.set_defaults(func=run_predict_command)


def _build_predictor(args: argparse.Namespace):
    """A function from a list of uint8 RGB images to `Prediction`s (an ONNX backend would plug in here)."""
    if args.onnx:  # ONNX Runtime: no torch in the process (depthkit.export.runtime)
        from depthkit.export.runtime import build_predictor

        if args.checkpoint or args.random_weights:
            raise ValueError("--onnx holds its own weights; it excludes --checkpoint and --random-weights")
        return build_predictor(
            args.onnx, model=args.model, input_size=args.input_size, batch_size=args.batch_size, device=args.device
        )
    if not args.model and not args.checkpoint:
        raise ValueError("--model NAME is required (or --onnx PATH, or a `depthkit fit` --checkpoint)")

    from depthkit.devices import torch_device
    from depthkit.models import load_model

    if args.checkpoint and args.random_weights:
        raise ValueError("--checkpoint and --random-weights exclude each other")
    device = torch_device(args.device)
    try:  # a training checkpoint builds the model it trained
        model = load_model(args.model, args.checkpoint, pretrained=not args.random_weights)
    except FileNotFoundError as err:
        if args.checkpoint:
            raise
        raise FileNotFoundError(f"{err}; or --random-weights to try the command") from None
    model = model.to(device)

    def predict(images):
        return model.infer(images, input_size=args.input_size, batch_size=args.batch_size)

    return predict


def run_predict_command(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from depthkit.models.predict import collect_inputs, parse_save, run_predict

    save = parse_save(args.save)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.input_size < 1:
        raise ValueError(f"--input-size must be >= 1, got {args.input_size}")
    import matplotlib

    if args.cmap not in matplotlib.colormaps:
        raise ValueError(f"--cmap {args.cmap!r} is not a matplotlib colormap")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder")
    # An --out inside an input folder holds earlier outputs (16-bit PNGs, colour maps): not inputs.
    inputs = [item for item in collect_inputs(args.inputs) if not item.path.resolve().is_relative_to(out_dir.resolve())]
    if not inputs:
        raise FileNotFoundError(f"no images found in {' '.join(args.inputs)}")
    predict = _build_predictor(args)
    start = time.perf_counter()
    num_written, skipped = run_predict(
        predict, inputs, out_dir, save, chunk_size=4 * args.batch_size, cmap=args.cmap, progress=not args.no_progress
    )
    seconds = time.perf_counter() - start
    if num_written == 0:
        raise ValueError(f"none of the {len(inputs)} input(s) could be read")
    print(
        f"wrote {', '.join(save)} for {num_written} image(s) to {out_dir} in {seconds:.1f} s "
        f"({num_written / max(seconds, 1e-9):.2f} images/s)"
        + (f"; skipped {len(skipped)} bad input(s), named above" if skipped else "")
    )
    return 0
