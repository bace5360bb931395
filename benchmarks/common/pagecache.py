"""Evicting files from the page cache before a read, and measuring what stayed resident.

A read benchmark that finds its file in memory measures memory, not the disk. ``PageCache``
evicts first (``/proc/sys/vm/drop_caches`` where permitted, which needs root; otherwise fsync +
``posix_fadvise(DONTNEED)`` on every file) and then reports, with ``mincore``, how many bytes of
the files are still resident, so a result can say how far eviction took. On tmpfs nothing can be
evicted.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

_NOTES = {
    "drop_caches": "sync + echo 1 > /proc/sys/vm/drop_caches before every read phase",
    "fadvise": "drop_caches denied {why}; fsync + posix_fadvise(DONTNEED) on every file to be "
               "read before every read phase (reads may be partly cached if eviction did not "
               "take; see resident_bytes_before)",
}


def files_under(path: str) -> list[str]:
    """``path`` itself if it is a file, else every file below it."""
    if os.path.isfile(path):
        return [path]
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]


def resident_bytes(paths: list[str]) -> int:
    """Bytes of the files at or below ``paths`` that are in the page cache; -1 if unknown."""
    total = 0
    for p in paths:
        for f in files_under(p):
            r = _mincore_resident(f)
            if r < 0:
                return -1
            total += r
    return total


def _mincore_resident(path: str) -> int:
    """Bytes of ``path`` in the page cache (mincore on a read-only mapping); -1 if unknown."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        size = os.path.getsize(path)
        if size == 0:
            return 0
        page = os.sysconf("SC_PAGE_SIZE")
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return -1
            try:
                npages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * npages)()
                if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return -1
                return sum(b & 1 for b in vec) * page
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        return -1


def _process_group() -> bool:
    """Whether a default torch.distributed process group exists (without importing torch)."""
    d = sys.modules.get("torch.distributed")
    return d is not None and d.is_available() and d.is_initialized()


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def _fadvise_out(paths: list[str]) -> None:
    for p in paths:
        for f in files_under(p):
            with contextlib.suppress(OSError):
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


class PageCache:
    """Evicts files from the page cache before a read: ``drop_caches``, else ``fadvise``.

    ``PageCache(enabled)`` picks the method once: global rank 0 tries ``drop_caches`` and, under
    a process group, tells the other ranks what worked (every rank must construct it, in the
    same order as other collectives). ``method`` is then ``"drop_caches"``, ``"fadvise"`` or
    ``"none"`` (when not ``enabled``), and ``note`` a sentence for the results saying what was
    done. Single-process use needs no process group.
    """

    def __init__(self, enabled: bool) -> None:
        self.method = "none"
        self.note = "page cache not dropped (--no-drop-caches): reads may be served from memory"
        if not enabled:
            return
        if int(os.environ.get("RANK", "0")) == 0:
            try:
                _drop_caches()
                self.method = "drop_caches"
            except OSError as exc:
                self.method = f"fadvise ({exc})"
        if _process_group():
            import torch.distributed as dist

            obj = [self.method]
            dist.broadcast_object_list(obj, src=0)
            self.method = obj[0]
        self.method, why = self.method.split(" ", 1) if " " in self.method else (self.method, "")
        self.note = _NOTES[self.method].format(why=why)

    def evict(self, paths: list[str]) -> int:
        """Evict ``paths`` (files or directories), then return how many of their bytes are still
        resident (-1 if unknown).

        Under a process group every rank must call it (it ends with a barrier); local rank 0
        evicts for the whole node, the other ranks pass the paths they will read for the count.
        """
        if self.method != "none" and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            if self.method == "drop_caches":
                _drop_caches()
            else:
                _fadvise_out(paths)
        if _process_group():
            import torch.distributed as dist

            dist.barrier()
        return resident_bytes(paths)
