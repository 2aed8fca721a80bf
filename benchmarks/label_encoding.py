"""Pseudo-label encodings side by side: stored size, write and read time per label, on one CPU thread.

A teacher-like map: a synthetic scene's disparity at the network's resolution with noise in its low bits (as a
network's float32 output has), bilinearly upsampled to the image's size as the pseudo-labeler does. Each
`--encoding` of `depthkit pseudo-label` is written with the job's own `encode_label` and read back with the
student's `decode_sample`; `npz-whole` is the float32 array deflated whole (how `npz` stored labels before byte
planes), for the ratio.

    python benchmarks/label_encoding.py [--height 480 --width 640] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def teacher_like_map(height: int, width: int, seed: int = 0) -> np.ndarray:
    from depthkit.data.synthetic import render_scene

    scene = render_scene(seed, 0, 518, (518 * width // height) // 14 * 14)  # a network's input, short side 518
    disparity = np.where(scene["valid"], 1.0 / np.maximum(scene["target"], 1e-3), 0).astype(np.float32)
    noisy = torch.from_numpy(disparity) + 0.002 * torch.randn(
        disparity.shape, generator=torch.Generator().manual_seed(seed)
    )
    up = torch.nn.functional.interpolate(noisy[None, None], size=(height, width), mode="bilinear", align_corners=False)
    return up[0, 0].numpy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--repeat", type=int, default=7, help="runs per timing; the best is reported")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from depthkit.data.shards import decode_sample, encode_target
    from depthkit.pseudo_label.job import ENCODINGS, encode_label

    label_HW = teacher_like_map(args.height, args.width)
    meta = {"kind": "pseudo", "output_space": "affine_disparity", "format_version": 1}

    def best(fn) -> tuple[float, object]:
        times, out = [], None
        for _ in range(args.repeat):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return min(times), out

    def whole() -> dict[str, bytes]:
        ext, data = encode_target(label_HW, np.isfinite(label_HW), compress_level=1)
        return {f"k.{ext}": data, "k.json": json.dumps(meta).encode()}

    writers = {"npz-whole": whole} | {
        name: (lambda name=name: encode_label("k", label_HW, None, dict(meta), encoding=name)) for name in ENCODINGS
    }
    rows = {}
    for name, write in writers.items():
        write_s, members = best(write)
        raw = {"__key__": "k", "__url__": "bench"} | {key.split(".", 1)[1]: value for key, value in members.items()}
        read_s, sample = best(lambda raw=raw: decode_sample(raw))
        size = sum(len(value) for key, value in members.items() if not key.endswith(".json"))
        error = float(np.max(np.abs(sample["target"] - label_HW)))
        rows[name] = (size, write_s, read_s, error)
    print(f"label {args.height}x{args.width} float32 ({label_HW.nbytes / 1e6:.2f} MB raw), best of {args.repeat}")
    print(f"{'encoding':>10} {'MB':>6} {'% raw':>6} {'write ms':>9} {'read ms':>8} {'max abs error':>14}")
    for name, (size, write_s, read_s, error) in rows.items():
        print(
            f"{name:>10} {size / 1e6:6.2f} {100 * size / label_HW.nbytes:6.0f} {1e3 * write_s:9.1f} "
            f"{1e3 * read_s:8.1f} {error:14.2e}"
        )
    size, write_s, read_s, _ = rows["npz-whole"]
    npz = rows["npz"]
    print(
        f"npz (byte planes) vs npz-whole: size {npz[0] / size:.2f}x, write {write_s / npz[1]:.1f}x faster, "
        f"read {read_s / npz[2]:.1f}x faster"
    )


if __name__ == "__main__":
    main()
