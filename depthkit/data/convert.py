"""Writing shards from manifests, photo folders and the synthetic scene generator.

Each writer also writes `index.json` beside the shards (kind, sample counts per shard, skipped inputs), written
to a temporary name and renamed like the shards themselves.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from depthkit._files import write_json_atomic
from depthkit.data.formats import IMAGE_SUFFIXES, load_image
from depthkit.data.manifest import load_row, read_manifest, sample_key
from depthkit.data.shards import (
    FORMAT_VERSION,
    INDEX_NAME,
    WRITING_MARKER,
    ShardWriter,
    encode_sample,
    source_image_bytes,
)


def write_index(out_dir: str | Path, index: dict) -> None:
    """Write `index.json` atomically."""
    write_json_atomic(Path(out_dir) / INDEX_NAME, index)


def check_out_dir(out_dir: Path, overwrite: bool, options: tuple[str, str] = ("out_dir", "overwrite=True")) -> list:
    """The shards `out_dir` holds, when it may be written: a folder (or nothing yet) without shards, or `overwrite`.

    Raises:
        ValueError: naming the two `options` (the folder's and the overwrite's, as the caller spells them).
    """
    folder_option, overwrite_option = options
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{folder_option} {out_dir} is a file, not a folder")
    existing = sorted(out_dir.glob("*.tar"))  # none when the folder does not exist yet
    if existing and not overwrite:
        raise ValueError(
            f"{folder_option} {out_dir} already holds {len(existing)} shard(s) (e.g. {existing[0].name}); "
            f"pass {overwrite_option} to replace them"
        )
    return existing


@contextmanager
def writing(out_dir: Path, *, overwrite: bool = False):
    """Mark `out_dir` as being written until the block ends: readers refuse it while it holds the mark and no index
    (`shard_paths`), so a killed writer's part is never taken for a dataset. An older dataset's `index.json` is
    removed first: it would vouch for the new shards (a killed `--overwrite` run once looked complete). A folder
    holding shards is refused (`check_out_dir`) unless `overwrite`; then its shards are removed."""
    existing = check_out_dir(out_dir, overwrite)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX_NAME).unlink(missing_ok=True)
    marker = out_dir / WRITING_MARKER
    marker.touch()
    # `*.tar.tmp`: shards an interrupted run never finished (writers rename a shard only when it is complete).
    for path in [*existing, *out_dir.glob("*.tar.tmp")]:
        path.unlink()
    try:
        yield
    except BaseException:
        if not any(out_dir.glob("*.tar")):  # the writer took its shards back: nothing to refuse
            marker.unlink(missing_ok=True)
            if created and not any(out_dir.iterdir()):
                out_dir.rmdir()
        raise
    marker.unlink(missing_ok=True)


def _write(
    samples: Iterable[tuple[dict, dict]],
    out_dir,
    *,
    kind: str,
    shard_size: int,
    prefix: str,
    skipped: list[str],
    overwrite: bool,
) -> dict:
    """Encode `(sample, encode_kwargs)` pairs into shards and write the index.

    A failure removes the shards this call finished (a part of a dataset, without an index, is easily taken for
    all of it) and `out_dir` when this call created it.
    """
    out_dir = Path(out_dir)
    with writing(out_dir, overwrite=overwrite):
        writer = ShardWriter(out_dir, prefix=prefix, shard_size=shard_size)
        try:
            with writer:
                for sample, kwargs in samples:
                    writer.write(encode_sample(sample, **kwargs))
        except BaseException:
            for path, _ in writer.written:
                path.unlink(missing_ok=True)
            raise
        index = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "num_samples": sum(n for _, n in writer.written),
            "shards": {path.name: n for path, n in writer.written},
            "skipped": skipped,
        }
        write_index(out_dir, index)
    return index


def convert_manifest(
    manifest,
    out_dir,
    *,
    shard_size: int = 1000,
    prefix: str = "shard",
    licence: str = "",
    on_error: str = "raise",
    overwrite: bool = False,
) -> dict:
    """Convert a manifest of RGB-D pairs into labeled shards; returns the index."""
    skipped: list[str] = []
    rows = read_manifest(manifest, skipped=skipped if on_error == "skip" else None)

    def samples() -> Iterator[tuple[dict, dict]]:
        for row in rows:
            try:
                sample = load_row(row)
                if not sample["valid"].any():  # a label that teaches nothing is a broken file or a wrong codec
                    raise ValueError(
                        f"{row.where}: depth {row.depth_path} has no valid pixel (check its depth_format, "
                        "scale_to_metres and invalid columns)"
                    )
            except (ValueError, FileNotFoundError) as err:
                if on_error == "raise":
                    raise
                skipped.append(str(err))
                continue
            if licence and not sample["meta"]["licence"]:
                sample["meta"]["licence"] = licence
            passthrough = source_image_bytes(row.rgb_path)
            if passthrough is not None:
                sample["image_bytes"] = passthrough
            # Integer-coded sources store their own integer steps exactly (16-bit PNG); others go to float npz.
            scale = row.codec.scale if row.codec.depth_format.startswith("uint16_png") else None
            yield sample, {"target_scale": scale}

    return _write(
        samples(), out_dir, kind="labeled", shard_size=shard_size, prefix=prefix, skipped=skipped, overwrite=overwrite
    )


def find_images(folder) -> list[Path]:
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"--images {folder} is a file; give the folder of photos")
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return paths


def convert_images(
    folder,
    out_dir,
    *,
    shard_size: int = 1000,
    prefix: str = "shard",
    licence: str = "",
    on_error: str = "raise",
    overwrite: bool = False,
) -> dict:
    """Convert a folder of photos (recursive) into unlabeled shards; returns the index."""
    folder = Path(folder)
    paths = find_images(folder)
    skipped: list[str] = []
    seen: dict[str, Path] = {}

    def samples() -> Iterator[tuple[dict, dict]]:
        for path in paths:
            relative = path.relative_to(folder).as_posix()
            key = sample_key(relative)
            if key in seen:
                raise ValueError(f"{path} and {seen[key]} map to the same sample key {key!r}; rename one")
            seen[key] = path
            try:
                image = load_image(path)  # decode first: a bad photo never lands in a shard
            except (ValueError, FileNotFoundError) as err:
                if on_error == "raise":
                    raise
                skipped.append(str(err))
                continue
            meta = {"kind": "unlabeled", "source": folder.name, "licence": licence, "origin": {"path": relative}}
            sample = {"__key__": key, "meta": meta, "image": image}
            passthrough = source_image_bytes(path)  # keep the photo's own bytes when they are plain 8-bit RGB
            if passthrough is not None:
                sample["image_bytes"] = passthrough
            yield sample, {}

    return _write(
        samples(), out_dir, kind="unlabeled", shard_size=shard_size, prefix=prefix, skipped=skipped, overwrite=overwrite
    )


def _synth_shard(job: tuple) -> tuple[str, int]:
    out_dir, shard_index, first, count, size, seed, labeled, image_format = job
    from depthkit.data.synthetic import DEPTH_STEP_M, render_scene

    with ShardWriter(out_dir, prefix="synth", shard_size=count + 1, start_index=shard_index) as writer:
        for index in range(first, first + count):
            sample = render_scene(seed, index, *size)
            if not labeled:  # no target, so no output space: pseudo-labels bring their own
                meta = {k: v for k, v in sample["meta"].items() if k != "output_space"}
                sample = {"__key__": sample["__key__"], "image": sample["image"], "meta": {**meta, "kind": "unlabeled"}}
            writer.write(encode_sample(sample, image_format=image_format, target_scale=DEPTH_STEP_M))
    ((path, n),) = writer.written
    return path.name, n


def write_synthetic(
    out_dir,
    *,
    num: int,
    size=(256, 256),
    seed: int = 0,
    first_index: int = 0,
    labeled: bool = True,
    shard_size: int = 1000,
    image_format: str = "jpg",
    workers: int = 1,
    overwrite: bool = False,
) -> dict:
    """Render `num` procedural scenes into shards (in parallel over shards); returns the index."""
    for name, value in (("num", num), ("shard_size", shard_size), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"write_synthetic: {name} must be an integer >= 1, got {value!r}")
    if len(tuple(size) if isinstance(size, list | tuple) else ()) != 2 or min(size) < 1:
        raise ValueError(f"write_synthetic: size must be (height, width) in pixels, got {size!r}")
    jobs = [
        (str(out_dir), i, first_index + start, min(shard_size, num - start), tuple(size), seed, labeled, image_format)
        for i, start in enumerate(range(0, num, shard_size))
    ]
    with writing(Path(out_dir), overwrite=overwrite):
        start_time = time.perf_counter()
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                written = pool.map(_synth_shard, jobs)
        else:
            written = [_synth_shard(job) for job in jobs]
        elapsed = time.perf_counter() - start_time
        index = {
            "format_version": FORMAT_VERSION,
            "kind": "labeled" if labeled else "unlabeled",
            "num_samples": num,
            "shards": dict(written),
            "skipped": [],
            "synthetic": {"seed": seed, "first_index": first_index, "size": list(size)},
        }
        write_index(out_dir, index)
    return {**index, "images_per_second": num / max(elapsed, 1e-9)}
