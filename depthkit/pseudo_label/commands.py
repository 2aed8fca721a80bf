"""`depthkit pseudo-label`: label image shards with a teacher, resumably, on one or many GPUs / nodes.

Only argparse is imported at module level; the handler imports torch and the models lazily.
"""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pseudo-label",
        help="label image shards with a teacher (batched, multi-GPU, resumable)",
        description="Run a teacher over unlabeled shards and write one pseudo-label shard per input shard (same "
        "file name, same keys, failed keys left out), with provenance in every sample and an index.json. "
        "Rerunning the same command resumes: finished shards are skipped. Multi-GPU: --devices N spawns N "
        "processes, or launch one process per GPU with torchrun / srun. See docs/pseudo_labeling.md.",
    )
    teacher = parser.add_argument_group("teacher")
    teacher.add_argument(
        "--model",
        help="teacher architecture, a registered model name (e.g. dav2_vitl); a `depthkit fit` checkpoint "
        "names its own",
    )
    teacher.add_argument(
        "--checkpoint",
        help="teacher checkpoint (`depthkit fit` .ckpt, official .pth, depthkit .pth/.safetensors, HF folder)",
    )
    teacher.add_argument(
        "--weights", help="weights for --model (default: its official file from the local checkpoint folder)"
    )
    parser.add_argument(
        "--input", nargs="+", required=True, metavar="SHARDS", help="input shards: folders, globs, brace patterns"
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder for the label shards")
    parser.add_argument(
        "--resolution",
        type=int,
        default=518,
        help="short side of the network input, rounded to the patch size (default 518)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--tta", choices=("none", "hflip"), default="none", help="test-time augmentation")
    parser.add_argument(
        "--confidence", action="store_true", help="write KEY.confidence.png from the flip disagreement (needs hflip)"
    )
    parser.add_argument(
        "--encoding",
        choices=("npz", "f16", "png16"),  # job.ENCODINGS (not imported: it pulls in torch)
        default="npz",
        help="npz: float32 byte planes, lossless (default); f16: float16 npz, ~2.4x smaller; "
        "png16: rounded to 1/65535 of each image's max (see docs/pseudo_labeling.md)",
    )
    parser.add_argument(
        "--label-size",
        choices=("network", "image"),  # teacher.LABEL_SIZES
        default="network",
        help="network: images larger than the network input get labels at its output size, the prediction itself "
        "(default; the student resizes labels with their images); image: every label at its image's size",
    )
    parser.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: CUDA if present")
    parser.add_argument(
        "--devices", type=int, default=None, help="processes per node (GPUs; on CPU: processes); default 1"
    )
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes in the job (default 1)")
    parser.add_argument("--node-rank", type=int, default=None, help="this node's rank (default: NODE_RANK etc.)")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="decoding processes per rank (default 4, or the CPU count if smaller)",
    )
    parser.add_argument(
        "--num-encoders",
        type=int,
        default=4,
        help="label-encoding threads per rank (default 4); on a GPU, images/s x ms per label / 1000 of them "
        "keep up (see docs/pseudo_labeling.md)",
    )
    parser.add_argument(
        "--allow-mixed-teachers",
        action="store_true",
        help="add shards labeled with another teacher or settings to an output that already holds some",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_pseudo_label_command)


def run_pseudo_label_command(args: argparse.Namespace) -> int:
    from depthkit.pseudo_label.job import PseudoLabelConfig
    from depthkit.pseudo_label.launch import run_pseudo_label

    config = PseudoLabelConfig(
        inputs=tuple(args.input),
        output=args.output,
        model=args.model,
        checkpoint=args.checkpoint,
        weights=args.weights,
        resolution=args.resolution,
        batch_size=args.batch_size,
        tta=args.tta,
        confidence=args.confidence,
        encoding=args.encoding,
        label_size=args.label_size,
        precision=args.precision,
        device=args.device,
        num_workers=args.num_workers,
        num_encoders=args.num_encoders,
        allow_mixed_teachers=args.allow_mixed_teachers,
        progress=not args.no_progress,
    )
    summary = run_pseudo_label(config, devices=args.devices, num_nodes=args.num_nodes, node_rank=args.node_rank)
    index = summary.index or {}
    ranks = summary.ranks
    who = "" if len(ranks) != 1 or ranks[0].world_size == 1 else f"rank {ranks[0].rank}/{ranks[0].world_size}: "
    print(
        f"{who}labeled {summary.num_labeled} image(s) in {summary.num_shards_labeled} shard(s) "
        f"({summary.num_labeled / max(summary.seconds, 1e-9):.1f} images/s), "
        f"skipped {summary.num_skipped} in {summary.num_shards_skipped} finished shard(s), "
        f"failed {summary.num_failed}"
    )
    if index:
        pending = len(index.get("pending", []))
        state = "complete" if index.get("complete") else f"{pending} shard(s) pending (other ranks, or rerun)"
        print(
            f"output {config.output}: {index['num_samples']} label(s) in {len(index['shards'])} shard(s), "
            f"{index['num_failed']} failed key(s)"
            + (
                f" and {index['num_cut_short']} shard(s) cut short by an unreadable tar"
                if index["num_cut_short"]
                else ""
            )
            + f" listed in index.json; {state}"
        )
        if index["num_samples"] == 0 and (index["num_failed"] or index["num_cut_short"]):
            raise ValueError(
                f"no input image could be labeled ({index['num_failed']} failed, {index['num_cut_short']} shard(s) "
                f"unreadable; the errors are in {config.output}/index.json); are the inputs image shards?"
            )
    return 0
