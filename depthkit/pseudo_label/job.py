"""One rank's pseudo-labeling work: read its input shards, label them in batches, write one output shard each.

Pipeline (three stages that overlap):

1. **Read + decode** in DataLoader worker processes (`num_workers`; with 0, a background thread): each worker
   reads whole shards in order and yields one item per sample (uint8 `H x W x 3` image, or the reason it could
   not be decoded) and an end-of-shard marker.
2. **Label** in the main thread: images are bucketed *per shard* by their network input size (the official
   resize: keep aspect, short side to `resolution`, multiples of the patch size); a full bucket is one forward
   pass; at the end of a shard its partly filled buckets run too. Batches never mix shards, so a shard's batches
   (and therefore its labels, bit for bit on one machine and thread count) depend only on the shard and
   `batch_size`: an interrupted and resumed job writes what an uninterrupted one writes. Bucketing instead of
   padding gives every image the computation it gets when labeled alone (padding would change what the ViT
   attends to; only floating-point batch effects remain). The cost is one partly filled batch per distinct input
   size per shard (photos come in few aspect ratios), plus a batch run early when a rare size holds back more than
   `MAX_WAITING_BATCHES` batches of the shard (which bounds memory).
3. **Encode + write** in a writer thread, in input order, as soon as a prefix of the shard is labeled:
   `KEY.target.npz` (float32, lossless; or float16, or `KEY.target.png`: see `PseudoLabelConfig.encoding`),
   `KEY.json` (kind "pseudo", output space, provenance), with confidence `KEY.confidence.png`, compressed by a few
   encoder threads (zlib and PNG release the GIL, so this overlaps the forward passes; zlib level 1, since at GPU
   speed encoding is the job's most costly CPU work) into `X.HOST-PID.tar.tmp`. At the end of the shard it is renamed
   to `X.tar`, then its record is written and `index.json` refreshed (`depthkit.pseudo_label.index`).

Shards are assigned round-robin by position in the input list: shard i belongs to rank i % world_size, so every
shard has exactly one writer whatever order ranks start or finish in, and a rerun with the same world size gives
each rank its own unfinished shards again.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import socket
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import depthkit
from depthkit.data.shards import (
    ShardFormatError,
    TarWriter,
    decode_sample,
    encode_sample,
    folder_index,
    index_sample_counts,
    is_local,
    shard_file_name,
    shard_paths,
    stale_temporaries,
)
from depthkit.data.tar_reader import first_key, iter_raw_samples, members_digest
from depthkit.devices import torch_device
from depthkit.pseudo_label.index import (
    INDEX_NAME,
    IndexWriter,
    LabelSettings,
    check_settings,
    finished_shards,
    read_records,
    write_record,
)
from depthkit.pseudo_label.teacher import (
    LABEL_SIZES,
    PRECISIONS,
    TTA_MODES,
    PendingLabels,
    Teacher,
    launch_batch,
    load_teacher,
    network_size,
)

log = logging.getLogger("depthkit.pseudo_label")
DEVICES = ("auto", "cpu", "cuda")
CARRIED_META = ("source", "licence", "origin")  # copied from the image's metadata into the label's
CONFIDENCE_MEMBER = "confidence.png"
CONFIDENCE_MAX = 65535  # uint16 PNG: confidence = value / 65535
ENCODINGS = ("npz", "f16", "png16")
COMPRESS_LEVEL = 1  # zlib level of label PNGs and npz: 5x (PNG) and 1.5x (npz) faster to write than 6, <5% bigger
PNG16_STEPS = 65535


@dataclass(frozen=True, kw_only=True)
class PseudoLabelConfig:
    """One pseudo-labeling job (the `depthkit pseudo-label` options, minus the launch ones)."""

    inputs: tuple[str, ...]
    """Unlabeled (or labeled: only the images are read) shards: folders, globs, brace patterns, URLs."""
    output: str
    """Output folder: one label shard per input shard, same file name, plus `records/` and `index.json`."""
    model: str | None = None
    """Teacher architecture (registry name)."""
    checkpoint: str | None = None
    """Teacher checkpoint (see `load_teacher`)."""
    weights: str | None = None
    """Weights for `model`; without `checkpoint` and `weights`, its official weights from the local folder."""
    resolution: int = 518
    """Short side of the network input, rounded to the patch size (the official `--input-size`)."""
    batch_size: int = 16
    """Images per forward pass (a flip pass doubles the forward work, not the batch)."""
    tta: str = "none"
    """"none" or "hflip" (average with the un-flipped prediction of the flipped image)."""
    confidence: bool = False
    """Write `KEY.confidence.png` from the flip pass's disagreement (needs tta="hflip")."""
    encoding: str = "npz"
    """"npz": float32 as byte planes, lossless (the default; `depthkit.data.shards`). "f16": an npz with a float16
    array (relative rounding <= 2^-11, 8x finer than bf16 inference's own), about 2.4x smaller; float32 for an image
    with values beyond 65504. "png16": 16-bit PNG with a per-image scale, i.e. the prediction rounded to 1/65535
    of its maximum (zeros lifted to one step), decoded exactly as stored (see `quantize_png16`)."""
    label_size: str = "network"
    """"network": an image larger than the network input gets its label at the network's output size (the
    prediction itself; the student's transform resizes it with the image), others at their own. "image": every
    label at its image's size, as the official `infer_image` returns it (see `teacher.label_size`)."""
    precision: str = "auto"
    """"fp32", "bf16" (autocast) or "auto" (bf16 on CUDA, fp32 on CPU)."""
    device: str = "auto"
    """"cpu", "cuda" (each rank takes cuda:LOCAL_RANK) or "auto" (CUDA when available)."""
    num_workers: int = 4
    """Decoding processes per rank (0: a background thread)."""
    num_encoders: int = 4
    """Encoding threads per rank (npz / PNG compression, which releases the GIL)."""
    allow_mixed_teachers: bool = False
    """Add shards labeled with other settings to an output that already holds finished shards."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    index_interval_s: float = 0.0
    """Least time between two `index.json` rewrites by one rank (records are written for every shard either way;
    see `depthkit.pseudo_label.index` for the automatic limit at scale)."""

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("no input shards given (--input)")
        if self.resolution < 1:
            raise ValueError(f"--resolution must be >= 1, got {self.resolution}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.tta not in TTA_MODES:
            raise ValueError(f"--tta {self.tta!r}; expected one of {', '.join(TTA_MODES)}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"--encoding {self.encoding!r}; expected one of {', '.join(ENCODINGS)}")
        if self.confidence and self.tta != "hflip":
            raise ValueError("--confidence comes from the flip pass: add --tta hflip")
        if self.label_size not in LABEL_SIZES:
            raise ValueError(f"--label-size {self.label_size!r}; expected one of {', '.join(LABEL_SIZES)}")
        if self.precision not in (*PRECISIONS, "auto"):
            raise ValueError(f"--precision {self.precision!r}; expected auto, {', '.join(PRECISIONS)}")
        if self.device not in DEVICES:
            raise ValueError(f"--device {self.device!r}; expected one of {', '.join(DEVICES)}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.num_encoders < 1:
            raise ValueError(f"--num-encoders must be >= 1, got {self.num_encoders}")


@dataclass
class RankSummary:
    """What one rank did."""

    rank: int
    world_size: int
    num_shards: int = 0
    """Shards assigned to this rank."""
    num_shards_labeled: int = 0
    num_shards_skipped: int = 0
    """Assigned shards that were already finished (resume)."""
    num_labeled: int = 0
    """Images labeled in this run."""
    num_skipped: int = 0
    """Images in the skipped shards."""
    num_failed: int = 0
    """Images that could not be decoded in this run (recorded in the index with the reason)."""
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.num_labeled / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Planning: what to read, where to write, which teacher; every user error is raised here, before any work
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    urls: list[str]
    names: list[str]
    """Output shard name of each input (its file name: the student pairs label and image shards by name)."""
    out_dir: Path


def make_plan(config: PseudoLabelConfig) -> Plan:
    """Resolve the input shards and check the output folder.

    Raises:
        FileNotFoundError: A missing input shard, or a folder / glob with none.
        ValueError: Two inputs with the same file name, an output that would overwrite an input, or an output
            folder that holds something other than pseudo-labels.
    """
    config.validate()
    urls = shard_paths(list(config.inputs))
    names = [shard_file_name(url) for url in urls]
    seen: dict[str, str] = {}
    for url, name in zip(urls, names, strict=True):
        if name in seen:
            if seen[name] == url:
                raise ValueError(f"input shard {url} is given twice (check --input)")
            raise ValueError(
                f"input shards {seen[name]} and {url} share the file name {name!r}; output shards "
                "are named after their inputs, so names must be unique"
            )
        seen[name] = url
    out_dir = Path(config.output).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--output {out_dir} is a file, not a folder")
    for url, name in zip(urls, names, strict=True):
        if not is_local(url):
            continue
        if (out_dir / name).resolve() == Path(url).resolve():
            raise ValueError(f"--output {out_dir} would overwrite the input shard {url}; choose another folder")
        if not tarfile.is_tarfile(url):  # reads one header block
            raise ValueError(
                f"input {url} is not a tar shard; make shards of photos with `depthkit data convert --images DIR`"
            )
    index_path = out_dir / INDEX_NAME
    if index_path.is_file():
        index = folder_index(out_dir)
        if not index:
            raise ValueError(f"--output {out_dir}: its {INDEX_NAME} is unreadable or not a JSON object; is it one?")
        kind = index.get("kind")
        if kind != "pseudo":
            raise ValueError(
                f"--output {out_dir} holds {INDEX_NAME} of kind {kind!r}, not pseudo-labels; choose another folder"
            )
    else:  # a job writes its index before its first shard: tars without one are someone else's
        clashes = [name for name in names if (out_dir / name).exists()]
        if clashes:
            more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
            raise ValueError(
                f"--output {out_dir} holds {clashes[0]}{more}, which the labels would replace, and no {INDEX_NAME}: "
                "it is no pseudo-label output; choose another folder"
            )
    return Plan(urls=urls, names=names, out_dir=out_dir)


def label_settings(config: PseudoLabelConfig, teacher: Teacher, device: torch.device) -> LabelSettings:
    precision = config.precision if config.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return LabelSettings(
        teacher_sha256=teacher.sha256,
        model=teacher.name,
        resolution=config.resolution,
        tta=config.tta,
        confidence=config.confidence,
        precision=precision,
        encoding=config.encoding,
        label_size=config.label_size,
    )


def prepare(config: PseudoLabelConfig, *, device: torch.device, sha256: str | None = None, records: bool = True):
    """Plan, load the teacher and (with `records`) check it against the output; returns `(plan, teacher, settings,
    records or None)`. Nothing is written: a start error leaves no output folder."""
    plan = make_plan(config)
    teacher = load_teacher(config.model, checkpoint=config.checkpoint, weights=config.weights, sha256=sha256)
    settings = label_settings(config, teacher, device)
    return plan, teacher, settings, finished_records(config, plan, settings) if records else None


def finished_records(config: PseudoLabelConfig, plan: Plan, settings: LabelSettings) -> dict[str, dict]:
    """The output's finished shards, checked against this run's settings and inputs (see `check_inputs`)."""
    records = finished_shards(plan.out_dir, read_records(plan.out_dir))
    check_settings(records, settings, allow_mixed=config.allow_mixed_teachers)
    check_inputs(plan, records)
    return records


LOCKS_DIR = ".locks"


@contextmanager
def job_locks(out_dir: Path, rank: int, world_size: int) -> Iterator[None]:
    """Keep a second job off this output while this rank labels into it (launched twice, or requeued while the first
    still runs: it would label the same shards again and race the first for the records). POSIX record locks under
    `OUT/.locks/`: `rank<R>.lock` exclusive (another job's rank R stops at once, naming the holder), and
    `world<N>.lock` shared by the job's ranks (a job of another world size assigns shards differently, so it stops
    when it finds one held). The kernel releases them when the process ends, SIGKILL included; forked loader workers
    do not hold them. Where the filesystem has no locks the job runs unguarded, with a warning; where its locks are
    node-local, only jobs on the same node are caught."""
    folder = out_dir / LOCKS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    held: list[int] = []
    try:
        for other in sorted(folder.glob("world*.lock")):
            if other.name != f"world{world_size}.lock" and _lock(other, exclusive=True, probe=True) is None:
                ranks = other.stem[len("world") :]
                raise ValueError(
                    f"--output {out_dir}: a job of {ranks} ranks is labeling into it (this one has {world_size}); "
                    "wait for it to end (a rerun then resumes it) or stop it, or choose another --output"
                )
        for path, exclusive in ((folder / f"world{world_size}.lock", False), (folder / f"rank{rank}.lock", True)):
            fd = _lock(path, exclusive=exclusive)
            if fd is None:
                holder = (path.read_text(errors="replace").strip() if path.is_file() else "") or "another process"
                raise ValueError(
                    f"--output {out_dir}: another job's rank {rank} is labeling into it ({holder}); wait for it to end "
                    "(a rerun then resumes it) or stop it, or choose another --output"
                )
            held.append(fd)
            if exclusive and fd >= 0:  # fixed width, written in place: a reader never sees it half written
                os.pwrite(fd, f"{socket.gethostname()}, pid {os.getpid()}".ljust(80).encode()[:80], 0)
        yield
    finally:
        for fd in held:
            if fd >= 0:
                os.close(fd)  # releases its lock


def _lock(path: Path, *, exclusive: bool, probe: bool = False) -> int | None:
    """A non-blocking POSIX lock on `path`: its open descriptor (-1 where the filesystem has no locks), or None when
    another process holds a conflicting one. `probe`: only test, release at once (returns -1 when free)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        os.close(fd)
        return None
    except OSError as err:  # ENOLCK, ENOSYS: no locks on this filesystem
        os.close(fd)
        log.warning("no lock on %s (%s): nothing stops a second job on this output", path, err)
        return -1
    if probe:
        os.close(fd)
        return -1
    return fd


