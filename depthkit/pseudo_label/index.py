"""The output folder's bookkeeping: one record per finished shard, merged into `index.json`.

    OUT/X.tar                 the pseudo-labels of input shard X.tar (renamed into place when complete)
    OUT/records/X.tar.json    written right after X.tar is in place: sample count, failed keys, label settings
    OUT/index.json            every record merged (rewritten by the ranks as shards finish)

A shard is *finished* when both its tar and its record exist; a rerun skips finished shards and redoes the rest
(a tar without a record, from a kill between the rename and the record, is redone). Records are the truth for
resuming; `index.json` is their merged view. Each rank rewrites it after every finished shard and when it stops,
re-reading the records folder until no record appeared meanwhile, so concurrent ranks never lose a shard for long
and the last rewrite of a job is complete. At scale (tens of thousands of shards, a multi-MB index) a rank skips a
rewrite while the previous one is more recent than 20x its own duration (index upkeep stays under ~5% of the
time) or than `min_interval_s`. All files are written to a temporary name and renamed.

Label settings (`LabelSettings`) are what makes two labels comparable: teacher hash, model, resolution, TTA,
confidence, precision, encoding. A run whose settings differ from those of finished shards is refused unless mixing is
allowed; each record (and each sample's provenance) names its own settings either way.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from depthkit._files import write_json_atomic
from depthkit.data.shards import INDEX_NAME

RECORDS_DIR = "records"
INDEX_FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class LabelSettings:
    """Everything about a run that changes the labels it writes."""

    teacher_sha256: str
    """sha256 of the teacher's weights file."""
    model: str
    """Registry name of the teacher."""
    resolution: int
    """Short side of the network input (official rounding to the patch size)."""
    tta: str
    """"none" or "hflip"."""
    confidence: bool
    """Whether `KEY.confidence.png` is written."""
    precision: str
    """"fp32" or "bf16" (autocast)."""
    encoding: str = "npz"
    """How targets are stored: "npz" (float32, lossless), "f16" (float16 npz) or "png16" (16 bits per image)."""
    label_size: str = "network"
    """The stored labels' size: "network" (the network's output for images larger than it) or "image"."""

    def to_dict(self) -> dict:
        return asdict(self)

    def differences(self, other: dict) -> list[tuple[str, object, object]]:
        """`(field, theirs, ours)` for each field that differs from a record's settings (`recorded_settings`)."""
        theirs = recorded_settings(other)
        return [(name, theirs.get(name), value) for name, value in self.to_dict().items() if theirs.get(name) != value]


RECORDED_BEFORE = {"label_size": "image"}
"""The settings of records written before a field existed."""
COMMAND_OPTIONS = ("resolution", "tta", "precision", "encoding", "label_size")
"""The settings a rerun sets with a `depthkit pseudo-label` option of the same name (the others: the teacher)."""


def recorded_settings(settings: dict) -> dict:
    """A record's settings, a field it predates with the value its run had (`RECORDED_BEFORE`)."""
    return {**RECORDED_BEFORE, **settings}


def record_path(out_dir: Path, shard_name: str) -> Path:
    return Path(out_dir) / RECORDS_DIR / f"{shard_name}.json"


