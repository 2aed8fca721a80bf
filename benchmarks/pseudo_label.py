"""Pseudo-labeling throughput, measured side by side in one process.

    python benchmarks/pseudo_label.py --quick                       # CPU, tiny model, CI-sized (a minute or two)
    python benchmarks/pseudo_label.py --model dav2_vitl --device cuda --num 1024 --size 480 640 --batch-size 32

1. **Pure forward**: the model alone over pre-decoded, pre-resized, normalized batches already on the device (the
   same buckets and batch size as the job). The ceiling. Also reported: the same batches through `label_batch`
   from pre-decoded uint8 images on the device (adds the official resize in and the resize back out), which
   separates the cost of preprocessing from how well decoding and writing overlap.
2. **Full job**: `depthkit.pseudo_label.label_shards` over the same images in shards: tar read, decode (workers),
   bucketing, resize, forward, resize back, label encoding, tar writing, records and index. Target: >= 0.8 of (1),
   i.e. decoding and writing overlap the forward passes. Run once per `--encoding` (default: npz and f16; at GPU
   speed the encoding is the job's largest CPU cost).
3. **One image at a time**, like the official `run.py`: read a sample, decode it, `model.infer` on it alone (the
   official preprocessing), encode the label (the first `--encoding`) and append it to a tar, then the next.
   Target: the job with the same encoding >= 10x this on a GPU (batching); on a CPU batching buys little, so
   expect far less there. Measured in the job's precision, and on bf16 runs also in fp32 as `run.py` runs it (no
   autocast): the job against that is the issue's "like the official script" ratio.

Weights are random (seeded): speed does not depend on them and nothing is downloaded. Images are procedural
scenes of one size, stored as JPEG. On CUDA the results go to `benchmarks/results/pseudo_label-<gpu>.csv`.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import platform
import re
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized CPU run with the tiny model")
    parser.add_argument("--model", default="dav2_vits", help="registered model name")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--num", type=int, default=512, help="images")
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"), help="image size")
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=518)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--tta", default="none", choices=("none", "hflip"))
    parser.add_argument("--encoding", default="npz,f16", help="label encodings to run the job with, comma-separated")
    parser.add_argument("--num-workers", type=int, default=8, help="decoding processes of the job")
    parser.add_argument("--num-encoders", type=int, default=8, help="encoding threads of the job")
    parser.add_argument("--single-num", type=int, default=None, help="images for the one-at-a-time loop")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs of each loop")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="CSV file (default on CUDA: benchmarks/results/...)")
    args = parser.parse_args()
    if args.quick:
        args.model, args.num, args.size, args.shard_size = "test_dav2", 48, (96, 128), 12
        args.resolution, args.batch_size, args.num_workers, args.num_encoders = 98, 8, 0, 1
        args.device = "cpu" if args.device == "auto" else args.device
        args.threads = args.threads or 1

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from depthkit.data.convert import write_synthetic
    from depthkit.data.shards import TarWriter, decode_sample, shard_paths
    from depthkit.data.tar_reader import iter_raw_samples
    from depthkit.devices import torch_device
    from depthkit.models import create_model, save_checkpoint
    from depthkit.pseudo_label.job import ENCODINGS, PseudoLabelConfig, encode_label, label_shards
    from depthkit.pseudo_label.teacher import label_batch, network_size

    encodings = args.encoding.split(",")
    if not encodings or not set(encodings) <= set(ENCODINGS):
        parser.error(f"--encoding {args.encoding!r}: expected a comma-separated list of {', '.join(ENCODINGS)}")
    device = torch_device(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    bf16 = precision == "bf16"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic(tmp / "in", num=args.num, size=tuple(args.size), labeled=False, shard_size=args.shard_size,
                        workers=4)  # fmt: skip
        urls = shard_paths(str(tmp / "in"))
        torch.manual_seed(0)
        model = create_model(args.model)
        save_checkpoint(model, tmp / "teacher.pth")
        model = model.to(device).eval().requires_grad_(False)

        # Pre-decoded, pre-resized, normalized batches on the device, bucketed like the job.
        images = [decode_sample(raw)["image"] for url in urls for raw in iter_raw_samples(url)]
        buckets: dict[tuple[int, int], list] = {}
        for image_HW3 in images:
            buckets.setdefault(network_size(*image_HW3.shape[:2], args.resolution, 14), []).append(image_HW3)
        from depthkit.models.preprocess import resize_image

        batches, uint8_batches = [], []
        for size_hw, members in buckets.items():
            for start in range(0, len(members), args.batch_size):
                chunk = [torch.tensor(m, device=device) for m in members[start : start + args.batch_size]]
                uint8_batches.append((size_hw, chunk))
                x = torch.stack([resize_image(m.permute(2, 0, 1).float() / 255, size_hw) for m in chunk])
                batches.append(model.normalize(x))

        def label_batch_loop():
            for size_hw, chunk in uint8_batches:
                label_batch(model, chunk, size_hw, tta=args.tta, bf16=bf16, size="network")  # as the job
            sync()

        def forward_loop():
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                for x in batches:
                    model(x)
                    if args.tta == "hflip":
                        model(x.flip(-1))
            sync()

        def warmup():
            first = torch.from_numpy(images[0].copy())
            size_hw = network_size(*images[0].shape[:2], args.resolution, 14)
            batch = [first] * min(args.batch_size, len(images))
            label_batch(model, batch, size_hw, tta=args.tta, bf16=bf16, size="network")
            sync()

        warmup()

        config = dict(
            inputs=(str(tmp / "in"),), model=args.model, checkpoint=str(tmp / "teacher.pth"),
            resolution=args.resolution, batch_size=args.batch_size, tta=args.tta, precision=precision,
            device=device.type, num_workers=args.num_workers, num_encoders=args.num_encoders, progress=False,
        )  # fmt: skip
        runs = {"forward": [], "label_batch": [], "single": []}

        def job(r, encoding):
            start = time.perf_counter()
            out = tmp / f"out_{encoding}{r}"
            summary = label_shards(PseudoLabelConfig(output=str(out), encoding=encoding, **config))
            runs.setdefault(f"wall_{encoding}", []).append(time.perf_counter() - start)
            runs.setdefault(f"job_{encoding}", []).append(summary.seconds)
            assert summary.num_labeled == args.num, summary

        single_num = min(args.single_num or args.num, args.num)

        def single_loop(autocast_bf16: bool = bf16):
            tar = TarWriter(tmp / "single.tar")
            raws = (raw for url in urls for raw in iter_raw_samples(url))
            for raw in itertools.islice(raws, single_num):
                image = decode_sample(raw)["image"]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                    pred = model.infer(image, input_size=args.resolution)
                meta = {"kind": "pseudo", "output_space": model.meta.output_space}
                tar.add_sample(encode_label(raw["__key__"], pred.values, None, meta, encoding=encodings[0]))
            tar.close()

        for r in range(args.repeat):  # alternating, so machine noise hits every loop alike; best of each
            runs["forward"].append(timed(forward_loop))
            runs["label_batch"].append(timed(label_batch_loop))
            for encoding in encodings:
                job(r, encoding)
            runs["single"].append(timed(single_loop) / single_num * args.num)  # per-image time, scaled to --num
            if bf16:  # the official run.py: fp32
                runs.setdefault("single_fp32", []).append(timed(lambda: single_loop(False)) / single_num * args.num)
        best = {name: min(times) for name, times in runs.items()}
        t_forward, t_label, t_single = best["forward"], best["label_batch"], best["single"]

        # Encoding cost per label at the image size, on a smooth map (what a teacher predicts), one thread.
        meta = {"kind": "pseudo", "output_space": "affine_disparity"}
        smooth_HW = np.add.outer(np.linspace(0.1, 1, args.size[0]), np.linspace(0, 0.5, args.size[1])).astype("f4")
        smooth_HW += np.random.default_rng(0).normal(0, 1e-3, smooth_HW.shape).astype("f4")
        encode = {}
        for encoding in ENCODINGS:
            start = time.perf_counter()
            members = [encode_label("k", smooth_HW, None, meta, encoding=encoding) for _ in range(4)]
            encode[encoding] = ((time.perf_counter() - start) / 4 * 1000, sum(map(len, members[0].values())) / 1e6)

    rows = [
        ("pure_forward_images_per_s", args.num / t_forward, None, "pre-decoded batches on the device"),
        ("label_batch_images_per_s", args.num / t_label, None, "pre-decoded uint8 on the device: + resize in/out"),
        (
            "one_at_a_time_images_per_s",
            args.num / t_single,
            None,
            f"like run.py, {encodings[0]} labels, measured on {single_num} images",
        ),  # fmt: skip
    ]
    if "single_fp32" in best:
        rows.append(
            ("one_at_a_time_fp32_images_per_s", args.num / best["single_fp32"], None, "the same in fp32, as run.py")
        )
    for encoding in encodings:
        t_job, t_wall = best[f"job_{encoding}"], best[f"wall_{encoding}"]
        rows += [
            (f"job_images_per_s_{encoding}", args.num / t_job, None, "read, decode, label, encode, write"),
            (f"job_images_per_s_incl_startup_{encoding}", args.num / t_wall, None, "plus teacher load, worker start"),
            (f"job_vs_pure_forward_ratio_{encoding}", t_forward / t_job, 0.8, ""),
            (f"job_vs_label_batch_ratio_{encoding}", t_label / t_job, None, "how well decode / encode / write overlap"),
        ]
    rows += [
        (
            f"job_vs_one_at_a_time_ratio_{encodings[0]}",
            t_single / best[f"job_{encodings[0]}"],
            10.0 if device.type == "cuda" else None,
            "both write the same labels; target on GPU only",
        ),  # fmt: skip
    ]
    if "single_fp32" in best:
        official = best["single_fp32"] / best[f"job_{encodings[0]}"]
        target = 10.0 if device.type == "cuda" else None
        rows.append((f"job_vs_official_loop_ratio_{encodings[0]}", official, target, "the loop in fp32, as run.py"))
    rows += [
        *[
            (f"{enc}_encode_ms_per_image", ms, None, f"{args.size[0]}x{args.size[1]}: {mb:.2f} MB per label")
            for enc, (ms, mb) in encode.items()
        ],
    ]
    setup = (
        f"model {args.model}, device {device_name}, {args.num} images {args.size[0]}x{args.size[1]} jpg, "
        f"resolution {args.resolution}, batch {args.batch_size}, {precision}, tta {args.tta}, {args.encoding}, "
        f"workers {args.num_workers}, encoders {args.num_encoders}, torch threads {torch.get_num_threads()}"
    )
    print(setup)
    print(f"{'metric':36s} {'value':>10s} {'target':>8s}")
    for name, value, target, note in rows:
        flag = "" if target is None else ("  ok" if value >= target else "  BELOW TARGET")
        print(f"{name:36s} {value:10.2f} {'' if target is None else f'>= {target:g}':>8s}{flag}  {note}")
    out = args.out
    if out is None and device.type == "cuda":
        out = (
            Path(__file__).resolve().parent
            / f"results/pseudo_label-{re.sub(r'[^A-Za-z0-9]+', '_', device_name).strip('_')}.csv"
        )
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["metric", "value", "target", "note", "setup"])
            writer.writerows([(*row, setup) for row in rows])
        print(f"wrote {out}")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