def check_inputs(plan: Plan, records: dict[str, dict]) -> None:
    """Refuse to skip a finished shard whose input changed: output shards are matched to inputs by file name, and
    labels of another shard's images (re-converted photos, another dataset's `shard-000000.tar`) would be kept.
    A local input is known by its size, first key and a digest of its member list (names and sizes: a pass over the
    headers, seeking past the data; a file's hash would read whole datasets). Re-encoded images of the same keys
    change their sizes; the archive's size alone rarely changes (tar pads to 10 KiB records). Records written before
    the digest existed are compared on the fields they have.

    Raises:
        ValueError: naming the shard, the input it was labeled from and the one given now.
    """
    for url, name in zip(plan.urls, plan.names, strict=True):
        record = records.get(name)
        if record is None or "input_bytes" not in record or not is_local(url):
            continue
        now = {field: value for field, value in input_identity(url).items() if field in record}
        then = {field: record.get(field) for field in now}
        if now != then:
            raise ValueError(
                f"--output {plan.out_dir} holds {name}, labeled from {record['input']} ({_identity(then)}), but "
                f"the input {url} now has {_identity(now)}: the inputs changed; use a new --output folder"
            )


def input_identity(url: str) -> dict:
    """A local input shard's identity in its record: its size, its first sample's key and `members_digest`."""
    return {"input_bytes": os.path.getsize(url), "first_key": first_key(url), "members_sha256": members_digest(url)}


