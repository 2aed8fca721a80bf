"""Streaming shards into training batches: split across nodes and workers, shuffled, resumable.

    stream = ShardStream("data/labeled/{000000..000099}.tar", kind="labeled", batch_size=8,
                         transform=SampleTransform(TransformConfig(crop_size=518)), shuffle_buffer=1000)
    loader = make_loader(stream, num_workers=4)
    state = StreamState()
    for batch in loader:
        state.update(batch)          # after the step that used the batch
    ...
    stream = ShardStream(..., resume=state.state_dict())   # continues where it stopped

Splitting. Shards go round-robin to the `world_size * num_workers` global workers (global worker
`rank * num_workers + worker_id`), after a permutation seeded by `(seed, epoch)`. So in one epoch every shard is
read exactly once across all ranks and workers. Rank and world size come from the arguments, else from
`torch.distributed`, else from the `RANK`/`WORLD_SIZE` environment (torchrun, `fabric run`, SLURM via Lightning).
With fewer shards than global workers some workers idle; give at least `world_size * num_workers` shards.

Epochs. Each pass over a stream is its next epoch (new shard order, shuffle and augmentation), as each pass of a
DataLoader with a random sampler is: the first pass is epoch 0, or the resumed state's epoch, or `set_epoch`'s.
`make_loader`'s loader starts the pass in the main process, before its workers copy the stream.

Resampled mode (`resampled=True`) never ends: the mode for step-based training, where ranks must never run dry at
different times. Its shard order is an endless run of sweeps, each a new permutation of all shards (seeded by
`(seed, epoch, sweep)`), concatenated and dealt round-robin to the global workers: every shard is dealt once in each
sweep across all ranks and workers, as in one epoch, and a worker whose turn falls in the next sweep simply reads
on (workers read at the same rate in samples, so with unequal shards, or a shard count that is no multiple of the
workers, one starts the next sweep while others finish theirs). Drawing shards with replacement, as webdataset's
`resampled` does, never reads 37% of the shards in a run as long as one sweep: the Depth Anything V1 student's one
pass over its 62M unlabeled images.

Resuming. Each batch carries `__worker__` (global worker id) and `__consumed__` (raw samples that worker has
taken from its shards so far, skipped ones included). `StreamState.update(batch)` records them after the batch is
used; a stream built with `resume=state.state_dict()` makes each worker replay its deterministic order and drop
that many raw samples before decoding. The resumed run then yields exactly the batches the uninterrupted run
would have yielded next (augmentation is seeded per sample and draw, see `transforms.py`), and its later passes
are the later epochs, as long as the topology (world size, workers) is unchanged; with another topology it
refuses, rather than silently repeating data. With the shards' sample counts (the `index.json` depthkit's writers
and the pseudo-labeler leave beside them) a worker steps over what it consumed by position, reading only the
samples still in its shuffle buffer: a resampled stream's position covers the whole run. Without counts (URLs,
shards made by other tools) it reads, without decoding, what it skips.

Bad samples. Corrupt tar members, undecodable images, missing or mis-sized targets raise `ShardFormatError`
naming the shard and key; with `on_error="skip"` the sample is dropped and counted in the batch's `__skipped__`
(per worker, cumulative), which `StreamState` sums for logging.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from depthkit.data.cutmix import cutmix_boxes, paste_boxes
from depthkit.data.shards import (
    KINDS,
    ShardFormatError,
    decode_sample,
    index_sample_counts,
    label_shard_url,
    shard_paths,
)
from depthkit.data.tar_reader import iter_raw_samples

log = logging.getLogger("depthkit.data")


def topology(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """`(rank, world_size)` from the arguments, torch.distributed, or the launcher's environment."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class BatchMeta:
    """The per-sample metadata of a batch: a read-only sequence that collection walkers treat as one leaf.

    Lightning's `apply_to_collection` (device moves, batch-size inference) and the DataLoader's `default_convert`
    recurse into every list and dict of a batch, several times a step. A batch's JSON metadata holds hundreds of
    small items and no tensor: walking it took ~2% of a tiny model's step on CPU (a quarter of Lightning's
    collection-walk calls, profiled with `benchmarks/train_step.py`'s setting). Not a `list` (nor a registered
    `Sequence`), so the walkers stop here.
    """

    __slots__ = ("_items",)

    def __init__(self, items) -> None:
        self._items = tuple(items)

    def __getitem__(self, index):
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def __eq__(self, other) -> bool:
        return list(self._items) == list(other) if isinstance(other, (BatchMeta, list, tuple)) else NotImplemented

    def __repr__(self) -> str:
        return f"BatchMeta({list(self._items)!r})"


