"""Writing files so that a reader never sees a half-written one: to a temporary name beside the target, then a
rename (atomic on POSIX within one file system). Standard library only: the torch-free runtime may use it.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def naming_errors(path: str | Path) -> Iterator[None]:
    """Name `path` in an OS error raised without a file name. A failed write (a full disk, a quota) says only
    "[Errno 28] No space left on device", and a command's one-line error should say which output it was writing."""
    try:
        yield
    except OSError as e:
        if e.errno is not None and e.filename is None:
            e.filename = str(path)
        raise


@contextmanager
def replacing(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error, rename it to `path`.

    The temporary name is unique to this host and process (several ranks may write one file, e.g. an index), and
    is removed on error. The file gets the mode a plain `open()` would give (some writers, e.g. safetensors,
    create 0600). `fsync=True` flushes it to disk before the rename, for files a crash must not truncate.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        with naming_errors(path):  # a full disk may show only at the fsync (NFS)
            yield tmp
            if fsync:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes, *, fsync: bool = False) -> None:
    """`path.write_bytes(data)`, through `replacing`."""
    with replacing(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def read_json_object(path: str | Path) -> dict:
    """A JSON object file as a dict; {} when the file is missing, unreadable, not JSON or not an object (marks and
    indexes that other tools, or nothing, may have left)."""
    try:
        with open(path) as file:
            obj = json.load(file)
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def write_json_atomic(path: str | Path, obj, *, indent: int | None = 1) -> None:
    """Write `obj` as JSON with sorted keys (indented unless `indent=None`: one line, written by json's C encoder,
    several times faster on large objects), synced to disk before the rename (indexes, records)."""
    separators = None if indent is not None else (",", ":")
    text = json.dumps(obj, indent=indent, sort_keys=True, separators=separators) + "\n"
    write_bytes_atomic(path, text.encode(), fsync=True)