def _identity(fields: dict) -> str:
    described = [f"{fields['input_bytes']} bytes" if "input_bytes" in fields else None]
    described.append(f"first key {fields['first_key']!r}" if "first_key" in fields else None)
    described.append(f"members {str(fields['members_sha256'])[:12]}" if "members_sha256" in fields else None)
    return ", ".join(d for d in described if d)


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: reading and decoding
# ---------------------------------------------------------------------------------------------------------------


class ShardItems(IterableDataset):
    """Chunks (lists) of items of whole shards, in order: `{"event": "item", "shard", "key", "image" | "error",
    "meta"}` per sample, then `{"event": "end", "shard", "error"}`. DataLoader workers take whole shards
    round-robin; items travel in chunks of up to `chunk_size` samples (one message, not one per image).

    Args:
        jobs: `(shard id, url)` pairs.
        chunk_size: Samples per chunk.
    """

    def __init__(self, jobs: list[tuple[int, str]], chunk_size: int = 8):
        super().__init__()
        self.jobs, self.chunk_size = list(jobs), chunk_size

    def __iter__(self) -> Iterator[list[dict]]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        for shard_id, url in self.jobs[worker_id::num_workers]:
            chunk: list[dict] = []
            for item in read_shard(shard_id, url):
                chunk.append(item)
                if len(chunk) == self.chunk_size or item["event"] == "end":
                    yield chunk
                    chunk = []


