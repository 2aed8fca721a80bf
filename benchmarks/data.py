"""Data-layer throughput, measured side by side in one run.

    python benchmarks/data.py [--num 256] [--size 384 512] [--crop 364] [--out benchmarks/results/data-cpu.csv]

1. Synthetic scene generation, images/s in one process (target >= 50 at 256x256 on one core).
2. The labeled training pipeline (`ShardStream`: tar read, image + target decode, resize, random crop, flip,
   collate) against plain WebDataset decoding of the same shards (`wds.WebDataset(...).decode("rgb8")`, which
   decodes every member and does nothing else). Target: ratio >= 0.8.
Both loops run in this process, alternating, best of `--repeat`, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import csv
import platform
import tempfile
import time
from pathlib import Path


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=256, help="samples in the shards")
    parser.add_argument("--size", type=int, nargs=2, default=(384, 512), help="stored image size H W")
    parser.add_argument("--crop", type=int, default=364, help="training crop (multiple of 14)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=None, help="CSV file to write (default: print only)")
    args = parser.parse_args()

    import torch
    import webdataset as wds

    from depthkit.data.convert import write_synthetic
    from depthkit.data.shards import shard_paths
    from depthkit.data.stream import ShardStream
    from depthkit.data.synthetic import render_scene
    from depthkit.data.transforms import SampleTransform, TransformConfig

    torch.set_num_threads(1)
    rows = []
    n_synth = 100
    t = best_of(lambda: [render_scene(0, i, 256, 256) for i in range(n_synth)], args.repeat)
    rows.append(("synthetic_256x256_images_per_s", n_synth / t, 50.0, ""))

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(tmp, num=args.num, size=tuple(args.size), shard_size=64, workers=2)
        urls = shard_paths(tmp)

        def plain():
            for _ in wds.WebDataset(urls, shardshuffle=False).decode("rgb8"):
                pass

        transform = SampleTransform(TransformConfig(crop_size=args.crop))

        def depthkit_pipeline():
            for _ in ShardStream(urls, batch_size=8, transform=transform):
                pass

        t_plain = best_of(plain, args.repeat)
        t_ours = best_of(depthkit_pipeline, args.repeat)
    rows.append(("plain_webdataset_decode_samples_per_s", args.num / t_plain, None, ""))
    rows.append(("depthkit_labeled_pipeline_samples_per_s", args.num / t_ours, None, "decode+resize+crop+flip"))
    rows.append(("pipeline_vs_plain_ratio", t_plain / t_ours, 0.8, ""))

    print(f"machine: {platform.processor() or platform.machine()}, torch threads 1, one process")
    print(f"{'metric':45s} {'value':>10s} {'target':>8s}")
    for name, value, target, note in rows:
        flag = "" if target is None else ("  ok" if value >= target else "  BELOW TARGET")
        print(f"{name:45s} {value:10.2f} {'' if target is None else f'>= {target:g}':>8s}{flag} {note}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["metric", "value", "target", "note"])
            writer.writerows(rows)


if __name__ == "__main__":
    main()
