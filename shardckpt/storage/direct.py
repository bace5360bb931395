"""Direct I/O for the large, aligned writes of a local shard file.

A buffered ``write`` copies every byte into the page cache, and the kernel writes it back later.
That copy is system CPU taken from training, and it grows once the page cache is full and each
new page must first be reclaimed: on a 2-core machine, writing 128 MB went from 28 ms of system
CPU into an empty cache to about 300 ms into a full one (docs/benchmarks.md, "Training-loop
overhead"). With ``O_DIRECT`` the disk reads the bytes straight from the process's memory: the
same 128 MB took 7 ms of system CPU, and nothing is left in the cache to evict.

``O_DIRECT`` needs the memory address, the file offset and the length to be multiples of the
block size. Large chunks of a shard file start on 4 KiB boundaries (format/shard.py) and the
staging buffers of a snapshot are page-aligned (engine/snapshot.py), so their bytes go direct.
The live tensors that a blocking save writes from are not aligned: the encoder threads copy
their chunks into aligned buffers ahead of the writer (engine/bounce.py), so a blocking save
writes as an async one does, never through the page cache and without a second full copy of the
state. A large chunk that still reaches the writer at an unaligned address (a memory budget too
small for the encoders' buffers) is staged through an aligned *bounce buffer* of the writer (at
most ``BOUNCE_MAX`` bytes, and a 64th of ``SHARDCKPT_MEMORY_BUDGET``). Everything else
(preambles, padding, headers, the unaligned end of a chunk, compressed chunks, read-only
buffers) goes through the buffered file as before. The two never
share a page, and ``fsync`` on the file covers both. Filesystems without ``O_DIRECT`` (tmpfs)
refuse it when the file is opened: then every write is buffered. ``SHARDCKPT_DIRECT_IO=0`` turns
it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os

from .. import knobs

BLOCK = 4096
DIRECT_MIN = 64 * 1024  # smaller writes are cheaper through the page cache
# A shard file's sink writes chunks under 1 MiB buffered (fsync at the file's commit covers
# them): a direct write waits for the device, and 84 writes of 76 KiB took 56-94 ms direct
# against 10-36 ms buffered + fsync on this machine's virtual disk (from 1 MiB on, direct wins).
DIRECT_WRITE_MIN = 1 << 20
BOUNCE_MAX = 8 << 20  # bytes of one writer's bounce buffer


def bounce_size() -> int:
    """Bytes of one bounce buffer: within the memory budget, in whole blocks."""
    size = min(BOUNCE_MAX, knobs.MEMORY_BUDGET.get() // 64)
    return max(DIRECT_MIN, size - size % BLOCK)


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous, page-aligned memory. From 2 MiB on it asks for transparent huge pages (where
    the kernel gives them on request, ``madvise`` mode): 512 times fewer page faults on first
    touch, and fewer TLB misses in every copy into it."""
    buf = mmap.mmap(-1, nbytes)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and nbytes >= 2 << 20:
        with contextlib.suppress(OSError, ValueError):
            buf.madvise(advice)
    return buf


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
        self._bounce: mmap.mmap | None = None  # page-aligned, made at the first unaligned write
        self._bounce_addr = 0

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
        """Write the largest whole-block prefix of ``view`` at ``offset`` directly (through the
        bounce buffer if ``view`` is not aligned); 0 if it is too small, at an unaligned offset
        or read-only (the caller then writes it buffered)."""
        if offset % BLOCK:
            return 0
        n = len(view) - len(view) % BLOCK
        if n < DIRECT_MIN or not view.c_contiguous or view.format not in ("B", "b", "c"):
            return 0
        addr = address(view)
        if addr is None:
            return 0
        if addr % BLOCK:
            return self._write_bounced(addr, n, offset)
        done = 0
        while done < n:
            done += os.pwrite(self.fd, view[done:n], offset + done)
        return n

    def _write_bounced(self, addr: int, n: int, offset: int) -> int:
        if self._bounce is None:
            self._bounce = aligned_buffer(bounce_size())
            self._bounce_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._bounce))
        size = len(self._bounce)
        with memoryview(self._bounce) as bounce:
            done = 0
            while done < n:
                k = min(size, n - done)
                ctypes.memmove(self._bounce_addr, addr + done, k)  # without the GIL
                written = 0
                while written < k:
                    written += os.pwrite(self.fd, bounce[written:k], offset + done + written)
                done += k
        return n

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if self._bounce is not None:
            with contextlib.suppress(BufferError):
                self._bounce.close()
            self._bounce = None
