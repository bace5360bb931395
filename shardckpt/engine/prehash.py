"""An incremental save's verdicts: which chunks of a shard file equal the base step's.

Streaming every chunk through the encode pipeline costs a handoff to an encoder thread and back
per chunk, plus the GIL handoffs between the encoders and the file writers; for a fine-tuning
state (a frozen base in large chunks, many small adapters that change) that overhead was several
times the hashing itself. So the large chunks that have a base chunk at the same place are
hashed (XXH3-128 of their raw bytes, without the GIL: format/nogilhash.py) in batches of a few
MiB, in file order, on the encoder threads, from the moment the file's write begins; small ones
are hashed by the writer when it gets to them (shorter than a handoff). A chunk whose digest and
size equal the base chunk's is then known to be unchanged and is never handed to the pipeline;
the others are encoded as in a full save, except that a small raw chunk (under the pipeline's
inline size) is encoded by the writer on the spot: its digest is the one the verdict just
computed from the bytes about to be written, and its checksum is taken there too (no trip
through the pipeline's layers for each of hundreds of adapter chunks). The writer streams the
changed chunks while the encoders still hash the large ones further on, and :func:`order` puts
the pieces that need no batch first in the file, so their bytes are written while the hashing
runs.

Reuse is still decided by the digest of the bytes alone, and every byte is hashed: in a blocking
save the caller waits and the tensors cannot change; an async save hashes its snapshot. Each
chunk's verdict is computed once and kept, so the pipeline (which looks a window ahead) and the
writer always agree on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from typing import TypeVar

from ..format.codec import checksum, digest128
from ..format.nogilhash import MIN_BYTES
from ..format.shard import EncodedChunk

BATCH_BYTES = 8 << 20  # bytes hashed per task of the encoder pool
T = TypeVar("T")


class Verdicts:
    """Whether chunk ``i`` equals the base chunk expected at its place (``expects[i]``; None:
    there is none, never unchanged). Large chunks are hashed on ``pool`` in file order, in
    batches of about :data:`BATCH_BYTES` (inline without a pool); the rest on first ask."""

    def __init__(self, chunks: Sequence[memoryview], expects: Sequence[str | None],
                 pool: Executor | None) -> None:
        self.chunks, self.expects = chunks, expects
        self._known: list[bool | None] = [None if e is not None else False for e in expects]
        self._digests: dict[int, str] = {}  # of the chunks hashed inline
        self._batch_of: dict[int, tuple[Future[list[bool]], list[int]]] = {}
        self._futures: list[Future[list[bool]]] = []
        if pool is None:
            return
        batch: list[int] = []
        size = 0
        for i, (c, e) in enumerate(zip(chunks, expects)):
            if e is None or len(c) < MIN_BYTES:
                continue
            batch.append(i)
            size += len(c)
            if size >= BATCH_BYTES:
                self._submit(pool, batch)
                batch, size = [], 0
        if batch:
            self._submit(pool, batch)

    def _submit(self, pool: Executor, idx: list[int]) -> None:
        future = pool.submit(self._hash, idx)
        self._futures.append(future)
        for i in idx:
            self._batch_of[i] = (future, idx)

    def _hash(self, idx: list[int]) -> list[bool]:
        return [digest128(self.chunks[i]) == self.expects[i] for i in idx]

    def __call__(self, i: int) -> bool:
        known = self._known[i]
        if known is not None:
            return known
        batch = self._batch_of.get(i)
        if batch is None:
            same = self.digest(i) == self.expects[i]
            self._known[i] = same
            return same
        future, idx = batch
        for j, same in zip(idx, future.result()):
            self._known[j] = same
        return bool(self._known[i])

    def digest(self, i: int) -> str:
        """The XXH3-128 of chunk ``i``, hashed by the caller (once) unless batched."""
        d = self._digests.get(i)
        if d is None:
            d = self._digests[i] = digest128(self.chunks[i])
        return d

    def needs_batch(self, i: int) -> bool:
        return i in self._batch_of

    def cancel(self) -> None:
        """Drop the batches not started (a failed or abandoned write)."""
        for f in self._futures:
            f.cancel()


def order(items: Sequence[T], batched: Callable[[T], bool]) -> list[T]:
    """``items`` with those that need no batch verdict first, each group in its order."""
    return [x for x in items if not batched(x)] + [x for x in items if batched(x)]


def direct_below(same: Verdicts, inline_max: int) -> Callable[[int], bool]:
    """Whether chunk ``i`` is encoded by the writer on the spot (see the module): raw chunks
    under ``inline_max`` bytes (0: none) whose verdict needs no batch."""
    return lambda i: len(same.chunks[i]) < inline_max and not same.needs_batch(i)


def changed(chunks: Sequence[memoryview], same: Verdicts,
            direct: Callable[[int], bool]) -> Iterator[memoryview]:
    """The chunks that differ from the base's, in order, less the ``direct`` ones (what the
    pipeline encodes)."""
    return (c for i, c in enumerate(chunks) if not direct(i) and not same(i))


def merged(chunks: Sequence[memoryview], same: Verdicts, encoded: Iterator[EncodedChunk],
           direct: Callable[[int], bool]) -> Iterator[EncodedChunk]:
    """Every chunk in order: an unchanged one as a reused :class:`EncodedChunk` (nothing to
    write), a changed ``direct`` one encoded raw here, the others taken in order from
    ``encoded`` (the pipeline over :func:`changed`)."""
    try:
        for i, c in enumerate(chunks):
            expect = same.expects[i]
            if expect is not None and same(i):
                yield EncodedChunk(b"", len(c), "", "", expect, True)
            elif direct(i):
                yield EncodedChunk(c, len(c), checksum(c), "raw", same.digest(i))
            else:
                yield next(encoded)
    finally:
        same.cancel()
        close = getattr(encoded, "close", None)
        if close is not None:
            close()
