"""Direct I/O for the large, aligned writes of a local shard file.

A buffered ``write`` copies every byte into the page cache, and the kernel writes it back later.
That copy is system CPU taken from training, and it grows once the page cache is full and each
new page must first be reclaimed: on a 2-core machine, writing 128 MB went from 28 ms of system
CPU into an empty cache to about 300 ms into a full one (docs/benchmarks.md, "Training-loop
overhead"). With ``O_DIRECT`` the disk reads the bytes straight from the process's memory: the
same 128 MB took 7 ms of system CPU, and nothing is left in the cache to evict.

``O_DIRECT`` needs the memory address, the file offset and the length to be multiples of the
block size. Large chunks of a shard file start on 4 KiB boundaries (format/shard.py) and the
staging buffers of a snapshot are page-aligned (engine/snapshot.py), so their bytes go direct;
everything else (preambles, padding, headers, the unaligned end of a chunk, compressed chunks,
the live tensors of a blocking save) goes through the buffered file as before. The two never
share a page, and ``fsync`` on the file covers both. Filesystems without ``O_DIRECT`` (tmpfs)
refuse it when the file is opened: then every write is buffered. ``SHARDCKPT_DIRECT_IO=0`` turns
it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

from .. import knobs

BLOCK = 4096
DIRECT_MIN = 64 * 1024  # smaller writes are cheaper through the page cache


def enabled() -> bool:
    return knobs.DIRECT_IO.get() != 0 and hasattr(os, "O_DIRECT")


def address(view: memoryview) -> int | None:
    """The address of a writable, contiguous buffer; None for one ctypes cannot see into (a
    read-only ``bytes``, say), which is then written buffered."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return None


class DirectWriter:
    """A second descriptor of an open file, with ``O_DIRECT``: :meth:`write` writes the aligned
    part of a buffer at an aligned offset and says how many bytes it took."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, path: str) -> DirectWriter | None:
        """None where the filesystem refuses ``O_DIRECT`` (or it is turned off)."""
        if not enabled():
            return None
        try:
            return cls(os.open(path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0)))
        except OSError:
            return None

    def write(self, view: memoryview, offset: int) -> int:
        """Write the largest whole-block prefix of ``view`` at ``offset`` directly; 0 if it is
        too small or not aligned (the caller then writes it buffered)."""
        if offset % BLOCK:
            return 0
        n = len(view) - len(view) % BLOCK
        if n < DIRECT_MIN or not view.c_contiguous or view.format not in ("B", "b", "c"):
            return 0
        addr = address(view)
        if addr is None or addr % BLOCK:
            return 0
        done = 0
        while done < n:
            done += os.pwrite(self.fd, view[done:n], offset + done)
        return n

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
