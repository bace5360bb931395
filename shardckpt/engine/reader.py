"""Read boxes of tensors out of a checkpoint, verifying every chunk it touches.

A load asks for a box (offsets, lengths) of a tensor; only the chunks overlapping that box are
read, so a rank of a resharded job reads the bytes it needs and no more.
"""

from __future__ import annotations

import math
import threading

import torch

from ..errors import CorruptCheckpointError, IncompleteCheckpointError
from ..format.dtypes import itemsize
from ..format.manifest import Manifest, TensorMeta
from ..format.shard import Piece, checksum, decode_chunk, read_header
from ..storage import Location
from .writer import flat


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def intersect(a_off: tuple[int, ...], a_len: tuple[int, ...], b_off: tuple[int, ...],
              b_len: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The box common to two boxes, or None if they do not overlap."""
    lo = tuple(max(a, b) for a, b in zip(a_off, b_off))
    hi = tuple(min(a + n, b + m) for a, n, b, m in zip(a_off, a_len, b_off, b_len))
    if any(h <= low for low, h in zip(lo, hi)):
        return None
    return lo, tuple(h - low for low, h in zip(lo, hi))


class CheckpointReader:
    """Reads verified bytes of one committed step from one location (thread-safe)."""

    def __init__(self, location: Location, step_dir: str, manifest: Manifest) -> None:
        self.location = location
        self.step_dir = step_dir
        self.manifest = manifest
        self._checked: set[str] = set()
        self._lock = threading.Lock()

    def _where(self, file: str) -> str:
        return f"{self.location.display}/{self.step_dir}/{file}"

    def check_file(self, file: str) -> None:
        """The file exists, has exactly the size the manifest recorded, and its preamble, trailer
        and header are intact and are the ones the manifest recorded (same save, same step)."""
        with self._lock:
            if file in self._checked:
                return
        rel, where = f"{self.step_dir}/{file}", self._where(file)
        size = self.location.size(rel)
        if size is None:
            raise IncompleteCheckpointError(f"{where}: shard file is missing")
        record = self.manifest.files[file]
        if size != record.nbytes:
            raise CorruptCheckpointError(f"{where}: {size} bytes on storage, the manifest "
                                         f"recorded {record.nbytes} (truncated or replaced)")
        return
        header = read_header(lambda offset, n: self.location.read_range(rel, offset, n), size,
                             where)
        if (header.header_offset, header.header_xxh3) != (record.header_offset,
                                                          record.header_xxh3):
            raise CorruptCheckpointError(
                f"{where}: header at offset {header.header_offset} (xxh3 {header.header_xxh3}) "
                f"is not the one the manifest recorded (offset {record.header_offset}, xxh3 "
                f"{record.header_xxh3}): the file was replaced")
        if (header.save_id, header.step, header.rank) != (self.manifest.save_id,
                                                          self.manifest.step, record.rank):
            raise CorruptCheckpointError(
                f"{where}: written by save {header.save_id} of step {header.step} on rank "
                f"{header.rank}, the manifest is save {self.manifest.save_id} of step "
                f"{self.manifest.step} (rank {record.rank})")
        with self._lock:
            self._checked.add(file)

    def read_span(self, piece: Piece, start: int, out: memoryview) -> None:
        """Fill ``out`` with the piece's raw bytes ``[start, start + len(out))``, verified."""
        self.check_file(piece.file)
        where = self._where(piece.file)
        end = start + len(out)
        pos = 0
        for chunk in piece.chunks:
            c_start, c_end = pos, pos + chunk.raw
            pos = c_end
            if c_end <= start or c_start >= end:
                continue
            lo, hi = max(start, c_start), min(end, c_end)
            dst = out[lo - start:hi - start]
            if chunk.codec == "raw" and lo == c_start and hi == c_end and \
                    hasattr(self.location, "read_into"):
                n = self.location.read_into(f"{self.step_dir}/{piece.file}", chunk.offset, dst)
                if n != chunk.stored:
                    raise CorruptCheckpointError(f"{where}: chunk at offset {chunk.offset}: "
                                                 f"read {n} of {chunk.stored} bytes")
                if checksum(dst) != chunk.xxh3:
                    raise CorruptCheckpointError(
                        f"{where}: checksum mismatch in chunk at offset {chunk.offset}")
                continue
            stored = self.location.read_range(f"{self.step_dir}/{piece.file}", chunk.offset,
                                              chunk.stored)
            raw = memoryview(decode_chunk(stored, chunk, where))
            dst[:] = raw[lo - c_start:hi - c_start]

    def read_box(self, meta: TensorMeta, offsets: tuple[int, ...], lengths: tuple[int, ...],
                 out: torch.Tensor) -> None:
        """Copy the global box ``offsets/lengths`` of a tensor into ``out`` (shape ``lengths``)."""
        isz = itemsize(meta.dtype)
        out = out.detach()  # same memory; a Parameter (leaf requiring grad) is filled in place
        dtype = out.dtype
        for piece in meta.pieces:
            common = intersect(piece.offsets, piece.lengths, offsets, lengths)
            if common is None:
                continue
            lo, size = common
            rel = tuple(a - b for a, b in zip(lo, piece.offsets))
            strides = contiguous_strides(piece.lengths)
            first = sum(r * s for r, s in zip(rel, strides))
            last = sum((r + n - 1) * s for r, n, s in zip(rel, size, strides))
            span = (last - first + 1) * isz
            dst_region = out[tuple(slice(a - b, a - b + n)
                                   for a, b, n in zip(lo, offsets, size))]
            whole = size == piece.lengths and size == lengths
            if whole and out.is_contiguous() and out.device.type == "cpu" and \
                    out.dtype == _torch_dtype(meta.dtype):
                self.read_span(piece, 0, memoryview(flat(out).view(torch.uint8).numpy()))
                continue
            buf = torch.empty(span, dtype=torch.uint8)
            self.read_span(piece, first * isz, memoryview(buf.numpy()))
            src = buf.view(_torch_dtype(meta.dtype)).as_strided(size, strides, 0)
            dst_region.copy_(src.to(dtype) if src.dtype != dtype else src)
        if math.prod(lengths) and not meta.pieces:
            raise IncompleteCheckpointError("tensor has no pieces")


def _torch_dtype(name: str) -> torch.dtype:
    from ..format.dtypes import torch_dtype

    return torch_dtype(name)