def collate(samples: list[dict]) -> dict:
    """Stack samples into a batch: `image` uint8 `B×3×H×W`, `target` float32 and `valid` bool `B×H×W`, and `sky`
    bool `B×H×W` when any sample has a sky mask (False for those without)."""
    batch: dict = {
        "key": [s["__key__"] for s in samples],
        "meta": BatchMeta(s["meta"] for s in samples),
        # B×H×W×3 storage viewed as B×3×H×W (channels-last layout; `.float()` on the device makes it dense)
        "image": torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2),
    }
    if "image_strong" in samples[0]:
        strong = np.stack([s["image_strong"] for s in samples])
        batch["image_strong"] = torch.from_numpy(strong).permute(0, 3, 1, 2)
    if "target" in samples[0]:
        batch["target"] = torch.from_numpy(np.stack([s["target"] for s in samples]))
        batch["valid"] = torch.from_numpy(np.stack([s["valid"] for s in samples]))
        if any("sky" in s for s in samples):
            batch["sky"] = torch.from_numpy(np.stack([s.get("sky", np.zeros_like(s["valid"])) for s in samples]))
    return batch


class ShardStream(IterableDataset):
    """An iterable of collated batches from WebDataset shards; see the module docstring.

    Args:
        shards: Folder, glob, brace pattern, URL(s) (`http(s)://`, `pipe:`), or a list of them.
        kind: "labeled", "unlabeled", or "pseudo" (unlabeled images paired with pseudo-label shards).
        batch_size: Samples per batch (per worker batch; the loader does not re-batch).
        transform: Per-sample transform (e.g. `SampleTransform`); None keeps decoded arrays as they are.
        labels: For kind "pseudo": folder of pseudo-label shards with the same file names as `shards`.
        shuffle_buffer: Samples in the shuffle buffer; 0 keeps shard order.
        resampled: Never end: sweep the shards again and again, each sweep a new order (step-based training).
        seed: Seeds shard order, shuffling, CutMix and (through the transform) augmentation.
        on_error: "raise" or "skip" (count) bad samples.
        cutmix_p: Per-sample CutMix probability for `image_strong` (0 disables).
        drop_last: Drop a worker's last incomplete batch.
        rank: This process's rank; None reads it from torch.distributed or the environment.
        world_size: Number of ranks; None as above.
        resume: A `StreamState.state_dict()` to continue from.
        advance_epoch: Make each pass after the first the next epoch; False repeats the same pass (evaluation:
            the same order each time).
    """

    def __init__(
        self,
        shards,
        *,
        kind: str = "labeled",
        batch_size: int = 8,
        transform=None,
        labels: str | None = None,
        shuffle_buffer: int = 0,
        resampled: bool = False,
        seed: int = 0,
        on_error: str = "raise",
        cutmix_p: float = 0.0,
        drop_last: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        resume: dict | None = None,
        advance_epoch: bool = True,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r}; expected 'raise' or 'skip'")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not 0.0 <= cutmix_p <= 1.0:
            raise ValueError(f"cutmix_p={cutmix_p} is not a probability in [0, 1]")
        if (rank is None) != (world_size is None):  # the other would come from the environment: rarely meant
            raise ValueError(f"rank={rank}, world_size={world_size}: give both, or neither (torch.distributed's)")
        if world_size is not None and (world_size < 1 or not 0 <= rank < world_size):
            raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
        if kind == "pseudo" and not labels:
            raise ValueError("kind='pseudo' needs labels= (the folder of pseudo-label shards)")
        self.urls = shard_paths(shards)
        self.label_urls = [label_shard_url(labels, url) for url in self.urls] if kind == "pseudo" else None
        self.kind, self.batch_size, self.transform = kind, batch_size, transform
        self.shuffle_buffer, self.resampled, self.seed = shuffle_buffer, resampled, seed
        self.on_error, self.cutmix_p, self.drop_last = on_error, cutmix_p, drop_last
        self.rank, self.world_size = rank, world_size
        self.resume = resume
        self.epoch = int(resume.get("epoch", 0)) if resume else 0  # the epoch of the next pass
        self._passes = 0  # passes started since construction or `set_epoch`
        self.advance_epoch = advance_epoch
        self._bad_shards = 0  # corrupt shards read in this pass (a worker's count)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch `epoch` (otherwise each pass after the first is the next epoch)."""
        self.epoch, self._passes = epoch, 0

    def start_pass(self) -> None:
        """Begin a pass over the stream, in the main process: the first is epoch `self.epoch`, each later one the next
        epoch (a new shard order, shuffle and augmentation), like a DataLoader's random sampler. The resume state
        belongs to the first pass only.

        Iterating the stream in the main process calls it; `make_loader`'s loader calls it before its workers
        start. Lightning calls neither a dataset's `set_epoch` nor anything else per epoch: this is what gives a
        run of several epochs new ones.
        """
        if self._passes:
            self.epoch, self.resume = self.epoch + (1 if self.advance_epoch else 0), None
        self._passes += 1

    def __getstate__(self) -> dict:
        # A worker started by spawn or forkserver has no process group and may have no RANK in its environment:
        # the parent, pickling the stream for it, resolves the topology (a forked worker inherits the parent's).
        state = dict(self.__dict__)
        if state["rank"] is None:
            state["rank"], state["world_size"] = topology()
        return state

    # -- iteration, inside a worker ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is None:
            self.start_pass()
        worker_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        rank, world_size = topology(self.rank, self.world_size)
        # The DataLoader asks its workers round-robin from worker 0; a resumed stream rotates the logical worker
        # ids so that the worker whose turn was next when the state was saved answers first.
        rotation = int(self.resume.get("next_worker", 0)) if self.resume and self._same_epoch() else 0
        global_worker = rank * num_workers + (worker_id + rotation) % num_workers
        total_workers = world_size * num_workers
        if not self.resampled and world_size > 1 and len(self.urls) <= rank * num_workers:
            # The other ranks would wait for this one in their next collective, for ever.
            raise ValueError(
                f"{self.kind} stream: {len(self.urls)} shard(s) for {world_size} ranks x {num_workers} loader "
                f"worker(s): rank {rank} has none to read; give at least {total_workers} shards, fewer workers, "
                "or resampled=True"
            )
        skip = self._resume_skip(global_worker, total_workers)
        consumed, skipped = 0, self._resumed("skipped", global_worker) if skip else 0
        batch: list[dict] = []
        for raw in self._samples(global_worker, total_workers, skip):
            consumed += 1
            if consumed <= skip:
                continue
            try:
                sample = self._decode(raw)
                # Which draw this is: the transform seeds its augmentation with it (and the key). It is the same
                # in a resumed run, and differs each time a resampled stream draws the sample again.
                sample["__draw__"] = f"{self.epoch}/{global_worker}/{consumed}"
                if self.transform is not None:
                    sample = self.transform(sample)
            except ShardFormatError:
                if self.on_error == "raise":
                    raise
                skipped += 1
                continue
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._finish(batch, (global_worker, num_workers, total_workers), consumed, skipped)
                batch = []
        if batch and not self.drop_last:
            yield self._finish(batch, (global_worker, num_workers, total_workers), consumed, skipped)
        if skipped:
            # Batches carry the running count; this reports skips after the last batch too.
            log.warning("global worker %d skipped %d bad sample(s) of %d this epoch", global_worker, skipped, consumed)

    def _resume_skip(self, global_worker: int, total_workers: int) -> int:
        if not self.resume:
            return 0
        if self.resume.get("total_workers") not in (None, total_workers):
            raise ValueError(
                f"cannot resume a stream of {self.resume['total_workers']} global workers with {total_workers}; "
                "keep world size and num_workers, or start the data stream afresh"
            )
        if not self._same_epoch():
            return 0
        return self._resumed("consumed", global_worker)

    def _resumed(self, field: str, global_worker: int, default: int = 0) -> int:
        """A global worker's count in the resume state (`consumed`, `skipped`, `bad_shards`)."""
        return int((self.resume or {}).get(field, {}).get(str(global_worker), default))

    def _same_epoch(self) -> bool:
        return self.resume.get("epoch", 0) == self.epoch

    def _shard_order(self, global_worker: int, total_workers: int) -> Iterator[int]:
        num_shards = len(self.urls)
        if self.resampled:  # sweeps without end (module docstring); each pass (epoch) starts a new series
            sweep, order = -1, None
            for position in itertools.count(global_worker, total_workers):  # of the sweeps' concatenation
                if position // num_shards != sweep:
                    sweep = position // num_shards
                    order = np.random.default_rng([self.seed, self.epoch, sweep, 0x5EED]).permutation(num_shards)
                yield int(order[position % num_shards])
        order = np.random.default_rng([self.seed, self.epoch]).permutation(num_shards)
        yield from (int(i) for i in order[global_worker::total_workers])

    def _samples(self, global_worker: int, total_workers: int, skip: int) -> Iterator[dict]:
        """The worker's raw samples in order; with `skip`, the first `skip` are placeholders (`None`), stepped over
        without reading them when `_fast_forward` can, else read and dropped."""
        order = self._shard_order(global_worker, total_workers)
        rng = self._shuffle_rng(global_worker)
        # Corrupt shards read so far (each gave one placeholder): a resume can step over samples by their shards'
        # counts only when none was, since a corrupt shard yields another number of samples than its count.
        intact = self._resumed("bad_shards", global_worker, default=-1) == 0  # unknown in older states
        self._bad_shards = 0
        if skip and intact and (ahead := self._fast_forward(order, rng, skip)) is not None:
            buffer, rest, tail = ahead
            yield from (None for _ in range(skip))
            yield from tail if tail is not None else self._shuffled(rest, rng, buffer)
            return
        self._bad_shards = 0
        order = self._shard_order(global_worker, total_workers)
        yield from self._shuffled(self._raw_samples(order), self._shuffle_rng(global_worker), [])

    def _read_shard(self, index: int) -> Iterator[dict]:
        """One shard's raw samples (paired with their labels for kind "pseudo"); a corrupt tar, with
        `on_error="skip"`, ends with one placeholder that counts as a skipped sample."""
        url = self.urls[index]
        try:
            if self.label_urls is None:
                yield from iter_raw_samples(url)
            else:
                yield from _paired(iter_raw_samples(url), iter_raw_samples(self.label_urls[index]))
        except ShardFormatError:
            if self.on_error == "raise":
                raise
            self._bad_shards += 1
            yield {"__key__": "?", "__url__": url, "__corrupt__": True}

    def _raw_samples(self, order: Iterator[int]) -> Iterator[dict]:
        empty: set[int] = set()  # shards read empty since the last sample
        for index in order:
            num_samples = 0
            for raw in self._read_shard(index):
                num_samples += 1
                yield raw
            empty = set() if num_samples else empty | {index}
            if self.resampled and len(empty) == len(self.urls):  # drawing on would spin forever
                raise ValueError(self._no_samples_message())

    def _sample_counts(self) -> list[int] | None:
        """Samples per shard (for kind "pseudo", labeled samples: the label shards'), from the `index.json` that
        depthkit's writers and the pseudo-labeler leave beside their shards; None when a shard has no such count
        (a URL, or shards written by other tools)."""
        counts = index_sample_counts(self.label_urls or self.urls)
        return None if None in counts else counts

    def _fast_forward(self, order: Iterator[int], rng: np.random.Generator, skip: int):
        """Step over the first `skip` samples of a resumed worker by their positions (draw, offset in the shard),
        from the shards' sample counts, instead of reading them: a resampled stream's position covers the whole
        run so far. Only the samples still in the shuffle buffer are read, and the rest of the current shard.

        Advances `order` and `rng` as reading would have. Returns (the shuffle buffer, the raw samples after it, and
        the rest of an epoch that ended inside the skip: its shuffled buffer's tail, else None), or None without
        counts, or when a shard read disagrees with its count (the caller then reads and drops).
        """
        counts = self._sample_counts()
        if counts is None or not any(counts):
            return None
        size = self.shuffle_buffer if self.shuffle_buffer > 1 else 0
        buffer: list[tuple[int, int]] = []  # (draw, offset)
        shards: list[int] = []  # the shard of each draw
        yielded, resume_at = 0, None
        for draw, index in enumerate(order):
            shards.append(index)
            for offset in range(counts[index]):
                if size and len(buffer) < size:
                    buffer.append((draw, offset))
                    continue
                if size:  # as `_shuffled`: the new sample takes a random slot, the one there goes out
                    slot = int(rng.integers(len(buffer)))
                    buffer[slot] = (draw, offset)
                yielded += 1
                if yielded == skip:
                    resume_at = (draw, offset + 1)
                    break
            if resume_at is not None:
                break
        tail = None
        if resume_at is None:  # the epoch ended within the skip: what is left is the end of the shuffled buffer
            rng.shuffle(buffer)
            buffer, tail = [], buffer[skip - yielded :]
        wanted = set(buffer) | set(tail or ())
        read: dict[tuple[int, int], dict] = {}
        for draw in sorted({d for d, _ in wanted}):  # one shard at a time, keeping only the wanted samples
            num_samples = 0
            for offset, raw in enumerate(self._read_shard(shards[draw])):
                num_samples += 1
                if (draw, offset) in wanted:
                    read[draw, offset] = raw
            if num_samples != counts[shards[draw]]:
                return None
        if tail is not None:
            return [], iter(()), [read[p] for p in tail]
        draw, offset = resume_at
        current = itertools.islice(self._read_shard(shards[draw]), offset, None)
        return [read[p] for p in buffer], itertools.chain(current, self._raw_samples(order)), None

    def _no_samples_message(self) -> str:
        where = f"{self.urls[0]}" + (f" and {len(self.urls) - 1} more" if len(self.urls) > 1 else "")
        if self.label_urls is None:
            return f"{self.kind} shards {where} hold no sample"
        return (
            f"{self.kind} shards {where} hold no image with a pseudo-label in {self.label_urls[0]}"
            + (" and the rest" if len(self.urls) > 1 else "")
            + " (were they all recorded as failed? see the pseudo-label index)"
        )

    def _shuffle_rng(self, global_worker: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, global_worker, 0xB0F])

    def _shuffled(self, samples: Iterator[dict], rng: np.random.Generator, buffer: list[dict]) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = int(rng.integers(len(buffer)))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, raw: dict) -> dict:
        if raw.get("__corrupt__"):
            raise ShardFormatError(f"shard {raw['__url__']}: corrupt tar")
        if self.kind == "labeled":
            steps = getattr(self.transform, "takes_target_steps", False)  # the transform converts after cropping
            return decode_sample(raw, kind="labeled", target_steps=steps)
        # Images only: unlabeled shards, or labeled shards whose targets this stream does not use.
        label_raw = raw.pop("__label__", None)
        sample = decode_sample(raw, with_target=False)
        if sample["meta"]["kind"] == "pseudo":
            raise ShardFormatError(f"shard {raw['__url__']}: holds pseudo-labels, not images; pass it as labels=")
        if label_raw is None:
            return sample
        label = decode_sample(label_raw, kind="pseudo")
        if not label_fits(label["target"].shape, sample["image"].shape[:2]):
            raise ShardFormatError(
                f"shard {label['__url__']}, key {label['__key__']}: pseudo-label is "
                f"{label['target'].shape[1]}x{label['target'].shape[0]}, image is "
                f"{sample['image'].shape[1]}x{sample['image'].shape[0]} (another aspect ratio: not this image's label)"
            )
        sample["target"], sample["valid"] = label["target"], label["valid"]
        sample["meta"] = {**sample["meta"], "pseudo": label["meta"]}
        return sample

    def _finish(self, samples, workers, consumed, skipped) -> dict:
        batch = collate(samples)
        if "image_strong" in batch and self.cutmix_p > 0:
            b, _, h, w = batch["image_strong"].shape
            # Seeded by the batch's position (worker, samples consumed), like the per-sample augmentation: a resumed
            # stream draws the boxes the uninterrupted one would have.
            seed = np.random.SeedSequence([self.seed, self.epoch, workers[0], consumed, 0xC07]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(seed))
            cutmix = cutmix_boxes(b, h, w, p=self.cutmix_p, generator=generator)
            paste_boxes(batch["image_strong"], cutmix)  # a batch of its own (collate's stack): mixed in place
            batch["cutmix_mask"], batch["cutmix_index"] = cutmix.mask_BHW, cutmix.index_B
        batch["__worker__"], batch["__num_workers__"], batch["__total_workers__"] = workers
        batch["__consumed__"], batch["__skipped__"], batch["__epoch__"] = consumed, skipped, self.epoch
        batch["__bad_shards__"] = self._bad_shards
        return batch


