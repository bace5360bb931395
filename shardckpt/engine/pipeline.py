"""The encode stage of the write pipeline: hash (and compress) chunks ahead of the writer.

Chunks of one file are encoded in worker threads, a bounded window ahead of the thread that
writes them, and handed back in order. zstd and the hashing of large chunks
(format/nogilhash.py) release the GIL, so they run in parallel with each other and with the
writer's system calls. Encoded bytes in flight are bounded by the memory budget; raw chunks are
views of the snapshot and cost nothing. An incremental save hands the pipeline only the chunks
that changed (engine/prehash.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ..format.shard import Codec, EncodedChunk, encode_chunk

RAW_WINDOW = 4
INLINE_MAX = 1 << 20  # raw chunks under this are encoded by the writer (see encode)


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

    @property
    def pool(self) -> ThreadPoolExecutor | None:
        return self._pool

    def encode(self, chunks: Iterable[memoryview],
               fn: Callable[[Codec, memoryview], EncodedChunk] | None = None
               ) -> Iterator[EncodedChunk]:
        """``fn(codec, chunk)`` of every chunk, in order (default :func:`encode_chunk`; a
        blocking save's bounce stage passes its own: engine/bounce.py). Raw chunks under
        :data:`INLINE_MAX` bytes are encoded by the calling thread when their turn comes: a
        handoff to an encoder thread and back costs more than hashing them (an incremental
        save of a fine-tuning state has hundreds of them), and they are written buffered."""
        codec = self.config.codec
        fn = encode_chunk if fn is None else fn
        if self._pool is None:
            for c in chunks:
                yield fn(codec, c)
            return
        pool = self._pool
        inline = codec.level is None

        def submit(c: memoryview) -> Future[EncodedChunk] | memoryview:
            return c if inline and len(c) < INLINE_MAX else pool.submit(fn, codec, c)
        pending: deque[Future[EncodedChunk] | memoryview] = deque()
        source = iter(chunks)
        try:
            for c in source:
                pending.append(submit(c))
                if len(pending) >= self.config.window:
                    break
            while pending:
                done = pending.popleft()
                nxt = next(source, None)
                if nxt is not None:
                    pending.append(submit(nxt))
                yield fn(codec, done) if isinstance(done, memoryview) else done.result()
        finally:
            for f in pending:
                if not isinstance(f, memoryview):
                    f.cancel()
