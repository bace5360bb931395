"""Writing one new local file: large aligned buffers direct, small writes packed.

A shard file gets large chunks (written direct: storage/direct.py) and small writes: the
preamble, padding, headers, and every chunk under ``DIRECT_WRITE_MIN`` (a fine-tuning state's
adapters and their optimizer moments: hundreds of them). Through the page cache, those small
writes cost a copy into the cache and the allocation of every page, in system CPU; once the
cache is full, each new page must first be reclaimed (storage/direct.py: about 2 ms per MB on
the benchmark machine), and the disk gets them only at the ``fsync``. Written direct one by one
they would each wait for the device. So where the file has a direct descriptor, small writes
are *packed*: copied into a page-aligned staging buffer that stands for the next bytes of the
file (small copies keep the GIL: releasing and taking it back costs more than the copy), and
written direct in whole blocks once it is full, before any large direct write (whose offset is
block-aligned, so the staged bytes end on a block boundary), and at the commit. A full buffer
is written by a flusher thread while the file's own thread fills the next one (at most
:data:`IN_FLIGHT` per file in flight); the commit waits for them all before its ``fsync``. Only
the file's last partial block goes through the page cache, after every direct write and on a
page of its own; the ``fsync`` covers both. A direct write refused at any point (in a flusher
or not) is written again through the page cache, and so is everything after it: no byte is
lost or written twice to different places. Staging buffers (:data:`STAGE_BYTES`) are kept for
the next file (at most :data:`KEEP_STAGES`).

Without a direct descriptor (tmpfs, ``SHARDCKPT_DIRECT_IO=0``), or once the filesystem refuses a
direct write, every byte goes through the page cache as before, handed to the disk's writeback
as it is written (storage/writeback.py) rather than all at the ``fsync``.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import stat
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from .. import knobs
from ..errors import StorageError
from .base import Sink
from .direct import BLOCK, DIRECT_WRITE_MIN, DirectWriter, address, aligned_buffer
from .writeback import KICK_BYTES, start_writeback

WRITE_BUFFER = 1 << 20
STAGE_BYTES = 2 << 20  # a staging buffer: written out once full
KEEP_STAGES = 16
IN_FLIGHT = 2  # full buffers of one file being written at once
FLUSH_THREADS = 4
COPY_NOGIL = 1 << 20  # smaller copies keep the GIL: a release and re-take costs more

_free: list[mmap.mmap] = []
_free_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def drop_world_write(fd: int) -> None:
    """Default modes (umask): clear ``o+w`` if a permissive umask (e.g. 000) let it through."""
    with contextlib.suppress(OSError):  # a filesystem without modes: nothing to drop
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o002:
            os.fchmod(fd, mode & ~0o002)


def fsync_enabled() -> bool:
    return knobs.FSYNC.get() != 0


def _take_stage() -> mmap.mmap:
    with _free_lock:
        while _free:
            buf = _free.pop()
            if len(buf) == STAGE_BYTES:
                return buf
    return aligned_buffer(STAGE_BYTES)


def _give_stage(buf: mmap.mmap) -> None:
    with _free_lock:
        if len(_free) < KEEP_STAGES:
            _free.append(buf)
            return
    with contextlib.suppress(BufferError):
        buf.close()


def _flusher() -> ThreadPoolExecutor:
    """The threads that write full staging buffers (shared by every file of the process)."""
    global _pool
    with _free_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=FLUSH_THREADS,
                                       thread_name_prefix="shardckpt-flush")
        return _pool


def _forget() -> None:  # a forked child: the parent's threads do not exist here
    global _pool, _free_lock
    _pool, _free_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget)


def _pwrite_all(fd: int, buf: mmap.mmap, n: int, offset: int) -> None:
    with memoryview(buf) as mv:
        written = 0
        while written < n:
            written += os.pwrite(fd, mv[written:n], offset + written)


class _Stage:
    """The next bytes of a direct file, from block-aligned ``start``: ``fill`` bytes held. A
    full buffer is written by a flusher thread while the next one fills (at most
    :data:`IN_FLIGHT` per file); :meth:`drain` waits for them."""

    def __init__(self, start: int) -> None:
        self.buf = _take_stage()
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        self.start, self.fill = start, 0
        self.pending: list[tuple[Future[None], mmap.mmap, int, int]] = []
        self.failed = False  # a direct write was refused: its bytes went through the cache

    def add(self, view: memoryview, direct_fd: int, f: BinaryIO) -> None:
        done = 0
        while done < view.nbytes:
            k = min(STAGE_BYTES - self.fill, view.nbytes - done)
            src = address(view[done:done + k]) if k >= COPY_NOGIL else None
            if src is not None:
                ctypes.memmove(self.addr + self.fill, src, k)  # without the GIL
            else:
                self.buf[self.fill:self.fill + k] = view[done:done + k]
            self.fill += k
            done += k
            if self.fill == STAGE_BYTES:
                self.flush(direct_fd, f)

    def flush(self, direct_fd: int, f: BinaryIO) -> None:
        """Hand the whole blocks held to a flusher thread; keep the partial last block."""
        n = self.fill - self.fill % BLOCK
        if not n:
            return
        old, tail = self.buf, self.fill - n
        self.buf = _take_stage()
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        if tail:
            self.buf[:tail] = old[n:n + tail]
        self.pending.append((_flusher().submit(_pwrite_all, direct_fd, old, n, self.start),
                             old, n, self.start))
        self.start += n
        self.fill = tail
        while len(self.pending) > IN_FLIGHT:
            self._settle(0, f)

    def _settle(self, i: int, f: BinaryIO | None) -> None:
        future, buf, n, offset = self.pending.pop(i)
        try:
            future.result()
        except OSError:
            self.failed = True
            if f is not None:  # written again through the page cache (same bytes)
                f.seek(offset)
                with memoryview(buf) as mv:
                    f.write(mv[:n])
        _give_stage(buf)

    def drain(self, f: BinaryIO | None) -> bool:
        """Wait for every flush; a refused one is written through ``f`` (None: dropped, the
        file is being aborted). Whether any direct write was refused."""
        while self.pending:
            self._settle(0, f)
        return self.failed

    def spill(self, f: BinaryIO) -> None:
        """Write everything held through ``f`` (the buffered file), at its offset."""
        f.seek(self.start)
        with memoryview(self.buf) as mv:
            f.write(mv[:self.fill])
        self.start += self.fill
        self.fill = 0

    def close(self) -> None:
        buf, self.buf = self.buf, None  # type: ignore[assignment]
        if buf is not None:
            _give_stage(buf)


class _LocalSink(Sink):
    """A new file (exclusive create): mode from the umask (less ``o+w``), or exactly ``mode``."""

    def __init__(self, path: str, mode: int | None = None) -> None:
        self.path = path
        self._pos = 0
        self._kicked = self._dirty = 0  # writeback started up to here; buffered bytes since
        self._direct: DirectWriter | None = None
        self._stage: _Stage | None = None
        if mode is None:
            self._f: BinaryIO = open(path, "xb", buffering=WRITE_BUFFER)
            drop_world_write(self._f.fileno())
            self._direct = DirectWriter.open(path)
            return
        # Created with the umask applied (never more open than asked, not even for a moment),
        # then given exactly ``mode``.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
            self._f = open(fd, "wb", buffering=WRITE_BUFFER)
            self._direct = DirectWriter.open(path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise

    def _fail(self, op: str, exc: OSError) -> StorageError:
        return StorageError(f"{self.path}: {op} failed: {type(exc).__name__}: {exc}")

    def write(self, data: Any) -> int:
        """Large aligned buffers (``DIRECT_WRITE_MIN`` bytes and more) go straight to the disk,
        small writes packed into whole blocks (see the module); without a direct descriptor,
        everything through the page cache."""
        try:
            view = data if isinstance(data, memoryview) else memoryview(data)
            if view.ndim != 1 or view.format not in ("B", "b", "c"):
                view = view.cast("B")
            n = view.nbytes
            if self._direct is not None:
                try:
                    self._write_packed(view)
                except OSError:  # a filesystem that took O_DIRECT at open but not here
                    stage = self._stage
                    covered = stage.start + stage.fill if stage is not None else self._pos
                    self._to_buffered(covered)
                    self._f.write(view[covered - self._pos:])
                if self._stage is not None and self._stage.failed:  # refused in a flusher
                    self._to_buffered(self._pos + n)
            else:
                self._f.write(view)
                self._dirty += n
                if self._dirty >= KICK_BYTES and fsync_enabled():
                    self._f.flush()  # the disk starts on these bytes now (writeback.py)
                    start_writeback(self._f.fileno(), self._kicked, self._pos + n - self._kicked)
                    self._kicked, self._dirty = self._pos + n, 0
            self._pos += n
            return n
        except OSError as exc:
            raise self._fail("write", exc) from exc

    def _write_packed(self, view: memoryview) -> None:
        """The stage holds the file's bytes from ``start`` (block-aligned) to ``_pos``; it is
        empty only at a block boundary (a direct write ends on one, or leaves its partial
        last block staged)."""
        assert self._direct is not None
        pos, stage = self._pos, self._stage
        if stage is None:
            stage = self._stage = _Stage(pos)
        elif stage.fill == 0:
            stage.start = pos
        assert pos % BLOCK == stage.fill % BLOCK and stage.start + stage.fill == pos
        done = 0
        if view.nbytes >= DIRECT_WRITE_MIN and pos % BLOCK == 0:
            stage.flush(self._direct.fd, self._f)  # ends on a block boundary: all of it
            done = self._direct.write(view, pos)
            stage.start = pos + done
        if done < view.nbytes:
            stage.add(view[done:], self._direct.fd, self._f)

    def _to_buffered(self, covered: int) -> None:
        """Give up direct writes: what the stage holds (the file's bytes up to ``covered``)
        goes through the page cache, and so does everything after."""
        if self._stage is not None:
            self._stage.drain(self._f)  # before the descriptor closes; refusals rewritten
            self._stage.spill(self._f)
            self._stage.close()
            self._stage = None
        self._close_direct()
        self._f.seek(covered)

    def _finish_stage(self) -> None:
        stage = self._stage
        if stage is None:
            return
        if self._direct is not None:
            stage.flush(self._direct.fd, self._f)
        stage.drain(self._f)
        stage.spill(self._f)  # the partial last block
        stage.close()
        self._stage = None

    def commit(self) -> None:
        """Flush, fsync and close; on any failure the file is closed and removed. A failed
        fsync is final: the data may be lost, so it is never retried into a success."""
        try:
            self._finish_stage()
            self._f.flush()
            if fsync_enabled():
                os.fsync(self._f.fileno())  # the direct writes' size and extents too
            self._close_direct()
            self._f.close()
        except OSError as exc:
            self.abort()
            raise self._fail("flush/fsync", exc) from exc

    def _close_direct(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None

    def abort(self) -> None:
        if self._stage is not None:
            with contextlib.suppress(Exception):
                self._stage.drain(None)  # no flusher writes into the file after this
            self._stage.close()
            self._stage = None
        self._close_direct()
        with contextlib.suppress(OSError):
            self._f.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
