"""`depthkit eval`: score a model or saved predictions on a benchmark with its published protocol.

    depthkit eval --predictions preds/ --output-space affine_disparity --dataset nyu --data-root /data/nyu
    depthkit eval --model dav2_vits --dataset kitti --data-root /data/kitti --out kitti.json
    depthkit eval --predictions preds/ --output-space metric_depth --dataset ../shared/data/rgbd/manifest.csv

Only argparse is imported at the top; the handler imports the evaluation modules.
"""

from __future__ import annotations

import argparse

CROP_CHOICES = ("none", "eigen_nyu", "garg", "eigen_kitti", "kb_garg", "kb_eigen")  # metrics.CROPS (a test checks)

DATASET_HELP = (
    "benchmark name (nyu, kitti, diode, diode_indoors, diode_outdoor, eth3d, sintel, sintel_clean, da2k) "
    "or a data-layer manifest .csv"
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model or saved predictions on a benchmark (published zero-shot protocols)",
        description="Evaluate depth predictions with a benchmark's published protocol: alignment, depth range, crop "
        "and metrics, all stated in the output. Writes JSON + CSV (summary and per image). See docs/evaluation.md.",
    )
    source = parser.add_argument_group("what to evaluate (one of)")
    source.add_argument("--predictions", metavar="DIR", help="saved predictions named <sample key>.npy or .png")
    source.add_argument("--model", metavar="NAME", help="a depthkit model registry name")
    source.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="weights for --model; a `depthkit fit` checkpoint names its model, so --model may be left out",
    )
    parser.add_argument("--dataset", required=True, metavar="NAME|MANIFEST", help=DATASET_HELP)
    parser.add_argument("--data-root", metavar="DIR", help="local copy of the benchmark (see docs/evaluation.md)")
    parser.add_argument(
        "--split-file",
        metavar="PATH",
        help="another split list for the benchmark's reader (da2k: another annotations JSON)",
    )
    parser.add_argument(
        "--output-space",
        choices=("affine_disparity", "disparity", "metric_depth"),
        help="space of --predictions (required with --predictions; a model's comes from its metadata)",
    )
    parser.add_argument("--png-scale", type=float, help="multiplier from 16-bit PNG predictions to metres")
    parser.add_argument(
        "--alignment",
        default="auto",
        choices=("auto", "lsq_disparity", "lsq_depth", "median", "none"),
        help="per-image alignment; auto = the benchmark's protocol for the output space (printed with results)",
    )
    parser.add_argument(
        "--metric-space",
        default="depth",
        choices=("depth", "disparity"),
        help="score aligned depth (MiDaS/Marigold/BTS, default) or aligned disparity against 1/gt",
    )
    parser.add_argument("--min-depth", type=float, help="override the benchmark's minimum depth (m)")
    parser.add_argument("--max-depth", type=float, help="override the benchmark's maximum depth (m)")
    parser.add_argument("--crop", choices=CROP_CHOICES, help="override the crop")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate the first N samples only")
    parser.add_argument(
        "--out",
        default="results.json",
        metavar="PATH",
        help="result JSON (default: results.json; .json is added when missing: --out nyu writes nyu.json); CSVs "
        "are written beside it",
    )
    parser.add_argument("--worst", type=int, default=0, metavar="N", help="also draw the N worst images (PNG)")
    parser.add_argument("--device", default="auto", help="device for --model: auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--input-size", type=int, default=518, help="model input size (shorter side)")
    parser.add_argument("--batch-size", type=int, default=8, help="model batch size")
    parser.add_argument("--random-weights", action="store_true", help="--model without pretrained weights (smoke)")
    parser.add_argument("--wandb", action="store_true", help="log the per-image table to W&B (offline by default)")
    parser.add_argument("--wandb-project", default="depthkit", help="W&B project")
    parser.add_argument("--wandb-mode", default="offline", choices=("offline", "online"), help="W&B mode")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from depthkit.eval.benchmarks import load_benchmark
    from depthkit.eval.report import format_table, log_wandb, write_results
    from depthkit.eval.runner import FolderPredictor, ModelPredictor, evaluate, load_model

    if (args.predictions is None) == (args.model is None and args.checkpoint is None):
        raise ValueError(
            "give exactly one of --predictions DIR or --model NAME (with --checkpoint PATH for weights; a "
            "`depthkit fit` checkpoint alone names its model)"
        )
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    if args.worst < 0:
        raise ValueError(f"--worst must not be negative, got {args.worst}")

    protocol, items = load_benchmark(args.dataset, args.data_root, split_file=args.split_file)
    if args.limit is not None:
        items = items[: args.limit]

    if args.predictions is not None:
        if args.output_space is None:
            raise ValueError("--predictions needs --output-space (affine_disparity, disparity or metric_depth)")
        predictor = FolderPredictor(args.predictions, output_space=args.output_space, png_scale=args.png_scale)
        for item in items:  # fail before any work when a prediction is missing
            predictor.path_for(item.key, item.name)
    else:
        model = load_model(
            args.model, checkpoint_path=args.checkpoint, pretrained=not args.random_weights, device=args.device
        )
        predictor = ModelPredictor(
            model,
            name=model.meta.name,
            input_size=args.input_size,
            batch_size=args.batch_size,
            checkpoint=args.checkpoint,
        )
        if args.output_space is not None and args.output_space != predictor.output_space:
            raise ValueError(f"--output-space {args.output_space} contradicts the model's {predictor.output_space}")

    result = evaluate(
        items,
        predictor,
        protocol,
        alignment=args.alignment,
        metric_space=args.metric_space,
        min_depth=args.min_depth,
        max_depth=args.max_depth,
        crop=args.crop,
        num_worst=args.worst,
        progress=not args.quiet,
    )
    if result["num_scored"] == 0:
        reasons = sorted({row["status"] for row in result["per_image"] if row.get("status", "ok") != "ok"})
        raise ValueError(
            f"none of the {result['num_skipped']} image(s) could be scored ({'; '.join(reasons[:3])}); check "
            "--min-depth, --max-depth and --crop against the data"
        )
    if protocol.name == "manifest":
        result["dataset"] = args.dataset
    result["data_root"] = args.data_root
    result["limit"] = args.limit
    written = write_results(result, args.out)
    print(format_table(result))
    print("wrote " + ", ".join(str(p) for p in written))
    if args.wandb:
        log_wandb(result, project=args.wandb_project, mode=args.wandb_mode, folder=written[0].parent)
    return 0
