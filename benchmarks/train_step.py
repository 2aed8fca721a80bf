"""Framework overhead of training: `depthkit fit`'s Lightning loop against a minimal PyTorch loop, side by side.

    python benchmarks/train_step.py [--model test_dav2] [--crop 56] [--batch-size 8] [--steps 100] [--log-every 20]
                                    [--repeats 3] [--device cpu] [--out results.csv]

Both loops train the same model (same init), on the same shards through the same `ShardStream`, with the same
loss (`depthkit.losses.DepthLoss`, V2 preset) and AdamW. The Lightning run includes everything `depthkit fit`
does per step (logging every `--log-every` steps as `configs/trainer/gpu_ddp.yaml` does, throughput monitor, LR
schedule). Target: overhead < 10% (ratio >= 0.9). The first `--warmup` steps of each are not timed. The two loops
alternate `--repeats` times; the ratio is the median of the pairs' ratios. On a GPU pass
`--device cuda --model dav2_vits --crop 518`. `--out` appends a row to a CSV.

`--find-syncs N` (CUDA) then runs N more steps of each loop with torch's sync debug mode on and prints, per loop,
every place that made the host wait for the GPU (count and call stack): a step that syncs cannot overlap the next
batch's host work with this one's kernels, which is where a framework loses to a hand-written loop. The fit loop is
watched from the step after its first logging step (N < `--log-every`), from batch transfer to batch transfer.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path


class SyncFinder:
    """Counts the host-device syncs between `start()` and `stop()` by call stack (torch's sync debug mode)."""

    def __init__(self):
        self.stacks: Counter = Counter()

    def start(self) -> None:
        import torch

        self._previous, self._filters = warnings.showwarning, warnings.filters[:]
        warnings.simplefilter("always")
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        import torch

        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning, warnings.filters[:] = self._previous, self._filters

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return self._previous(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename][-6:]
        self.stacks[tuple(f"{f.filename.rsplit('site-packages/', 1)[-1]}:{f.lineno} {f.name}" for f in frames)] += 1

    def report(self, title: str) -> None:
        print(f"host-device syncs in {title}: {sum(self.stacks.values())}")
        for stack, count in self.stacks.most_common(12):
            print(f"  {count:5d} x " + "\n          <- ".join(reversed(stack)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="test_dav2")
    parser.add_argument("--crop", type=int, default=56)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=20, help="the trainer's log_every_n_steps")
    parser.add_argument("--repeats", type=int, default=3, help="alternating (fit, plain) pairs; medians are reported")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="CSV file for the results")
    parser.add_argument("--find-syncs", type=int, default=0, metavar="N", help="CUDA: list host syncs in N steps")
    args = parser.parse_args()
    if args.find_syncs >= args.log_every:
        parser.error(
            f"--find-syncs {args.find_syncs} must be below --log-every {args.log_every}: "
            "the watched steps lie between two logging steps"
        )

    import lightning as L
    import torch

    from depthkit.data.convert import write_synthetic
    from depthkit.data.stream import ShardStream, make_loader
    from depthkit.data.transforms import SampleTransform, TransformConfig
    from depthkit.train import DepthDataModule, DepthModule, ThroughputMonitor

    if args.device == "cpu":
        torch.set_num_threads(1)
    tmp = tempfile.mkdtemp()
    size = (max(96, args.crop + 14), max(128, args.crop + 28))
    write_synthetic(tmp, num=256, size=size, shard_size=32, workers=2)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    # The fit loop's syncs are looked for in the steps after its first logging step (step log_every - 1): values
    # logged there stay in Lightning's bookkeeping and are read again after every later step.
    sync_window = (args.log_every, args.log_every + args.find_syncs)

    class Clock(L.Callback):
        def __init__(self, syncs: SyncFinder | None = None):
            self.syncs = syncs

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == args.warmup:
                sync()  # the warm-up steps' kernels are not timed
                self.start = time.perf_counter()
            if self.syncs is not None and trainer.global_step == sync_window[0]:
                self.syncs.start()
            if self.syncs is not None and trainer.global_step == sync_window[1]:
                self.syncs.stop()

        def on_train_end(self, trainer, pl_module):
            sync()
            self.elapsed = time.perf_counter() - self.start

    def fit_rate(syncs: SyncFinder | None = None) -> float:
        torch.manual_seed(0)
        module = DepthModule(args.model)
        data = DepthDataModule(tmp, batch_size=args.batch_size, crop_size=args.crop, num_workers=0, shuffle_buffer=0)
        clock = Clock(syncs)
        trainer = L.Trainer(
            accelerator=args.device,
            devices=1,
            max_steps=sync_window[1] + 1 if syncs else args.steps + args.warmup,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[clock, ThroughputMonitor()],
            log_every_n_steps=args.log_every,
        )
        trainer.fit(module, data)
        return args.steps * args.batch_size / clock.elapsed

    def plain_rate(syncs: SyncFinder | None = None) -> float:
        torch.manual_seed(0)
        plain = DepthModule(args.model).to(args.device)
        groups = [
            {"params": plain.model.encoder.parameters(), "lr": 5e-6},
            {"params": plain.model.head.parameters(), "lr": 5e-5},
        ]
        optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
        transform = SampleTransform(TransformConfig(crop_size=args.crop))
        stream = ShardStream(tmp, batch_size=args.batch_size, resampled=True, transform=transform)
        # As the fit loop's data module does on CUDA: pinned batches, copied without blocking the host.
        loader = make_loader(stream, num_workers=0, pin_memory=args.device == "cuda")
        start = None
        steps = args.find_syncs if syncs else args.steps
        for step, batch in enumerate(loader):
            if step == args.warmup:
                sync()
                start = time.perf_counter()
                if syncs:
                    syncs.start()
            if step == steps + args.warmup:
                if syncs:
                    syncs.stop()
                break
            batch = {
                k: (v.to(args.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in batch.items()
            }
            out, _ = plain.labeled_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
        sync()
        return steps * args.batch_size / (time.perf_counter() - start)

    # Alternate the two loops and take medians: a shared machine's load drifts over a run.
    rates = [(fit_rate(), plain_rate()) for _ in range(args.repeats)]
    framework = statistics.median(r[0] for r in rates)
    handwritten = statistics.median(r[1] for r in rates)
    ratio = statistics.median(r[0] / r[1] for r in rates)
    print("pairs (fit, plain images/s): " + ", ".join(f"({a:.1f}, {b:.1f})" for a, b in rates))
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (1 thread)"
    print(
        f"device: {device}, model {args.model}, crop {args.crop}, batch {args.batch_size}, {args.steps} timed steps, "
        f"logging every {args.log_every}"
    )
    print(f"{'loop':28s} {'images/s':>10s}")
    print(f"{'depthkit fit (Lightning)':28s} {framework:10.1f}")
    print(f"{'hand-written PyTorch':28s} {handwritten:10.1f}")
    print(f"ratio {ratio:.3f} (target >= 0.9: overhead under 10%) {'ok' if ratio >= 0.9 else 'BELOW TARGET'}")
    if args.find_syncs and args.device == "cuda":
        for name, rate in (("depthkit fit (Lightning)", fit_rate), ("hand-written PyTorch", plain_rate)):
            syncs = SyncFinder()
            rate(syncs)
            syncs.report(f"{name}, {args.find_syncs} steps")
    if args.out:  # appends a row; the header goes into a new file
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        header = ["device", "model", "crop", "batch", "log_every", "fit_images_per_s", "plain_images_per_s", "ratio"]
        new_file = not out.exists() or out.stat().st_size == 0
        with open(out, "a", newline="") as f:
            writer = csv.writer(f)
            if new_file:
                writer.writerow(header)
            row = [device, args.model, args.crop, args.batch_size, args.log_every, framework, handwritten, ratio]
            writer.writerow([f"{v:.4g}" if isinstance(v, float) else v for v in row])


if __name__ == "__main__":
    main()