def write_record(out_dir: Path, record: dict) -> None:
    """Record a finished shard (after its tar is in place)."""
    path = record_path(out_dir, record["shard"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)


def read_records(out_dir: Path, cache: dict[str, dict] | None = None) -> dict[str, dict]:
    """Records of the shards whose record exists, by shard name (records already in `cache` are not re-read)."""
    folder = Path(out_dir) / RECORDS_DIR
    if not folder.is_dir():
        return {}
    records = {}
    for entry in os.scandir(folder):
        if not entry.name.endswith(".json") or entry.name.startswith("."):
            continue
        name = entry.name[: -len(".json")]
        if cache is not None and name in cache:
            records[name] = cache[name]
            continue
        try:
            records[name] = json.loads(Path(entry.path).read_text())
        except (OSError, ValueError):  # a record being replaced right now; the next refresh reads it
            continue
    return records


def finished_shards(out_dir: Path, records: dict[str, dict]) -> dict[str, dict]:
    """The records whose tar is in place."""
    return {name: rec for name, rec in records.items() if (Path(out_dir) / name).is_file()}


def check_settings(records: dict[str, dict], settings: LabelSettings, *, allow_mixed: bool) -> None:
    """Refuse to add labels made with other settings to an output that holds finished shards.

    Raises:
        ValueError: naming a finished shard and every setting that differs.
    """
    if allow_mixed:
        return
    for name, record in sorted(records.items()):
        diffs = settings.differences(record.get("settings", {}))
        if diffs:
            described = "; ".join(f"{field}: {theirs!r} -> {ours!r}" for field, theirs, ours in diffs)
            same = [
                f"--{field.replace('_', '-')} {theirs}"
                for field, theirs, _ in sorted(diffs)
                if field in COMMAND_OPTIONS
            ]
            rerun = f", rerun with the output's own settings ({' '.join(same)})" if same else ""
            raise ValueError(
                f"the output already holds shards labeled with a different teacher or settings (e.g. {name}: "
                f"{described}). Use a new --output folder{rerun}, or pass --allow-mixed-teachers to add "
                "shards labeled this way (each record and each sample's provenance names its own teacher)"
            )


def build_index(records: dict[str, dict], inputs: list[str] | None) -> dict:
    """The merged index: per shard sample count and failed keys, the label settings, what is still pending."""
    shards = {name: rec["num_samples"] for name, rec in sorted(records.items())}
    failed = {name: rec["failed"] for name, rec in sorted(records.items()) if rec.get("failed")}
    settings = []
    for rec in records.values():
        recorded = recorded_settings(rec["settings"])
        if recorded not in settings:
            settings.append(recorded)
    settings.sort(key=lambda s: json.dumps(s, sort_keys=True))
    index = {
        "format_version": INDEX_FORMAT_VERSION,
        "kind": "pseudo",
        "num_samples": sum(shards.values()),
        "num_failed": sum(len(set(f) - {"*"}) for f in failed.values()),
        "num_cut_short": sum("*" in f for f in failed.values()),  # shards whose tar turned unreadable midway
        "shards": shards,
        "failed": failed,
        "teacher": settings[0] if len(settings) == 1 else ("mixed" if settings else None),
        "teachers": settings,
        "records": {name: records[name] for name in sorted(records)},
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if inputs is not None:
        index["inputs"] = list(inputs)
        index["pending"] = [name for name in inputs if name not in records]
        index["complete"] = not index["pending"]
    return index


class IndexWriter:
    """Rewrites `index.json` from the records folder (see the module docstring).

    Args:
        out_dir: The output folder.
        inputs: Output shard names of the whole job (all ranks), for `pending` / `complete`.
        min_interval_s: Least time between two rewrites by this writer, except `refresh(force=True)`.
    """

    # A rewrite is skipped while the last one is more recent than this many times its own duration.
    COST_FACTOR = 20.0
    INDENTED_UP_TO = 1000  # finished shards

    def __init__(self, out_dir: Path, inputs: list[str], *, min_interval_s: float = 0.0):
        self.out_dir, self.inputs, self.min_interval_s = Path(out_dir), list(inputs), min_interval_s
        self._cache: dict[str, dict] = {}
        self._next = -float("inf")

    def refresh(self, *, force: bool = False) -> dict | None:
        """Rewrite the index (unless rate-limited, see the module docstring); returns it when written."""
        now = time.monotonic()
        if not force and now < self._next:
            return None
        for _ in range(10):  # re-read until no other rank finished a shard while this one wrote
            records = finished_shards(self.out_dir, read_records(self.out_dir, self._cache))
            index = build_index(records, self.inputs)
            # Indented for the eye; one line for large jobs (62k shards: 4.5 s a rewrite indented, holding the GIL)
            indent = 1 if len(records) <= self.INDENTED_UP_TO else None
            write_json_atomic(self.out_dir / INDEX_NAME, index, indent=indent)
            self._cache = records
            if set(finished_shards(self.out_dir, read_records(self.out_dir, self._cache))) == set(records):
                break
        spent = time.monotonic() - now
        self._next = now + max(self.min_interval_s, self.COST_FACTOR * spent)
        return index


def read_index(out_dir: str | os.PathLike) -> dict:
    """The `index.json` of a pseudo-label output folder."""
    path = Path(out_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {INDEX_NAME} in {out_dir}")
    return json.loads(path.read_text())