def read_shard(shard_id: int, url: str) -> Iterator[dict]:
    """One shard's items and its end marker; a corrupt tar ends the shard early with the error in the marker."""
    error = None
    try:
        for raw in iter_raw_samples(url):
            yield decode_item(shard_id, raw)
    except ShardFormatError as err:
        error = str(err)
    yield {"event": "end", "shard": shard_id, "error": error}


def decode_item(shard_id: int, raw: dict) -> dict:
    key = raw.get("__key__", "?")
    item: dict = {"event": "item", "shard": shard_id, "key": key}
    try:
        if "/" in key or "." in key:
            raise ShardFormatError(f"key {key!r} holds '/' or '.', which a label shard cannot store")
        sample = decode_sample(raw, with_target=False)
        if sample["meta"].get("kind") == "pseudo":
            raise ShardFormatError(f"shard {raw.get('__url__')}, key {key}: holds a pseudo-label, not an image")
        image_HW3 = sample["image"]
        item["image"] = image_HW3 if image_HW3.flags.writeable else image_HW3.copy()  # torch wants writable arrays
        item["meta"] = {k: sample["meta"][k] for k in CARRIED_META if k in sample["meta"]}
    except Exception as err:  # any undecodable sample is recorded and skipped, whatever the decoder raised
        item["error"] = f"{type(err).__name__}: {err}" if not isinstance(err, ShardFormatError) else str(err)
    return item


