"""Write one rank's pieces into its shard files: several files in parallel, each fed by the
encode pipeline."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import wait
from dataclasses import dataclass
from itertools import islice

import torch
import xxhash

from ..format.nogilhash import MIN_BYTES
from ..format.shard import FileRecord, Piece, ShardWriter, split_chunks
from ..storage import Location
from ..storage.replicas import open_tee
from . import pools
from .bounce import Bounce, fits, writes_direct
from .incremental import BaseChunks, reuse
from .pipeline import INLINE_MAX, EncodePipeline, PipelineConfig
from .prehash import Verdicts, changed, direct_below, merged, order
from .tensorbytes import byte_view


@dataclass(frozen=True)
class PieceData:
    """A piece to write: the key, dtype, box, and the CPU tensor holding its bytes."""

    key: str
    dtype: str
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    data: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-d, stride-1 view of a contiguous tensor.

    ``reshape(-1)`` can keep the odd stride of a size-1 dimension (``torch.zeros(2)[::2]``),
    which ``view(torch.uint8)`` refuses.
    """
    return t.as_strided((t.numel(),), (1,))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The C-order bytes of a tensor's values, without a copy when it is already contiguous on
    the CPU. A lazily conjugated or negated view (``x.conj()``, ``torch._neg_view``) holds
    bytes that are not its values: those are materialized (a blocking save refused them)."""
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return byte_view(t)


def split_files(pieces: Sequence[PieceData], nfiles: int) -> list[list[PieceData]]:
    """Spread pieces over at most ``nfiles`` files of near-equal bytes (greedy, largest first)."""
    nfiles = max(1, min(nfiles, len(pieces)))
    buckets: list[list[PieceData]] = [[] for _ in range(nfiles)]
    sizes = [0] * nfiles
    for p in sorted(pieces, key=lambda p: (-p.nbytes, p.key)):
        i = sizes.index(min(sizes))
        buckets[i].append(p)
        sizes[i] += p.nbytes
    for b in buckets:
        b.sort(key=lambda p: p.key)  # a file's pieces in key order: readers scan it forwards
    return [b for b in buckets if b]


@dataclass(frozen=True)
class WrittenFile:
    record: FileRecord
    pieces: list[Piece]
    stored_at: list[int]  # indexes of the locations that hold the whole file
    failures: dict[int, str]


def write_file(locations: Sequence[tuple[int, Location]], step_dir: str, name: str,
               pieces: Sequence[PieceData], views: Sequence[memoryview],
               pipeline: EncodePipeline, *, save_id: str, step: int, rank: int,
               base: BaseChunks | None = None, bounce: Bounce | None = None) -> WrittenFile:
    """Stream ``pieces`` (their bytes: ``views``, see :func:`write_rank`) into one shard file at
    every location, encoding each chunk once. With ``base`` (incremental), a chunk whose raw
    XXH3-128 and size equal the base step's chunk at the same place is not written but
    recorded as a reference to its bytes.

    The file is durable wherever ``stored_at`` says when this returns; it raises only if no
    location could store it. With ``bounce``, chunks at unaligned addresses are copied into
    aligned buffers by the encoders where the file goes direct (engine/bounce.py).
    """
    size = pipeline.config.chunk_size
    counts = [-(-len(v) // size) for v in views]  # chunks per piece: ceil(bytes / size)
    olds = [base.chunks_of(p.key, p.offsets, p.lengths, len(v), size) if base else [None] * n
            for p, v, n in zip(pieces, views, counts)]
    if base is not None:  # pieces whose chunks wait for a hashing batch last (prehash.py)
        rows = order(list(zip(pieces, views, counts, olds)), lambda r: any(
            o is not None and o.raw >= MIN_BYTES for o in r[3]))
        pieces, views, counts, olds = (list(x) for x in zip(*rows)) if rows else ([],) * 4
    chunks = [c for v in views for c in split_chunks(v, size)]
    same = Verdicts(chunks, [o.xxh128 if o is not None else None for c in olds for o in c],
                    pipeline.pool) if base is not None else None
    try:
        sink = open_tee(locations, f"{step_dir}/{name}")
    except BaseException:
        if same is not None:
            same.cancel()
        raise
    todo: Iterable[memoryview] = chunks
    if same is not None:  # small changed raw chunks are encoded on the spot (prehash.py)
        direct = direct_below(same, INLINE_MAX if pipeline.config.codec.level is None else 0)
        todo = changed(chunks, same, direct)
    if bounce is not None and writes_direct(sink):
        encoded = bounce.released(pipeline.encode(todo, bounce.encode))
    else:
        encoded = pipeline.encode(todo)
    if same is not None:  # unchanged chunks never reach the pipeline
        encoded = merged(chunks, same, encoded, direct)
    try:
        writer = ShardWriter(sink, name, save_id=save_id, step=step, rank=rank,
                             chunk_size=size, codec=pipeline.config.codec)
        written = [writer.add_encoded(p.key, p.dtype, p.offsets, p.lengths,
                                      (reuse(c, o) for c, o in zip(islice(encoded, n), old)))
                   for p, old, n in zip(pieces, olds, counts)]
        record = writer.finish()
        stored_at = sink.commit()
    except BaseException:
        sink.abort()
        raise
    finally:
        encoded.close()  # gives the last bounce buffer back
    return WrittenFile(record, written, stored_at, sink.failures)


def shard_name(rank: int, index: int, spread: bool) -> str:
    """``rank00042-000.shard``; on object stores with two hex digits in front, a hash of the
    rank, so that the uploads of a large job spread over 256 key prefixes instead of piling
    onto one (S3 serves about 3,500 PUT/s per prefix)."""
    name = f"rank{rank:05d}-{index:03d}.shard"
    return f"{xxhash.xxh32_intdigest(name.encode()) & 0xFF:02x}-{name}" if spread else name


def write_rank(locations: Sequence[tuple[int, Location]], step_dir: str,
               pieces: Sequence[PieceData], *, save_id: str, step: int, rank: int,
               config: PipelineConfig, nfiles: int, threads: int,
               encoders: int, nice: int = 0, base: BaseChunks | None = None
               ) -> list[WrittenFile]:
    """Write this rank's pieces to ``nfiles`` shard files concurrently, at every location;
    ``nice`` > 0 lowers the priority of the threads that do it (and of those they start).

    The pieces' byte views are taken here, before any writer starts: torch's checks let the
    GIL go, and a writer taking them while another runs its chunks waits up to the switch
    interval (5 ms) at each (an incremental save's second file started 10 ms late that way)."""
    groups = split_files(pieces, nfiles)
    views = [[tensor_bytes(p.data) for p in g] for g in groups]
    spread = not all(loc.is_local for _, loc in locations)
    names = [shard_name(rank, i, spread) for i in range(len(groups))]
    with pools.pool("encode", max(1, encoders), nice) as encode_pool, \
            pools.pool("write", max(1, min(threads, len(groups) or 1)), nice) as pool:
        pipeline = EncodePipeline(config, encode_pool if encoders > 0 else None)
        bounce = Bounce(config, len(groups)) if fits(config, len(groups)) else None
        futures = [pool.submit(write_file, locations, step_dir, n, g, v, pipeline,
                               save_id=save_id, step=step, rank=rank, base=base, bounce=bounce)
                   for n, g, v in zip(names, groups, views)]
        wait(futures)  # every file done (or failed) before this returns or raises
        return [f.result() for f in futures]
