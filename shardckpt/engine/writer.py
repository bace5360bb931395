"""Write one rank's pieces into its shard files, several files in parallel."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..format.shard import Codec, FileRecord, Piece, ShardWriter
from ..storage import Location


@dataclass(frozen=True)
class PieceData:
    """A piece to write: the key, dtype, box, and the CPU tensor holding its bytes."""

    key: str
    dtype: str
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    data: torch.Tensor


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The C-order bytes of a tensor, without a copy when it is already contiguous on the CPU."""
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def split_files(pieces: Sequence[PieceData], nfiles: int) -> list[list[PieceData]]:
    """Spread pieces over at most ``nfiles`` files of near-equal bytes (greedy, largest first)."""
    nfiles = max(1, min(nfiles, len(pieces)))
    buckets: list[list[PieceData]] = [[] for _ in range(nfiles)]
    sizes = [0] * nfiles
    for p in sorted(pieces, key=lambda p: (-p.data.numel() * p.data.element_size(), p.key)):
        i = sizes.index(min(sizes))
        buckets[i].append(p)
        sizes[i] += p.data.numel() * p.data.element_size()
    for b in buckets:
        b.sort(key=lambda p: p.key)  # a file's pieces in key order: readers scan it forwards
    return [b for b in buckets if b]


def write_file(location: Location, step_dir: str, name: str, pieces: Sequence[PieceData], *,
               save_id: str, step: int, rank: int, chunk_size: int,
               codec: Codec) -> tuple[FileRecord, list[Piece]]:
    sink = location.open_sink(f"{step_dir}/{name}")
    try:
        writer = ShardWriter(sink, name, save_id=save_id, step=step, rank=rank,
                             chunk_size=chunk_size, codec=codec)
        written = [writer.add(p.key, p.dtype, p.offsets, p.lengths, tensor_bytes(p.data))
                   for p in pieces]
        record = writer.finish()
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    return record, written


def write_rank(location: Location, step_dir: str, pieces: Sequence[PieceData], *, save_id: str,
               step: int, rank: int, chunk_size: int, codec: Codec, nfiles: int,
               threads: int) -> tuple[list[FileRecord], list[Piece]]:
    """Write this rank's pieces to ``nfiles`` shard files concurrently; all or an exception."""
    groups = split_files(pieces, nfiles)
    names = [f"rank{rank:05d}-{i:03d}.shard" for i in range(len(groups))]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(groups) or 1))) as pool:
        futures = [pool.submit(write_file, location, step_dir, n, g, save_id=save_id, step=step,
                               rank=rank, chunk_size=chunk_size, codec=codec)
                   for n, g in zip(names, groups)]
        results = [f.result() for f in futures]
    return [r for r, _ in results], [p for _, ps in results for p in ps]
