"""Read-once load, the pure part: when to share reads (``SHARDCKPT_READ_ONCE``), which byte
spans a read request touches, and which rank reads each span several ranks want
(:func:`plan_units`, the same on every rank). The collective part is :mod:`.readonce`."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import knobs
from ..format.dtypes import itemsize
from ..format.shard import Piece
from ..storage import Location
from .reader import CheckpointReader, piece_span

# statfs f_type of filesystems reached over a network (linux/magic.h and the vendors' own)
NETWORK_FS_MAGIC = {0x6969: "nfs", 0x0BD00BD0: "lustre", 0x47504653: "gpfs",
                    0xFF534D42: "cifs", 0xFE534D42: "smb2", 0x517B: "smb", 0x65735546: "fuse",
                    0x00C36400: "ceph", 0x19830326: "beegfs", 0x01021997: "9p"}
NETWORK_FS_NAMES = ("nfs", "lustre", "gpfs", "cifs", "smb", "fuse", "ceph", "beegfs", "9p")


def filesystem_type(path: str) -> tuple[int | None, str]:
    """(statfs ``f_type``, mount type from ``/proc/mounts``) of the filesystem holding
    ``path`` (its nearest existing parent); None / "" where unknown."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    magic: int | None = None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first word
        if libc.statfs(os.fsencode(path), buf) == 0:
            magic = ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF
    except (OSError, AttributeError):
        pass
    kind, best = "", -1
    try:
        real = os.path.realpath(path)
        with open("/proc/mounts", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > best:
                    kind, best = parts[2], len(mnt)
    except OSError:
        pass
    return magic, kind


def network_filesystem(path: str) -> str | None:
    """The name of the network filesystem holding ``path`` (NFS, Lustre, GPFS, CIFS, FUSE, ...),
    or None for a local one."""
    magic, kind = filesystem_type(path)
    if magic in NETWORK_FS_MAGIC:
        return NETWORK_FS_MAGIC[magic]
    if kind.startswith(NETWORK_FS_NAMES):
        return kind
    return None


def read_once_wanted(locations: Sequence[Location]) -> bool:
    """``SHARDCKPT_READ_ONCE``: ``1`` on, ``0`` off; ``auto`` (the default) on when the first
    location is an object store or a local path on a network filesystem, off on a local disk
    (where a warm page cache can beat the interconnect)."""
    mode = knobs.READ_ONCE.get()
    if mode != "auto":
        return mode == "1"
    first = locations[0]
    if not first.is_local:
        return True
    root = getattr(first, "root", None)
    return isinstance(root, str) and network_filesystem(root) is not None


class CountingLocation:
    """A location whose reads are counted (``bytes_read`` of the load profile); thread-safe."""

    def __init__(self, inner: Location) -> None:
        self._inner, self.bytes_read, self._lock = inner, 0, threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def read_range(self, relpath: str, offset: int, length: int) -> bytes:
        data = self._inner.read_range(relpath, offset, length)
        with self._lock:
            self.bytes_read += len(data)
        return data

    def read_into(self, relpath: str, offset: int, out: memoryview) -> int:
        n = self._inner.read_into(relpath, offset, out)
        with self._lock:
            self.bytes_read += n
        return n


def counted(locations: Sequence[Location]) -> list[Location]:
    """The locations, each wrapped to count the bytes read from it (see :func:`bytes_read`)."""
    return [CountingLocation(loc) for loc in locations]  # type: ignore[misc]


def bytes_read(reader: CheckpointReader) -> int:
    """Bytes the reader read from storage, over its counted locations."""
    return sum(getattr(loc, "bytes_read", 0) for loc in reader.locations)


def spans(meta: Any, offsets: tuple[int, ...], lengths: tuple[int, ...]
          ) -> list[tuple[Piece, int, int]]:
    """(piece, start, end): the raw bytes of each piece that ``read_box`` of this box reads."""
    isz = itemsize(meta.dtype)
    out = []
    for piece in meta.pieces:
        span = piece_span(piece, isz, offsets, lengths)  # as read_box reads it
        if span is not None:
            out.append((piece, span.start, span.end))
    return out


@dataclass(frozen=True)
class Unit:
    """Bytes ``[lo, hi)`` of piece ``piece`` of file ``file`` (indexes into the sorted file
    names and the file's header), read by ``reader`` and sent to each other rank of ``spans``
    (rank -> its own [start, end))."""

    file: int
    piece: int
    lo: int
    hi: int
    reader: int
    spans: dict[int, tuple[int, int]] = field(hash=False)


def plan_units(world: int, file_sizes: Sequence[int], files_of: Sequence[Sequence[int]],
               spans_of: Sequence[Sequence[Sequence[int]]]) -> tuple[list[Unit], list[int]]:
    """Pure, and the same on every rank: the shared units and every rank's bytes to read.

    ``files_of[r]``: the files rank ``r`` reads; ``spans_of[r]``: its ``[file, piece, start,
    end]`` in the files two or more ranks read. Overlapping spans of one piece form a unit; a
    unit of one rank stays its own read. Units of several ranks go, largest first, each to the
    one of its ranks with the fewest bytes so far (ties: the lowest rank)."""
    readers: dict[int, int] = {}
    for files in files_of:
        for f in files:
            readers[f] = readers.get(f, 0) + 1
    load = [sum(file_sizes[f] for f in files if readers[f] == 1) for files in files_of]
    by_piece: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for rank, rank_spans in enumerate(spans_of):
        for f, p, s, e in rank_spans:
            if e > s:
                by_piece.setdefault((f, p), []).append((s, e, rank))
    shared: list[tuple[int, int, int, int, dict[int, tuple[int, int]]]] = []
    for (f, p), items in sorted(by_piece.items()):
        groups: list[list[Any]] = []  # [lo, hi, {rank: (start, end)}], overlapping spans merged
        for s, e, rank in sorted(items):
            if groups and s < groups[-1][1]:
                g = groups[-1]
                g[1] = max(g[1], e)
                old = g[2].get(rank)
                g[2][rank] = (min(s, old[0]), max(e, old[1])) if old else (s, e)
            else:
                groups.append([s, e, {rank: (s, e)}])
        for lo, hi, group in groups:
            if len(group) > 1:
                shared.append((f, p, lo, hi, group))
            else:
                (only, (a, b)), = group.items()
                load[only] += b - a
    units = []
    for f, p, lo, hi, group in sorted(shared, key=lambda u: (u[2] - u[3], u[0], u[1], u[2])):
        reader = min(group, key=lambda r: (load[r], r))
        load[reader] += hi - lo
        units.append(Unit(f, p, lo, hi, reader, group))
    units.sort(key=lambda u: (u.file, u.piece, u.lo))
    assert all(0 <= r < world for u in units for r in u.spans)
    return units, load