def label_fits(label_hw: tuple[int, int], image_hw: tuple[int, int], patch_size: int = 14) -> bool:
    """Whether a pseudo-label of `label_hw` covers an image of `image_hw`: the same size, or the aspect ratio up to
    the network's rounding of each side to the patch size (a label stored at the network's output size, which the
    transform resizes with the image; `depthkit pseudo-label --label-size`)."""
    if tuple(label_hw) == tuple(image_hw):
        return True
    (lh, lw), (h, w) = label_hw, image_hw
    if min(lh, lw, h, w) < 1:
        return False
    # Rounding each side up to the patch size changes it by less than one patch.
    return abs(math.log((lh / lw) / (h / w))) <= math.log1p(patch_size / lh) + math.log1p(patch_size / lw)


def _paired(images: Iterator[dict], labels: Iterator[dict]) -> Iterator[dict]:
    """Pair image samples with pseudo-label samples of the same key; labels are a subsequence of images.

    An image without a label (the pseudo-labeler recorded it as failed) is passed over.
    """
    pending = next(labels, None)
    for image in images:
        if pending is not None and pending["__key__"] == image["__key__"]:
            image["__label__"] = pending
            yield image
            pending = next(labels, None)
    if pending is not None:
        raise ShardFormatError(
            f"shard {pending['__url__']}: pseudo-label key {pending['__key__']} has no image in the same order; "
            "label shards must come from the same image shards"
        )


