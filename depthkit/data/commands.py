"""`depthkit data convert` and `depthkit synth`."""

from __future__ import annotations

import argparse
import re


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="convert real data into shards")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    convert = data_sub.add_parser(
        "convert",
        help="manifest CSV -> labeled shards, or a folder of photos -> unlabeled shards",
        description="Convert a manifest of RGB-D pairs (docs/data.md) into labeled shards, or a folder of photos "
        "(recursive; jpg/png/ppm/webp/...) into unlabeled shards.",
    )
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="CSV with source,rgb,depth,depth_format,scale_to_metres,... columns")
    source.add_argument("--images", help="folder of photos (searched recursively)")
    convert.add_argument("--out", required=True, help="output folder for the shards")
    convert.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    convert.add_argument("--prefix", default="shard", help="shard file name prefix")
    convert.add_argument("--licence", default="", help="licence tag stored in each sample's metadata")
    convert.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="stop at the first bad input (default) or skip and count it",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    convert.set_defaults(func=run_convert)

    synth = subparsers.add_parser(
        "synth",
        help="procedural RGB-D scenes as shards",
        description="Render procedural RGB-D scenes with exact depth into labeled (or unlabeled) shards.",
    )
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--num", type=int, required=True, help="number of scenes")
    synth.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"), help="image size")
    synth.add_argument("--seed", type=int, default=0, help="scene sequence seed")
    synth.add_argument("--first-index", type=int, default=0, help="index of the first scene in the sequence")
    synth.add_argument("--unlabeled", action="store_true", help="write images only (unlabeled shards)")
    synth.add_argument("--shard-size", type=int, default=1000, help="scenes per shard")
    synth.add_argument("--image-format", choices=("jpg", "png"), default="jpg", help="image encoding (default jpg)")
    synth.add_argument("--workers", type=int, default=1, help="processes rendering shards in parallel")
    synth.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    synth.set_defaults(func=run_synth)


def _check_out(out, overwrite: bool) -> None:
    """Before any input is read: `--out` may be written (a folder without shards, or `--overwrite`)."""
    from pathlib import Path

    from depthkit.data.convert import check_out_dir

    check_out_dir(Path(out), overwrite, ("--out", "--overwrite"))


def _check_positive(args: argparse.Namespace, *names: str, minimum: int = 1) -> None:
    for name in names:
        value = getattr(args, name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v < minimum:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {v}")


def run_convert(args: argparse.Namespace) -> int:
    from depthkit.data.convert import convert_images, convert_manifest

    _check_positive(args, "shard_size")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.prefix):
        raise ValueError(f"--prefix {args.prefix!r}: use letters, digits, '_', '.' and '-' (a file name, not a path)")
    _check_out(args.out, args.overwrite)
    if args.manifest:
        index = convert_manifest(
            args.manifest,
            args.out,
            shard_size=args.shard_size,
            prefix=args.prefix,
            licence=args.licence,
            on_error=args.on_error,
            overwrite=args.overwrite,
        )
    else:
        index = convert_images(
            args.images,
            args.out,
            shard_size=args.shard_size,
            prefix=args.prefix,
            licence=args.licence,
            on_error=args.on_error,
            overwrite=args.overwrite,
        )
    print(
        f"wrote {index['num_samples']} {index['kind']} samples in {len(index['shards'])} shard(s) to {args.out}"
        + (f"; skipped {len(index['skipped'])} bad input(s)" if index["skipped"] else "")
    )
    for message in index["skipped"][:10]:
        print(f"  skipped: {message}")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from depthkit.data.convert import write_synthetic

    _check_positive(args, "num", "size", "shard_size", "workers")
    _check_positive(args, "seed", "first_index", minimum=0)
    if args.seed >= 2**32 or args.first_index + args.num > 2**32:  # SeedSequence([seed, index]) words are 32-bit
        raise ValueError("--seed and --first-index + --num must stay below 2**32")
    _check_out(args.out, args.overwrite)
    index = write_synthetic(
        args.out,
        num=args.num,
        size=tuple(args.size),
        seed=args.seed,
        first_index=args.first_index,
        labeled=not args.unlabeled,
        shard_size=args.shard_size,
        image_format=args.image_format,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    print(
        f"wrote {index['num_samples']} synthetic {index['kind']} scenes in {len(index['shards'])} shard(s) "
        f"to {args.out} ({index['images_per_second']:.1f} images/s)"
    )
    return 0
