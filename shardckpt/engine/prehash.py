"""An incremental save's first pass over a shard file: which chunks equal the base step's.

Streaming every chunk through the encode pipeline costs a handoff to an encoder thread and back
per chunk, plus the GIL handoffs between the encoders and the file writers; for a fine-tuning
state (a frozen base in large chunks, many small adapters that change) that overhead was several
times the hashing itself. So, before the file is written, the chunks that have a base chunk at
the same place are hashed (XXH3-128 of their raw bytes, without the GIL: format/nogilhash.py) in
a few large batches of near-equal bytes, one per encoder thread. A chunk whose digest and size
equal the base chunk's is then known to be unchanged and is not handed to the pipeline at all;
the others are encoded exactly as in a full save (copied, hashed again and checksummed: the
digest recorded is always that of the bytes written).

Reuse is still decided by the digest of the bytes alone, and every byte is hashed: in a blocking
save the caller waits and the tensors cannot change; an async save hashes its snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Executor

from ..format.codec import digest128
from ..format.shard import EncodedChunk


def unchanged(chunks: Sequence[memoryview], expects: Sequence[str | None],
              pool: Executor | None, parts: int) -> list[bool]:
    """For each chunk, whether its raw XXH3-128 is the one expected (None: no base chunk,
    never unchanged), hashed in at most ``parts`` batches on ``pool`` (inline without one)."""
    todo = [i for i, e in enumerate(expects) if e is not None]
    if not todo:
        return [False] * len(chunks)
    out = [False] * len(chunks)

    def run(idx: list[int]) -> list[bool]:
        return [digest128(chunks[i]) == expects[i] for i in idx]

    batches = _batches(todo, [len(chunks[i]) for i in todo], parts if pool is not None else 1)
    if pool is None or len(batches) == 1:
        results = [run(b) for b in batches]
    else:
        futures = [pool.submit(run, b) for b in batches]
        results = [f.result() for f in futures]
    for idx, flags in zip(batches, results):
        for i, same in zip(idx, flags):
            out[i] = same
    return out


def _batches(idx: list[int], sizes: list[int], parts: int) -> list[list[int]]:
    """``idx`` cut into at most ``parts`` contiguous runs of near-equal total size."""
    total = sum(sizes)
    parts = max(1, min(parts, len(idx)))
    out: list[list[int]] = [[]]
    acc = 0
    for i, n in zip(idx, sizes):
        if out[-1] and len(out) < parts and acc >= total * len(out) / parts:
            out.append([])
        out[-1].append(i)
        acc += n
    return out


def merged(chunks: Sequence[memoryview], same: Sequence[bool], expects: Sequence[str | None],
           encoded: Iterator[EncodedChunk]) -> Iterator[EncodedChunk]:
    """Every chunk in order: an unchanged one as a reused :class:`EncodedChunk` (nothing to
    write), the others taken in order from ``encoded`` (the pipeline over the changed ones)."""
    try:
        for c, s, e in zip(chunks, same, expects):
            if s and e is not None:
                yield EncodedChunk(b"", len(c), "", "", e, True)
            else:
                yield next(encoded)
    finally:
        close = getattr(encoded, "close", None)
        if close is not None:
            close()