@dataclass
class StreamState:
    """Position of a stream in the main process; goes into checkpoints as `state_dict()`."""

    epoch: int = 0
    total_workers: int | None = None
    next_worker: int = 0
    consumed: dict | None = None
    skipped: dict | None = None
    bad_shards: dict | None = None

    def update(self, batch: dict) -> None:
        if batch["__epoch__"] != self.epoch:
            self.epoch, self.consumed, self.skipped, self.bad_shards = batch["__epoch__"], {}, {}, {}
        worker = str(batch["__worker__"])
        self.total_workers = batch["__total_workers__"]
        self.next_worker = (batch["__worker__"] + 1) % batch["__num_workers__"]
        self.consumed = {**(self.consumed or {}), worker: batch["__consumed__"]}
        self.skipped = {**(self.skipped or {}), worker: batch["__skipped__"]}
        self.bad_shards = {**(self.bad_shards or {}), worker: batch["__bad_shards__"]}

    @property
    def num_skipped(self) -> int:
        return sum((self.skipped or {}).values())

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "total_workers": self.total_workers,
            "next_worker": self.next_worker,
            "consumed": dict(self.consumed or {}),
            "skipped": dict(self.skipped or {}),
            "bad_shards": dict(self.bad_shards or {}),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state.get("epoch", 0)
        self.total_workers = state.get("total_workers")
        self.next_worker = state.get("next_worker", 0)
        self.consumed, self.skipped = dict(state.get("consumed", {})), dict(state.get("skipped", {}))
        self.bad_shards = dict(state.get("bad_shards", {}))


