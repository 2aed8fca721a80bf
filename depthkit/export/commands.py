"""`depthkit export onnx`: a verified ONNX graph with dynamic batch, height and width; `depthkit export weights`:
the weights in the official, transformers or depthkit layout, read back and compared before they are kept.

    depthkit export onnx --model dav2_vits --out dav2_vits.onnx             # official weights, verified
    depthkit export onnx --checkpoint run/last.ckpt --out student.onnx --fp16
    depthkit export onnx --model dav2_vitb --weights my.pth --out b.onnx --dynamic none --size 518x686
    depthkit export weights --checkpoint run/last.ckpt --layout official --out student_vits.pth
    depthkit export weights --checkpoint run/last.ckpt --layout hf --out student_vits_hf/

Only argparse is imported at the top; the handler imports torch and the exporter.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    export = subparsers.add_parser(
        "export",
        help="export a model for deployment (ONNX) or release (weights in the official / transformers layout)",
        description="Export a depth model for deployment runtimes. See docs/export.md.",
    )
    formats = export.add_subparsers(dest="format", metavar="FORMAT", required=True)
    onnx = formats.add_parser(
        "onnx",
        help="ONNX graph with dynamic batch/height/width, metadata, checked and verified against PyTorch",
        description="Export to ONNX (TorchScript exporter) with dynamic batch, height and width, the model's "
        "metadata (name, output space, patch size, normalization, max_depth, depthkit version) in the graph, "
        "the ONNX checker run, and (by default) ONNX Runtime verified against PyTorch at several resolutions "
        "and aspect ratios before the file is written. Sizes that are not multiples of the patch size are "
        "zero-padded inside the graph and the output cropped back. See docs/export.md.",
    )
    _add_model_source(onnx)
    onnx.add_argument("--out", required=True, metavar="PATH", help="the .onnx file to write")
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset, 14-20 (default 17)")
    onnx.add_argument(
        "--dynamic",
        default="batch,height,width",
        metavar="AXES",
        help="axes that may vary at run time: a comma-separated subset of batch,height,width, or none "
        "(default: all three)",
    )
    onnx.add_argument(
        "--size",
        metavar="HxW",
        help="example input size to trace at; the only size of a graph without dynamic height/width "
        "(multiples of the patch size; default: the encoder's pre-training size, 518x518)",
    )
    onnx.add_argument("--fp16", action="store_true", help="float16 weights and compute (input/output stay float32)")
    onnx.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare ONNX Runtime with PyTorch on random and real inputs at several sizes and fail above the "
        "tolerance (fp32 1e-4, fp16 2e-2, relative to the largest output; default: on)",
    )
    onnx.add_argument(
        "--verify-sizes",
        metavar="HxW,...",
        help="sizes to verify at (default: the export size, a landscape, a portrait and a non-multiple size)",
    )
    onnx.add_argument(
        "--verify-images",
        nargs="+",
        metavar="IMAGE",
        help="real images for the verification (default: grace_hopper.jpg from matplotlib's sample data)",
    )
    onnx.set_defaults(func=run_export_onnx)

    weights = formats.add_parser(
        "weights",
        help="the weights in the official Depth Anything, transformers or depthkit layout, verified",
        description="Write a model's weights in the layout its users load: 'official' (.pth for the official "
        "Depth Anything code), 'hf' (a folder for transformers' DepthAnythingForDepthEstimation.from_pretrained) "
        "or 'depthkit' (.safetensors for create_model). The file is read back and compared tensor by tensor "
        "before it is renamed into place, and the command prints how to load it.",
    )
    _add_model_source(weights)
    weights.add_argument(
        "--layout", choices=("official", "hf", "depthkit"), default="official", help="(default official)"
    )
    weights.add_argument("--out", required=True, metavar="PATH", help="the file (official, depthkit) or folder (hf)")
    weights.set_defaults(func=run_export_weights)


def _add_model_source(parser) -> None:
    source = parser.add_argument_group("model")
    source.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="a `depthkit fit` checkpoint (it names its model), or with --model any weights file --weights takes",
    )
    source.add_argument("--model", metavar="NAME", help="registered model name, e.g. dav2_vits")
    source.add_argument(
        "--weights",
        metavar="PATH",
        help="weights for --model (official .pth, depthkit .pth/.safetensors, HF folder); default: the official "
        "weights from the local checkpoint folder ($DEPTHKIT_HOME/checkpoints); nothing is downloaded",
    )


def run_export_onnx(args: argparse.Namespace) -> int:
    from depthkit.export.exporter import check_onnx_out, export_onnx, load_model, parse_size

    check_onnx_out(args.out)
    size_hw = parse_size(args.size) if args.size else None
    images = None
    if args.verify_images:
        from depthkit.export.verification import named_images
        from depthkit.models.predict import collect_inputs

        paths = [item.path for item in collect_inputs(args.verify_images)]
        if not paths:
            raise FileNotFoundError(f"no images found in {' '.join(args.verify_images)}")
        images = named_images(paths)  # read now: a bad one is named before the export, not after it
    verify_sizes = [parse_size(s) for s in args.verify_sizes.split(",") if s.strip()] if args.verify_sizes else None
    model = load_model(checkpoint=args.checkpoint, model=args.model, weights=args.weights)
    export_onnx(
        model,
        args.out,
        opset=args.opset,
        dynamic=args.dynamic,
        size_hw=size_hw,
        fp16=args.fp16,
        verify=args.verify,
        verify_sizes=verify_sizes,
        verify_images=images,
    )
    return 0


def run_export_weights(args: argparse.Namespace) -> int:
    from depthkit.export.exporter import load_model
    from depthkit.export.weights import check_out, export_weights

    check_out(args.out, args.layout)  # before loading anything
    model = load_model(checkpoint=args.checkpoint, model=args.model, weights=args.weights)
    result = export_weights(model, args.out, layout=args.layout)
    print(
        f"wrote {result.path} ({result.layout} layout, {model.config.name}, {result.num_tensors} tensors, "
        f"{result.num_bytes / 1e6:.1f} MB); read back: identical"
    )
    print(f"load it with:\n{result.load_hint}")
    return 0
