"""Data-layer throughput, measured side by side in one run.

    python benchmarks/data.py [--num 256] [--size 384 512] [--crop 364] [--out benchmarks/results/data-cpu.csv]

1. Synthetic scene generation, images/s in one process (target >= 50 at 256x256 on one core).
2. The labeled training pipeline (`ShardStream`: tar read, image + target decode, resize, random crop, flip,
   collate) against plain WebDataset decoding of the same shards (`wds.WebDataset(...).decode("rgb8")`, which
   decodes every member and does nothing else). Target: ratio >= 0.8.
3. The student's pseudo-labeled pipeline (`ShardStream(kind="pseudo")`: image and label shards read and paired by
   key, the label decoded, resize, crop, flip, colour jitter / greyscale / blur, collate, CutMix p=0.5), in ms per
   sample, labels written as `depthkit pseudo-label` writes them (`--encoding npz`, a teacher-like map at the
   image's size), against plain WebDataset decoding of the same image and label shards. Reported, no target.
The loops run in this process, best of `--repeat`, so machine noise hits them alike.
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


def write_teacher_like_labels(images: Path, labels: Path) -> None:
    """A label shard per image shard, as the pseudo-labeler writes it: a synthetic scene's disparity with noise in
    its low bits (as a network's float32 output has), at the image's size, `--encoding npz`."""
    import numpy as np

    from depthkit.data.shards import TarWriter, decode_sample, shard_paths
    from depthkit.data.synthetic import render_scene
    from depthkit.pseudo_label.job import encode_label

    try:
        from depthkit.data.tar_reader import iter_raw_samples
    except ImportError:  # a depthkit before session 13 (PYTHONPATH=<old checkout>, for a before/after comparison)
        from depthkit.data.stream import iter_raw_samples

    rng = np.random.default_rng(0)
    labels.mkdir(parents=True, exist_ok=True)
    for url in shard_paths(str(images)):
        writer = TarWriter(labels / Path(url).name)
        for i, raw in enumerate(iter_raw_samples(url)):
            h, w = decode_sample(raw, with_target=False)["image"].shape[:2]
            scene = render_scene(7, i, h, w)
            disparity_HW = np.where(scene["valid"], 1.0 / np.maximum(scene["target"], 1e-3), 0)
            label_HW = (disparity_HW + rng.normal(0, 0.002, disparity_HW.shape)).astype(np.float32)
            meta = {"kind": "pseudo", "output_space": "affine_disparity"}
            writer.add_sample(encode_label(raw["__key__"], label_HW, None, meta))
        writer.close()


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

    with tempfile.TemporaryDirectory() as tmp:
        images, labels = Path(tmp) / "images", Path(tmp) / "labels"
        write_synthetic(images, num=args.num, size=tuple(args.size), shard_size=64, workers=2, labeled=False, seed=1)
        write_teacher_like_labels(images, labels)
        image_urls, label_urls = shard_paths(str(images)), shard_paths(str(labels))

        def plain_student():
            for _ in wds.WebDataset(image_urls, shardshuffle=False).decode("rgb8"):
                pass
            for _ in wds.WebDataset(label_urls, shardshuffle=False).decode():
                pass

        strong = SampleTransform(TransformConfig(crop_size=args.crop, strong=True))

        def student_pipeline():
            stream = ShardStream(
                image_urls, kind="pseudo", labels=str(labels), batch_size=8, transform=strong, cutmix_p=0.5
            )
            for _ in stream:
                pass

        t_plain = best_of(plain_student, args.repeat)
        t_student = best_of(student_pipeline, args.repeat)
    rows.append(("student_pseudo_pipeline_ms_per_sample", 1e3 * t_student / args.num, None, "+strong aug, CutMix"))
    rows.append(("student_pipeline_vs_plain_ratio", t_plain / t_student, None, "plain: images + labels decoded"))

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