def _background(items: Iterator[dict], maxsize: int) -> Iterator[dict]:
    """Run an iterator in a daemon thread, `maxsize` items ahead; its exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=maxsize)
    done = object()

    def work():
        try:
            for item in items:
                q.put(item)
            q.put(done)
        except BaseException as err:  # handed to the consumer
            q.put(err)

    threading.Thread(target=work, daemon=True, name="pseudo-label-reader").start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def make_reader(jobs: list[tuple[int, str]], *, num_workers: int, batch_size: int, pin_memory: bool):
    """An iterable of item chunks (see `ShardItems`), decoded ahead of the labeler by workers or a thread."""
    chunk_size = max(1, min(batch_size, 16))
    dataset = ShardItems(jobs, chunk_size=chunk_size)
    if num_workers == 0:
        return _background(iter(dataset), maxsize=max(2, 2 * batch_size // chunk_size))
    num_workers = min(num_workers, max(1, len(jobs)))
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=max(2, -(-2 * batch_size // (chunk_size * num_workers))),  # >= 2 batches ahead in all
        pin_memory=pin_memory,
    )


# ---------------------------------------------------------------------------------------------------------------
# Stage 3: encoding and writing
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ShardWork:
    """A shard on its way through the pipeline.

    `slots` hold its samples in input order (`key`, then `pred`/`conf`/`meta` once labeled, or `error`); the
    labeled prefix `slots[:next_write]` has been handed to the writer (and dropped here).
    """

    shard_id: int
    name: str
    url: str
    started: float
    slots: list[dict | None] = field(default_factory=list)
    next_write: int = 0
    buckets: dict[tuple[int, int], list[tuple[dict, torch.Tensor]]] = field(default_factory=dict)
    tar_error: str | None = None


def encode_confidence(confidence_HW: np.ndarray) -> bytes:
    """uint16 PNG, `value / 65535` = confidence in [0, 1] (quantized to 1/65535)."""
    import io

    from PIL import Image

    value_HW = np.rint(np.clip(confidence_HW, 0, 1) * CONFIDENCE_MAX).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(value_HW).save(buf, format="PNG", compress_level=COMPRESS_LEVEL)
    return buf.getvalue()


def decode_confidence(data: bytes) -> np.ndarray:
    """float32 `H x W` confidence in [0, 1] from a `KEY.confidence.png` member."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        value_HW = np.asarray(img)
    return (value_HW.astype(np.float32) / CONFIDENCE_MAX).astype(np.float32)


def quantize_png16(pred_HW: np.ndarray) -> tuple[np.ndarray, float | None]:
    """Round a prediction to the png16 grid of the shard format: `target = steps * scale`, `scale = max / 65535`.

    Returns the float32 values that the png16 encoding then stores and decodes exactly, and the scale. Finite
    values move by at most `scale / 2` (zeros, which png16 reserves for invalid pixels, move up to one step);
    NaN / inf stay invalid. A prediction with negative values is returned unchanged with scale None (stored as
    npz), since the format has no offset.
    """
    valid_HW = np.isfinite(pred_HW)
    if not valid_HW.any() or float(pred_HW[valid_HW].min()) < 0:
        return pred_HW, None
    top = float(pred_HW[valid_HW].max())
    scale = top / PNG16_STEPS if top > 0 else 1.0
    steps_HW = np.clip(np.rint(np.where(valid_HW, pred_HW, 0).astype(np.float64) / scale), 1, PNG16_STEPS)
    return np.where(valid_HW, (steps_HW * scale).astype(np.float32), np.float32("nan")), scale


def encode_label(
    key: str, pred_HW: np.ndarray, conf_HW: np.ndarray | None, meta: dict, *, encoding: str = "npz"
) -> dict[str, bytes]:
    """The tar members of one pseudo-label sample (`encoding`: see `PseudoLabelConfig.encoding`)."""
    scale = None
    if encoding == "png16":
        pred_HW, scale = quantize_png16(pred_HW)
    sample = {"__key__": key, "target": pred_HW, "valid": np.isfinite(pred_HW), "meta": meta}
    members = encode_sample(  # without a scale: npz, float32 byte planes (lossless) or float16
        sample,
        target_scale=scale,
        target_half=encoding == "f16",
        target_planes=True,
        target_compress_level=COMPRESS_LEVEL,
    )
    if conf_HW is not None:
        members[f"{key}.{CONFIDENCE_MEMBER}"] = encode_confidence(conf_HW)
    return members


