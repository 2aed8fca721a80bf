"""Check depthkit's models against the official Depth Anything code (V1 or V2), with the same weights.

    git clone https://github.com/DepthAnything/Depth-Anything-V2
    python tools/official_parity.py --official Depth-Anything-V2 --sizes vits,vitb,vitl [--metric]
    python tools/official_parity.py --official Depth-Anything-V2 --sizes vitl --checkpoint depth_anything_v2_vitl.pth
    git clone https://github.com/LiheYoung/Depth-Anything
    python tools/official_parity.py --official Depth-Anything --sizes vits,vitb,vitl

The official model (V2 `DepthAnythingV2`, with `--metric` the one in `metric_depth/`; V1 `DPT_DINOv2` with DINOv2
from the clone's `torchhub/` folder) is imported from your clone; this tool downloads nothing. Without `--checkpoint`
the official model is built with random weights and every parameter is moved off its initial value (layer-scale
gammas, zero biases), so each one matters; the state dict is saved in the official layout and loaded with
`create_model(name, checkpoint_path=...)`, the way users load released weights.

Compared, per size: the forward pass on normalized random inputs at three sizes (square, landscape, portrait), for
V2 the whole inference on a photo (the official `infer_image`, OpenCV resize, against `DepthModel.infer`; V1 has
no such API), and the other direction: depthkit's weights exported with `depthkit export weights --layout official`
load strictly into a fresh official model, every tensor equal. Prints the maximum error relative to the largest
official output and exits 1 above `--tolerance` (forward) or ten times it (inference: OpenCV's and torch's bicubic
resizes differ in rounding).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

# The official constructors' arguments per encoder (their README / run.py `model_configs`).
OFFICIAL_CONFIGS = {
    "vits": {"encoder": "vits", "features": 64, "out_channels": [48, 96, 192, 384]},
    "vitb": {"encoder": "vitb", "features": 128, "out_channels": [96, 192, 384, 768]},
    "vitl": {"encoder": "vitl", "features": 256, "out_channels": [256, 512, 1024, 1024]},
    "vitg": {"encoder": "vitg", "features": 384, "out_channels": [1536, 1536, 1536, 1536]},
}
SIZES_HW = [(518, 518), (364, 644), (644, 308)]


def official_builder(repo: Path, metric: bool):
    """(depthkit name prefix, `build(size, **kwargs)` of the official model) from a clone of either repository."""
    if (repo / "depth_anything_v2" / "dpt.py").is_file():
        root = repo / "metric_depth" if metric else repo
        sys.path.insert(0, str(root))
        from depth_anything_v2.dpt import DepthAnythingV2

        return ("dav2_metric" if metric else "dav2"), lambda size, **kw: DepthAnythingV2(**OFFICIAL_CONFIGS[size], **kw)
    if (repo / "depth_anything" / "dpt.py").is_file() and not metric:
        sys.path.insert(0, str(repo))
        from depth_anything.dpt import DPT_DINOv2

        def build(size, **kw):
            if size == "vitg":
                raise SystemExit("Depth Anything V1 has no vitg")
            cwd = os.getcwd()
            os.chdir(repo)  # V1 loads DINOv2 with torch.hub from `torchhub/`, relative to the working directory
            try:
                return DPT_DINOv2(**OFFICIAL_CONFIGS[size], localhub=True)
            finally:
                os.chdir(cwd)

        return "dav1", build
    raise SystemExit(
        f"--official {repo}: neither depth_anything_v2/dpt.py (Depth-Anything-V2) nor depth_anything/dpt.py "
        "(Depth-Anything, V1; no --metric) found; pass a clone of one of the official repositories"
    )


def check_size(prefix: str, build, size: str, args, workdir: Path) -> float:
    import numpy as np
    import torch
    from PIL import Image

    from depthkit.models import create_model

    name = f"{prefix}_{size}"
    kwargs = {"max_depth": args.max_depth} if args.metric else {}
    official = build(size, **kwargs).eval()
    if args.checkpoint:
        path = Path(args.checkpoint)
        official.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        torch.manual_seed(args.seed)
        with torch.no_grad():
            for p in official.parameters():
                p.add_(torch.randn_like(p) * 0.02)
            official.depth_head.scratch.output_conv2[2].bias.fill_(1.0)  # a random ReLU head may output all zeros
        path = workdir / f"official_{size}.pth"
        torch.save(official.state_dict(), path)
    ours = create_model(name, checkpoint_path=path, **kwargs).eval()

    worst = 0.0
    for hw in SIZES_HW:
        image = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            expected, got = official(image), ours(image)
        if expected.abs().max() < 1e-6:
            raise SystemExit(f"{name}: the official output is all zero at {hw}, which checks nothing")
        rel = ((expected - got).abs().max() / expected.abs().max()).item()
        worst = max(worst, rel)
        print(f"{name} forward {hw[0]}x{hw[1]}: max |official| {expected.abs().max():.4g}, max rel error {rel:.2e}")
    # The other direction: `depthkit export weights --layout official` loads strictly into a fresh official model.
    from depthkit.export.weights import export_weights

    exported = export_weights(ours, workdir / f"exported_{size}.pth", layout="official").path
    fresh = build(size, **kwargs)
    fresh.load_state_dict(torch.load(exported, map_location="cpu", weights_only=True))  # strict
    loaded = fresh.state_dict()
    differ = [k for k, v in official.state_dict().items() if not torch.equal(v, loaded[k])]
    if differ:
        raise SystemExit(f"{name}: exported official weights differ from the official model's: {differ[:5]}")
    print(f"{name} export weights --layout official: strict load into the official model, every tensor equal")
    if not hasattr(official, "infer_image"):
        return worst
    photo = np.asarray(Image.open(args.image).convert("RGB"))
    # The official `image2tensor` sends the image to CUDA or MPS whenever one is there: both models go along.
    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    official.to(device), ours.to(device)
    with torch.no_grad():
        expected = official.infer_image(photo[:, :, ::-1].copy(), args.input_size)  # the official API takes BGR
        got = ours.infer(photo, input_size=args.input_size).values
    infer_rel = float(np.abs(expected - got).max() / max(np.abs(expected).max(), 1e-12))
    print(f"{name} infer {Path(args.image).name} {photo.shape[0]}x{photo.shape[1]}: max rel error {infer_rel:.2e}")
    return max(worst, infer_rel / 10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, type=Path, help="a clone of DepthAnything/Depth-Anything-V2")
    parser.add_argument("--sizes", default="vits", help="comma-separated: vits,vitb,vitl,vitg")
    parser.add_argument("--metric", action="store_true", help="the metric models (metric_depth/)")
    parser.add_argument("--max-depth", type=float, default=20.0, help="metric models: 20 indoor, 80 outdoor")
    parser.add_argument("--checkpoint", default=None, help="official weights for one size instead of random ones")
    parser.add_argument("--image", default=None, help="a photo (default: grace_hopper.jpg, shipped with matplotlib)")
    parser.add_argument("--input-size", type=int, default=518)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in OFFICIAL_CONFIGS]
    if unknown:
        parser.error(f"--sizes: unknown {unknown}; choose from {sorted(OFFICIAL_CONFIGS)}")
    if args.checkpoint and len(sizes) != 1:
        parser.error("--checkpoint holds one size: pass exactly one in --sizes")
    if args.image is None:
        import matplotlib.cbook

        args.image = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    prefix, build = official_builder(args.official.resolve(), args.metric)
    with tempfile.TemporaryDirectory() as tmp:
        worst = max(check_size(prefix, build, size, args, Path(tmp)) for size in sizes)
    ok = worst <= args.tolerance
    print(f"{'PASS' if ok else 'FAIL'}: worst {worst:.2e} (tolerance {args.tolerance:g}; inference counted at 1/10)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
