"""A blocking save's bounce stage: chunks of the live tensors are copied into page-aligned buffers
by the encoder threads, ahead of the file writer, so the disk gets the same large direct writes
as from an async save's snapshot, and the copies overlap the writes.

A blocking save writes from the live tensors (the caller waits, so they cannot change), whose
addresses are not page-aligned, while ``O_DIRECT`` needs aligned memory (storage/direct.py).
Copied by the writer thread itself, in small pieces, a chunk costs a copy *then* a write, and the
writes are small (the virtual disk here takes at most 4 MiB per request, so a 16 MiB write keeps
four in flight and an 8 MiB one two). Here the encoder threads, which run a window of chunks
ahead of each writer, copy every large raw chunk whole into an aligned buffer and checksum the
copy (the bytes that are written); the writer then writes the aligned buffer in one direct
``pwrite``, exactly as it writes a snapshot's.

Memory stays within ``SHARDCKPT_MEMORY_BUDGET``: per file, at most the pipeline's window plus
one chunk are held (the writer gives a buffer back when it asks for the next chunk, i.e. once
the previous one is on the disk), and :func:`fits` turns the stage off where
``files x (window + 1) x chunk`` would exceed the budget. Buffers are kept between saves (no page
faults after the first save), at most that many bytes, and dropped by :func:`trim`.

Only a sink that writes synchronously, to one local file opened with ``O_DIRECT``, gets the
stage (:func:`writes_direct`): a tee queues the bytes for its threads and a remote sink may keep
them, so a buffer could be reused before it was written; a filesystem without ``O_DIRECT``
(tmpfs) would only pay for the extra copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
from collections.abc import Iterator
from typing import Any

from .. import knobs
from ..format.codec import digest128
from ..format.shard import Codec, EncodedChunk, checksum
from ..storage.direct import BLOCK, DIRECT_WRITE_MIN, address, aligned_buffer
from ..storage.location import _LocalSink
from ..storage.replicas import DirectSink
from . import pipeline
from .pipeline import PipelineConfig


class BufferPool:
    """Page-aligned buffers by size, reused across saves (thread-safe). :meth:`take` never
    waits: the callers bound how many they hold at once."""

    def __init__(self) -> None:
        self._free: dict[int, list[mmap.mmap]] = {}
        self._lock = threading.Lock()
        self.made = 0  # buffers allocated so far (for tests)

    def take(self, size: int) -> mmap.mmap:
        with self._lock:
            free = self._free.get(size)
            if free:
                return free.pop()
            self.made += 1
        return aligned_buffer(size)

    def give(self, buf: mmap.mmap, keep: int) -> None:
        """Return ``buf``; keep at most ``keep`` bytes of free buffers (the rest are unmapped)."""
        with self._lock:
            free = self._free.setdefault(len(buf), [])
            if sum(len(b) for bufs in self._free.values() for b in bufs) + len(buf) <= keep:
                free.append(buf)
                return
        with contextlib.suppress(BufferError):  # a view still exported: freed with the view
            buf.close()

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(len(b) for bufs in self._free.values() for b in bufs)

    def trim(self) -> None:
        with self._lock:
            bufs = [b for free in self._free.values() for b in free]
            self._free.clear()
        for b in bufs:
            with contextlib.suppress(BufferError):
                b.close()


POOL = BufferPool()


def trim() -> None:
    """Unmap the free bounce buffers (a manager's ``close``)."""
    POOL.trim()


def fits(config: PipelineConfig, nfiles: int) -> bool:
    """Whether the stage's buffers for ``nfiles`` files fit in the memory budget."""
    return config.codec.level is None and \
        nfiles * (config.window + 1) * buffer_size(config) <= knobs.MEMORY_BUDGET.get()


def buffer_size(config: PipelineConfig) -> int:
    return -(-config.chunk_size // BLOCK) * BLOCK


def writes_direct(sink: Any) -> bool:
    """Whether ``sink`` is one local file with a direct descriptor, written synchronously."""
    inner = getattr(sink, "_sink", None) if isinstance(sink, DirectSink) else None
    return isinstance(inner, _LocalSink) and getattr(inner, "_direct", None) is not None


class Bounce:
    """The stage for one file: :meth:`encode` runs in the encoder threads, :meth:`released`
    wraps the ordered chunks the writer takes."""

    def __init__(self, config: PipelineConfig, nfiles: int, pool: BufferPool | None = None
                 ) -> None:
        self.size = buffer_size(config)
        self.keep = nfiles * (config.window + 1) * self.size
        self.pool = POOL if pool is None else pool
        self._lent: dict[int, mmap.mmap] = {}  # id(view handed out) -> its buffer
        self._lock = threading.Lock()

    def encode(self, codec: Codec, raw: memoryview) -> EncodedChunk:
        """A raw chunk at an unaligned address that will be written direct (from
        ``DIRECT_WRITE_MIN`` bytes on): copied into an aligned buffer, and the copy hashed and
        checksummed; anything else encoded as usual (a smaller chunk is written through the
        page cache, where a copy would gain nothing)."""
        n = len(raw)
        src = address(raw) if codec.level is None and DIRECT_WRITE_MIN <= n <= self.size else None
        if src is None or src % BLOCK == 0:
            return pipeline.encode_chunk(codec, raw)
        buf = self.pool.take(self.size)
        ctypes.memmove(ctypes.addressof(ctypes.c_char.from_buffer(buf)), src, n)  # no GIL
        view = memoryview(buf)[:n]
        with self._lock:
            self._lent[id(view)] = buf
        return EncodedChunk(view, n, checksum(view), "raw", digest128(view))

    def released(self, chunks: Iterator[EncodedChunk]) -> Iterator[EncodedChunk]:
        """``chunks`` in order; each bounce buffer goes back to the pool when the writer asks
        for the next chunk (the write of this one has returned) or closes the iterator."""
        try:
            for chunk in chunks:
                try:
                    yield chunk
                finally:
                    self._give(chunk)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:  # cancels the encodes not started yet
                close()

    def _give(self, chunk: EncodedChunk) -> None:
        stored = chunk.stored
        with self._lock:
            buf = self._lent.pop(id(stored), None)
        if buf is None:
            return  # not one of ours (encoded as usual)
        try:
            stored.release()
        except BufferError:  # something still holds a view of it: never reused
            return
        self.pool.give(buf, self.keep)