class ShardWriterThread:
    """Encodes and writes samples in input order in a background thread; renames, records and indexes each shard.

    The labeler sends `("samples", work, slots)` for each newly labeled prefix of a shard and `("end", work)` when
    the shard is complete. Samples are encoded by `num_encoders` threads (zlib and PNG release the GIL) and appended
    to this process's `STEM.HOST-PID.tar.tmp`; at the end it is renamed to `NAME.tar`, then the record is written and
    the index refreshed.
    The queue is bounded, so the labeler waits when it runs ahead.

    Args:
        out_dir: Output folder.
        settings: The run's label settings.
        provenance: Per-sample provenance (settings + checkpoint file, depthkit version); `time` is added per shard.
        output_space: The teacher's output space.
        index: The index writer.
        rank: This rank (goes into the records).
        on_shard_done: Called with each record after the shard is in place.
        num_encoders: Encoding threads.
    """

    def __init__(self, out_dir, settings, provenance, output_space, index, rank, on_shard_done=None, num_encoders=2):
        from concurrent.futures import ThreadPoolExecutor

        self.out_dir, self.settings, self.provenance = Path(out_dir), settings, provenance
        self.output_space, self.index, self.rank, self.on_shard_done = output_space, index, rank, on_shard_done
        self._tars: dict[int, tuple[TarWriter, dict[str, str]]] = {}
        self._pool = ThreadPoolExecutor(max(1, num_encoders), thread_name_prefix="pseudo-label-encode")
        self._queue: queue.Queue = queue.Queue(maxsize=16)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="pseudo-label-writer")
        self._thread.start()

    def put(self, message: tuple | None) -> None:
        while True:
            self._check()
            try:
                self._queue.put(message, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write everything queued, then stop; re-raises a writer failure. Shards never ended are not renamed."""
        if self._thread.is_alive():
            self.put(None)
            self._thread.join()
        self._pool.shutdown()
        for tar, _ in self._tars.values():  # shards the labeler did not finish (it failed): no half shard stays
            tar.abort()
        self._tars.clear()
        self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing pseudo-label shards failed: {self._error}") from self._error

    def _run(self) -> None:
        try:
            while (message := self._queue.get()) is not None:
                if message[0] == "samples":
                    self._write_samples(message[1], message[2])
                else:
                    self._finish(message[1])
        except BaseException as err:  # reported to the labeler at its next put / close
            self._error = err

    def _open(self, work: ShardWork) -> tuple[TarWriter, dict[str, str]]:
        if work.shard_id not in self._tars:
            path = self.out_dir / work.name
            for stale in stale_temporaries(path):  # a killed run's part of this shard (or a second job's, which then
                stale.unlink(missing_ok=True)  # fails at its rename: loudly, not with the other teacher's labels)
            self._tars[work.shard_id] = (TarWriter(path), {})
        return self._tars[work.shard_id]

    def _write_samples(self, work: ShardWork, slots: list[dict]) -> None:
        tar, failed = self._open(work)
        provenance = {**self.provenance, "time": _utc(work.started)}
        for slot, members in zip(slots, self._pool.map(lambda s: self._encode(s, provenance), slots), strict=True):
            if members is None:
                failed[slot["key"]] = slot["error"]
            else:
                tar.add_sample(members)

    def _encode(self, slot: dict, provenance: dict) -> dict[str, bytes] | None:
        if "error" in slot:
            return None
        meta = {**slot["meta"], "kind": "pseudo", "output_space": self.output_space, "provenance": provenance}
        return encode_label(slot["key"], slot["pred"], slot.get("conf"), meta, encoding=self.settings.encoding)

    def _finish(self, work: ShardWork) -> None:
        tar, failed = self._open(work)
        if work.tar_error:
            failed["*"] = f"the rest of the shard is unreadable: {work.tar_error}"
        tar.close()
        del self._tars[work.shard_id]
        record = {
            "shard": work.name,
            "input": work.url,
            **(input_identity(work.url) if is_local(work.url) else {}),
            "num_samples": tar.num_samples,
            "failed": failed,
            "settings": self.settings.to_dict(),
            "checkpoint_file": self.provenance["checkpoint_file"],
            "depthkit_version": depthkit.__version__,
            "labeled_at": _utc(work.started),
            "seconds": round(time.time() - work.started, 3),
            "rank": self.rank,
        }
        write_record(self.out_dir, record)
        self.index.refresh()
        if self.on_shard_done is not None:
            self.on_shard_done(record)


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# ---------------------------------------------------------------------------------------------------------------
# One rank
# ---------------------------------------------------------------------------------------------------------------


def label_shards(
    config: PseudoLabelConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    local_rank: int = 0,
    teacher_sha256: str | None = None,
    on_shard_done: Callable[[dict], None] | None = None,
) -> RankSummary:
    """Label this rank's unfinished shards (shard i belongs to rank i % world_size); see the module docstring.

    Args:
        config: The job.
        rank: This process's rank.
        world_size: Number of ranks.
        local_rank: Rank on this machine (picks cuda:local_rank).
        teacher_sha256: The teacher weights' hash when the launcher already computed it.
        on_shard_done: Called (in the writer thread) with each finished shard's record.

    Returns:
        This rank's counts.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    start = time.perf_counter()
    device = torch_device(config.device, local_rank=local_rank)
    plan, teacher, settings, _ = prepare(config, device=device, sha256=teacher_sha256, records=False)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    with job_locks(plan.out_dir, rank, world_size):  # no other job labels into the output meanwhile
        records = finished_records(config, plan, settings)  # read once the locks are held
        summary = RankSummary(rank=rank, world_size=world_size)
        todo = _unfinished_shards(plan, records, summary)
        index = IndexWriter(plan.out_dir, plan.names, min_interval_s=config.index_interval_s)
        index.refresh(force=True)
        if not todo:
            summary.seconds = time.perf_counter() - start
            return summary

        model = teacher.model.to(device)
        provenance = {
            **settings.to_dict(),
            "checkpoint_file": Path(teacher.weights_path).name,
            "depthkit_version": depthkit.__version__,
        }
        writer = ShardWriterThread(
            plan.out_dir,
            settings,
            provenance,
            model.meta.output_space,
            index,
            rank,
            on_shard_done=on_shard_done,
            num_encoders=config.num_encoders,
        )
        progress = _Progress(config, rank, world_size, [plan.urls[i] for i in todo])
        label_start = time.perf_counter()
        try:
            reader = make_reader(
                [(i, plan.urls[i]) for i in todo],
                num_workers=config.num_workers,
                batch_size=config.batch_size,
                pin_memory=device.type == "cuda",
            )
            labeler = _Labeler(model, config, settings, progress, summary, writer.put)
            _label_items((item for chunk in reader for item in chunk), plan, labeler, writer, summary, progress)
        finally:
            writer.close()
            index.refresh(force=True)
            progress.close()
        summary.seconds = time.perf_counter() - label_start
        return summary


def _unfinished_shards(plan: Plan, records: dict[str, dict], summary: RankSummary) -> list[int]:
    """The rank's shards (shard i belongs to rank i % world_size) that no record marks finished; the finished ones
    are counted in `summary` as skipped."""
    rank, world_size = summary.rank, summary.world_size
    mine = list(range(rank, len(plan.urls), world_size))
    summary.num_shards = len(mine)
    if not mine:
        log.warning("rank %d of %d has no shard: %d input shard(s)", rank, world_size, len(plan.urls))
    todo = []
    for i in mine:
        if plan.names[i] in records:
            summary.num_shards_skipped += 1
            summary.num_skipped += int(records[plan.names[i]]["num_samples"])
        else:
            todo.append(i)
    return todo


def _label_items(items: Iterator[dict], plan: Plan, labeler, writer, summary: RankSummary, progress) -> None:
    """Hand the reader's items to the labeler in order; at a shard's end marker, label what it still holds and pass
    the shard to the writer to be closed (see the module docstring's stages)."""
    works: dict[int, ShardWork] = {}
    for item in items:
        shard_id = int(item["shard"])
        work = works.get(shard_id)
        if work is None:
            work = works[shard_id] = ShardWork(shard_id, plan.names[shard_id], plan.urls[shard_id], time.time())
        if item["event"] == "end":
            work.tar_error = item["error"]
            labeler.flush(work)
            writer.put(("end", works.pop(shard_id)))
            summary.num_shards_labeled += 1
            progress.shard_done(summary)
            continue
        labeler.add(work, item)
    assert not works, f"shards without an end marker: {sorted(works)}"


class _Labeler:
    """Stage 2: per-shard buckets by network input size, one forward per full bucket, labeled prefixes to the writer.

    Memory stays bounded: when more than `MAX_WAITING_BATCHES * batch_size` samples of a shard wait behind its
    oldest unlabeled image (a rare input size whose bucket fills slowly), that image's bucket runs early. The rule
    depends only on the shard's content and the batch size, so batches stay a deterministic function of the shard.

    One batch is in flight: a full bucket is launched (`launch_batch`), and only then are the previous batch's
    predictions collected, so on a GPU the next forward is already queued while the host hands results to the
    writer and reads on. Collecting first wherever the order of the prefix matters keeps the batches as above.
    """

    MAX_WAITING_BATCHES = 4

    def __init__(self, model, config: PseudoLabelConfig, settings: LabelSettings, progress, summary, emit):
        self.model, self.config, self.progress, self.summary, self.emit = model, config, progress, summary, emit
        self.bf16 = settings.precision == "bf16"
        self.max_waiting = self.MAX_WAITING_BATCHES * config.batch_size
        self._in_flight: tuple[ShardWork, list[tuple[dict, torch.Tensor]], PendingLabels] | None = None

    def add(self, work: ShardWork, item: dict) -> None:
        slot = {"key": item["key"]}
        work.slots.append(slot)
        error = item.get("error")
        if error is None:
            image_HW3 = item["image"]
            if isinstance(image_HW3, np.ndarray):
                image_HW3 = torch.from_numpy(image_HW3)
            height, width = image_HW3.shape[:2]
            try:
                size_hw = network_size(height, width, self.config.resolution, self.model.meta.patch_size)
            except ValueError as err:  # an image no network input can hold: failed, like an undecodable one
                error = str(err)
        if error is not None:
            slot["error"] = error
            self.summary.num_failed += 1
            self.progress.update(1)
        else:
            slot["meta"], slot["size"] = item["meta"], size_hw
            bucket = work.buckets.setdefault(size_hw, [])
            bucket.append((slot, image_HW3))
            if len(bucket) == self.config.batch_size:
                self._launch(work, work.buckets.pop(size_hw))
        self._advance(work)
        while len(work.slots) - work.next_write > self.max_waiting:
            if self._in_flight is not None:  # its images may be the ones waited for
                self._collect()
                continue
            oldest = work.slots[work.next_write]
            self._launch(work, work.buckets.pop(oldest["size"]))

    def flush(self, work: ShardWork) -> None:
        for size_hw in list(work.buckets):
            self._launch(work, work.buckets.pop(size_hw))
        self._collect()
        self._advance(work)
        assert work.next_write == len(work.slots), f"{work.name}: {len(work.slots) - work.next_write} not labeled"

    def _advance(self, work: ShardWork) -> None:
        """Hand the newly complete prefix of the shard to the writer."""
        ready = []
        while work.next_write < len(work.slots):
            slot = work.slots[work.next_write]
            if "pred" not in slot and "error" not in slot:
                break
            ready.append(slot)
            work.slots[work.next_write] = None  # the writer owns it now
            work.next_write += 1
        if ready:
            self.emit(("samples", work, ready))

    def _launch(self, work: ShardWork, bucket: list[tuple[dict, torch.Tensor]]) -> None:
        """Queue a bucket's forward, then collect the batch before it (which the device has finished meanwhile)."""
        pending = launch_batch(
            self.model,
            [image for _, image in bucket],
            bucket[0][0]["size"],
            tta=self.config.tta,
            confidence=self.config.confidence,
            bf16=self.bf16,
            size=self.config.label_size,
        )
        self._collect()
        self._in_flight = (work, bucket, pending)

    def _collect(self) -> None:
        """Wait for the batch in flight, if any, and hand its shard's newly complete prefix to the writer."""
        if self._in_flight is None:
            return
        work, bucket, pending = self._in_flight
        self._in_flight = None
        for (slot, _), (pred_HW, conf_HW) in zip(bucket, pending.result(), strict=True):
            slot["pred"], slot["conf"] = pred_HW, conf_HW
        self.summary.num_labeled += len(bucket)
        self.progress.update(len(bucket))
        self._advance(work)


class _Progress:
    """tqdm over this rank's samples (rank 0 only): images/s, ETA, shards done, failed so far.

    The total comes from the input folders' `index.json` where known, else it is re-estimated after every shard
    from the shards done so far.
    """

    def __init__(self, config: PseudoLabelConfig, rank: int, world_size: int, urls: list[str]):
        self.bar = None
        self.num_shards = len(urls)
        if not config.progress or rank != 0:
            return
        from tqdm import tqdm

        counts = index_sample_counts(urls)
        self.estimate = None in counts
        desc = "pseudo-label" if world_size == 1 else f"pseudo-label rank 0/{world_size}"
        self.bar = tqdm(
            total=None if self.estimate else sum(counts),
            unit="img",
            desc=desc,
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.05,
        )

    def update(self, num: int) -> None:
        if self.bar is not None:
            self.bar.update(num)

    def shard_done(self, summary: RankSummary) -> None:
        if self.bar is None:
            return
        done = summary.num_shards_labeled
        if self.estimate:
            self.bar.total = round(self.bar.n + self.bar.n / done * (self.num_shards - done))
        self.bar.set_postfix(shards=f"{done}/{self.num_shards}", failed=summary.num_failed, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