def merge_stream_states(states: list[dict]) -> dict:
    """One stream's position from each rank's `StreamState.state_dict()`: what a checkpoint must hold.

    A rank only advances its own global workers, and rank 0 alone writes the checkpoint; so each global worker's
    `consumed` and `skipped` come from the rank that owns it (`states` in rank order). A resumed rank also holds the
    other ranks' entries as they were at the resume: a plain join let those stale copies win, and the next resume
    replayed data. Ranks step in lockstep, so epoch and the next worker agree; a rank in another epoch than rank 0
    (unequal finite streams) would replay its epoch, and is logged.
    """
    first = states[0]
    merged = {**first, "consumed": {}, "skipped": {}, "bad_shards": {}}
    per_rank = (first.get("total_workers") or 0) // len(states)  # global workers of a rank
    for rank, state in enumerate(states):
        if state.get("epoch", 0) != first.get("epoch", 0):
            log.warning(
                "rank %d is in epoch %s, rank 0 in %s: its position is not saved",
                rank,
                state["epoch"],
                first.get("epoch", 0),
            )
            continue
        for field in ("consumed", "skipped", "bad_shards"):
            own = {w: n for w, n in state.get(field, {}).items() if not per_rank or int(w) // per_rank == rank}
            merged[field].update(own)
    return merged


class ShardLoader(DataLoader):
    """A DataLoader that starts each pass of its `ShardStream` in the main process (`ShardStream.start_pass`), before
    the workers take their copies of the stream."""

    def __iter__(self):
        if self.num_workers > 0:  # with none, the stream's own `__iter__` runs here and starts the pass
            self.dataset.start_pass()
        return super().__iter__()


def make_loader(stream: ShardStream, *, num_workers: int = 0, pin_memory: bool = False, **kwargs) -> DataLoader:
    """A loader over a `ShardStream` (batches are made in the workers, so `batch_size=None`); each pass over it is
    the stream's next epoch."""
    return ShardLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        **kwargs,
    )


def batch_parts(batch: dict) -> dict[str, dict]:
    """A training step's batches by name: a student's `{"labeled": ..., "unlabeled": ...}` (either may be absent), or
    a supervised step's single batch as "labeled"."""
    if "labeled" in batch or "unlabeled" in batch:
        return {name: batch[name] for name in ("labeled", "unlabeled") if name in batch}
    return {"labeled": batch}
