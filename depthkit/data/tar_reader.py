"""Reading tar shards: members grouped into raw samples by key, damage and cut-offs detected.

What every reader of shards goes through (`depthkit.data.stream` for training, `depthkit.pseudo_label` for the
teacher's inputs): local files, `http(s)://` URLs and `pipe:` commands (webdataset's `gopen`), plain or compressed
tar. `tarfile` alone takes a damaged header, a zeroed block or a file cut between two members for the end of the
archive; `iter_raw_samples` checks what follows and raises `ShardFormatError` naming the shard and the last good key.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Iterator

from depthkit.data.shards import REMOTE_SCHEMES, ShardFormatError


def _open(url: str):
    if url.startswith(REMOTE_SCHEMES):
        import webdataset as wds

        return wds.gopen(url, "rb")
    return open(url, "rb")


class _RecentReads:
    """A read-through file wrapper that keeps its last two reads and their place in the stream, so that what follows
    the last member of a tar can be checked after `tarfile` stops reading."""

    def __init__(self, raw):
        self.raw, self.pos, self.previous, self.last = raw, 0, b"", b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.pos += len(data)
        self.previous, self.last = self.last, data
        return data

    def bytes_at(self, offset: int, size: int) -> bytes | None:
        """Up to `size` bytes of the stream from `offset` (read on as needed; fewer at its end), or None when
        `offset` lies before the recent reads."""
        window = self.previous + self.last
        start = self.pos - len(window)
        if offset < start:
            return None
        data = window[offset - start :]
        while len(data) < size and (more := self.raw.read(size - len(data))):
            self.pos += len(more)
            data += more
        return data[:size]


def _check_end(tar: tarfile.TarFile, reads: _RecentReads) -> None:
    """Raise `tarfile.ReadError` unless the archive ends with its end-of-archive marker (zero blocks).

    `tarfile` takes a damaged header after the first member, a zeroed one, and a file cut off between two members,
    for the end of the archive: the samples after it would be lost without a word. The rest of the stream is read:
    only zeros (the record padding) may follow the marker.
    """
    if getattr(tar.fileobj, "comptype", None) != "tar":  # compressed: offsets are in the decompressed stream
        return
    # What the stream holds from the end tarfile saw: at least the marker's two blocks, and all that was read past it.
    tail = reads.bytes_at(tar.offset, max(2 * tarfile.BLOCKSIZE, reads.pos - tar.offset))
    if tail is None:
        return
    if len(tail) < tarfile.BLOCKSIZE:
        raise tarfile.ReadError("cut off: no end-of-archive marker")
    if any(tail[: tarfile.BLOCKSIZE]):
        raise tarfile.ReadError(f"damaged member header at byte {tar.offset}")
    # Only zeros may follow the marker (padding to the record size). A header zeroed in the middle (a bad sector, a
    # hole left by a crash) reads as the marker too: the members after it would be dropped without a word.
    while tail:
        if tail.count(0) != len(tail):
            raise tarfile.ReadError(f"zeroed member header at byte {tar.offset}: archive data follows it")
        tail = reads.raw.read(1 << 20)


CURL_EXITS = {6: ": unknown host", 7: ": could not connect", 22: ": an HTTP error, e.g. 404", 28: ": timed out"}


def split_member_name(name: str) -> tuple[str, str]:
    """A tar member's (sample key, extension), by the WebDataset rule: the key is the name up to the first dot of
    its basename, with its folder."""
    dirname, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{dirname}/{key}" if dirname else key), ext


def first_key(path: str) -> str | None:
    """The key of a local tar's first sample (its first file; a header read or a few), or None for an empty or
    unreadable one."""
    try:
        with tarfile.open(path, "r:*") as tar:
            member = tar.next()
            while member is not None and not member.isfile():  # a folder entry (`tar -cf s.tar .`)
                member = tar.next()
    except (tarfile.TarError, OSError):
        return None
    return None if member is None else split_member_name(member.name)[0]


def iter_raw_samples(url: str) -> Iterator[dict]:
    """Group a tar stream's members by key (WebDataset rule: name up to the first dot of the basename).

    Raises:
        ShardFormatError: for an unreadable, corrupt or cut-off tar, naming the shard and the last good key (after
            the samples before the damage; the sample being read when the tar ended is not among them, since a cut
            may have taken some of its members).
    """
    current: dict | None = None
    last_key = None
    try:
        with _open(url) as raw, tarfile.open(fileobj=(reads := _RecentReads(raw)), mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if current is not None and current["__key__"] != key:
                    yield current
                    last_key, current = current["__key__"], None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                data = tar.extractfile(member)
                current[ext] = data.read() if data is not None else b""
            _check_end(tar, reads)  # before the last sample: a cut may have taken its other members
            if current is not None:
                yield current
    except (tarfile.TarError, OSError, EOFError) as err:
        where = f"after key {last_key}" if last_key else "at its start"
        if (failed := re.search(r"\): exit (\d+) \(", str(err))) and not last_key:  # webdataset's pipe status
            code = int(failed.group(1))
            what = f"curl exited with {code}" + CURL_EXITS.get(code, "") if url.startswith("http") else f"exit {code}"
            raise ShardFormatError(f"shard {url}: could not be fetched ({what})") from None
        raise ShardFormatError(f"shard {url}: corrupt or unreadable tar {where} ({err})") from None


def members_digest(path: str) -> str | None:
    """sha256 of a local tar's member names and sizes, in order (headers only), or None for an unreadable one."""
    digest = hashlib.sha256()
    try:
        with tarfile.open(path, "r:") as tar:  # random access: seeks past each member's data
            for member in tar:
                digest.update(f"{member.name}\t{member.size}\n".encode())
    except (tarfile.TarError, OSError):
        return None
    return digest.hexdigest()
