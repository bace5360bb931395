"""The encode stage of the write pipeline: hash (and compress) chunks ahead of the writer.

Chunks of one file are encoded in worker threads, a bounded window ahead of the thread that
writes them, and handed back in order. zstd releases the GIL, so compression runs in parallel;
hashing overlaps with the writer's system calls (which release the GIL too). Encoded bytes in
flight are bounded by the memory budget; raw chunks are views of the snapshot and cost nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ..format.shard import Codec, EncodedChunk, encode_chunk

RAW_WINDOW = 4


@dataclass(frozen=True)
class PipelineConfig:
    codec: Codec
    chunk_size: int
    window: int

    @classmethod
    def plan(cls, codec: Codec, chunk_size: int, budget: int, nfiles: int) -> PipelineConfig:
        """Chunk size and window so that the encoded bytes in flight stay within ``budget``.

        A budget smaller than one chunk shrinks the chunks: slower, never over budget.
        """
        if codec.level is None:
            return cls(codec, chunk_size, RAW_WINDOW)
        per_file = max(1, budget // max(1, nfiles))
        chunk = max(1, min(chunk_size, per_file // 2))
        return cls(codec, chunk, max(1, per_file // chunk - 1))


class EncodePipeline:
    """Ordered, bounded-window encoding over a shared thread pool (or inline with no pool)."""

    def __init__(self, config: PipelineConfig, pool: ThreadPoolExecutor | None) -> None:
        self.config = config
        self._pool = pool

    def encode(self, chunks: Iterable[memoryview],
               fn: Callable[..., EncodedChunk] | None = None,
               expect: Iterable[str | None] | None = None) -> Iterator[EncodedChunk]:
        """``fn(codec, chunk[, expect])`` of every chunk, in order (default
        :func:`encode_chunk`; a blocking save's bounce stage passes its own: engine/bounce.py).
        ``expect`` (incremental saves) gives, chunk by chunk, the XXH3-128 of the base step's
        chunk at the same place: a chunk with that digest comes back ``reused``, neither
        compressed nor checksummed again."""
        codec = self.config.codec
        fn = encode_chunk if fn is None else fn
        items = zip(chunks, expect) if expect is not None else ((c, None) for c in chunks)
        if self._pool is None:
            for c, e in items:
                yield fn(codec, c, e) if e is not None else fn(codec, c)
            return
        pool = self._pool

        def submit(c: memoryview, e: str | None) -> Future[EncodedChunk]:
            return pool.submit(fn, codec, c, e) if e is not None else pool.submit(fn, codec, c)
        pending: deque[Future[EncodedChunk]] = deque()
        source = iter(items)
        try:
            for c, e in source:
                pending.append(submit(c, e))
                if len(pending) >= self.config.window:
                    break
            while pending:
                done = pending.popleft()
                nxt = next(source, None)
                if nxt is not None:
                    pending.append(submit(*nxt))
                yield done.result()
        finally:
            for f in pending:
                f.cancel()
