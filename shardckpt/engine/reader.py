"""Read boxes of tensors out of a checkpoint, verifying every chunk it touches.

A load asks for a box (offsets, lengths) of a tensor; only the chunks overlapping that box are
read, so a rank of a resharded job reads the bytes it needs and no more.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    ShardckptError,
    StorageError,
)
from ..format.dtypes import itemsize, torch_dtype
from ..format.manifest import Manifest, TensorMeta
from ..format.shard import Chunk, Piece, ShardHeader, checksum, decode_chunk, read_header
from ..refcheck import DeadReference, RefTargets, dead, ref_path
from ..storage import Location
from .badfiles import note_bad
from .tensorbytes import byte_view


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


@dataclass(frozen=True)
class PieceSpan:
    """Where a global box meets a piece: the common box (global offsets ``lo``, ``size``), the
    piece's contiguous element ``strides``, and the piece's raw bytes ``[start, end)`` that
    hold the common box (the first to the last element of it, in the piece's row-major order)."""

    lo: tuple[int, ...]
    size: tuple[int, ...]
    strides: tuple[int, ...]
    start: int
    end: int


def piece_span(piece: Piece, isz: int, offsets: tuple[int, ...], lengths: tuple[int, ...]
               ) -> PieceSpan | None:
    """The bytes of ``piece`` (elements of ``isz`` bytes) that the global box ``offsets`` /
    ``lengths`` needs, or None if they do not overlap: what :meth:`CheckpointReader.read_box`
    reads and read-once plans (:func:`shardckpt.engine.readunits.spans`)."""
    common = intersect(piece.offsets, piece.lengths, offsets, lengths)
    if common is None:
        return None
    lo, size = common
    rel = tuple(a - b for a, b in zip(lo, piece.offsets))
    strides = contiguous_strides(piece.lengths)
    first = sum(r * s for r, s in zip(rel, strides))
    last = sum((r + n - 1) * s for r, n, s in zip(rel, size, strides))
    return PieceSpan(lo, size, strides, first * isz, (last + 1) * isz)


class CheckpointReader:
    """Reads verified bytes of one committed step, failing over between locations (thread-safe).

    Every chunk is checked against its checksum. A file that is missing, truncated, replaced or
    has a bad chunk at one location is read from the next location instead, with a warning
    naming what was bad where; if no location has a good copy, the error of the first is raised.
    """

    def __init__(self, locations: Location | Sequence[Location], step_dir: str,
                 manifest: Manifest) -> None:
        self.locations = [locations] if isinstance(locations, Location) else list(locations)
        self.step_dir = step_dir
        self.manifest = manifest
        self._checked: dict[tuple[int, str], ShardHeader] = {}
        self._bad: dict[tuple[int, str], BaseException] = {}
        self._lock = threading.Lock()
        self.warnings: list[str] = []
        self.refs = RefTargets(manifest, locations=self.locations)  # incremental saves
        self._bad_refs: dict[tuple[int, tuple[int, str], int], BaseException] = {}

    @property
    def location(self) -> Location:
        return self.locations[0]

    def _where(self, index: int, file: str) -> str:
        return f"{self.locations[index].display}/{self.step_dir}/{file}"

    def check_file(self, file: str, index: int = 0) -> ShardHeader:
        """The file exists at location ``index``, has the recorded size, and its preamble,
        trailer and header are the ones the manifest recorded (same save, same step).
        Returns its validated header."""
        with self._lock:
            if (index, file) in self._checked:
                return self._checked[(index, file)]
        location = self.locations[index]
        rel, where = f"{self.step_dir}/{file}", self._where(index, file)
        size = location.size(rel)
        if size is None:
            raise IncompleteCheckpointError(f"{where}: shard file is missing")
        record = self.manifest.files[file]
        if size != record.nbytes:
            raise CorruptCheckpointError(f"{where}: {size} bytes on storage, the manifest "
                                         f"recorded {record.nbytes} (truncated or replaced)")
        header = read_header(lambda offset, n: location.read_range(rel, offset, n), size, where,
                             file)
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
        self.refs.check(location, header.pieces, where)  # before any referenced byte is read
        with self._lock:
            self._checked[(index, file)] = header
        return header

    def check_any(self, file: str) -> ShardHeader:
        """The header of ``file`` from the first location holding it with its recorded size and
        header, else the first location's error."""
        first: BaseException | None = None
        for index in range(len(self.locations)):
            if (index, file) in self._bad:
                continue
            try:
                return self.check_file(file, index)
            except DeadReference:  # no location has a referenced file: not this file's fault
                raise
            except (CorruptCheckpointError, IncompleteCheckpointError, StorageError,
                    FileNotFoundError) as exc:
                first = first or exc
        if first is None:  # every location was already known bad: the first one's error again
            known = next(e for (i, f), e in sorted(self._bad.items(), key=lambda t: t[0])
                         if f == file)
            first = type(known)(str(known))
        raise first

    def read_span(self, piece: Piece, start: int, out: memoryview) -> None:
        """Fill ``out`` with the piece's raw bytes ``[start, start + len(out))``, verified,
        from the first location that has them intact."""
        first: BaseException | None = None
        for index in range(len(self.locations)):
            if (index, piece.file) in self._bad:
                continue
            try:
                self.check_file(piece.file, index)
                self._read_span_at(index, piece, start, out)
                return
            except DeadReference:  # no location has a referenced chunk: not this file's fault
                raise
            except (CorruptCheckpointError, IncompleteCheckpointError, StorageError,
                    FileNotFoundError) as exc:
                first = first or exc
                self._mark_bad(index, piece.file, exc)
        if first is None:  # every location was already known bad: the first one's error again
            known = self._bad[(0, piece.file)]
            first = type(known)(str(known))
        raise first

    def _mark_bad(self, index: int, file: str, exc: BaseException) -> None:
        with self._lock:
            self._bad[(index, file)] = exc
            if len(self.locations) > 1:
                msg = f"{exc} (reading it from another location)"
                self.warnings.append(msg)
                warnings.warn(msg, stacklevel=4)

    def _read_span_at(self, index: int, piece: Piece, start: int, out: memoryview) -> None:
        location = self.locations[index]
        rel, where = f"{self.step_dir}/{piece.file}", self._where(index, piece.file)
        end = start + len(out)
        pos = 0
        for chunk in piece.chunks:
            c_start, c_end = pos, pos + chunk.raw
            pos = c_end
            if c_end <= start or c_start >= end:
                continue
            lo, hi = max(start, c_start), min(end, c_end)
            dst = out[lo - start:hi - start]
            if chunk.ref is not None:
                self._read_ref_chunk(location, chunk, dst, lo - c_start, hi - c_start)
                continue
            try:
                _read_chunk(location, chunk, rel, where, dst, lo - c_start, hi - c_start)
            except CorruptCheckpointError:  # an incremental save never bases on it again
                note_bad(location.display, rel)
                raise

    def _read_ref_chunk(self, first: Location, chunk: Chunk, dst: memoryview, lo: int,
                        hi: int) -> None:
        """A referenced chunk, from ``first`` or else any location holding a good copy of it
        (the same per-file fallback as the step's own files); none: the first error, marked
        :class:`~shardckpt.refcheck.DeadReference`."""
        assert chunk.ref is not None
        errors: list[BaseException] = []
        for location in self.refs.sources(chunk.ref, first):
            index = self.locations.index(location)
            with self._lock:  # a bad chunk there (per chunk), or the whole file unreadable (-1)
                known = (self._bad_refs.get((index, chunk.ref, chunk.offset))
                         or self._bad_refs.get((index, chunk.ref, -1)))
            if known is not None:
                errors.append(known)
                continue
            c_rel, c_where = ref_path(location, chunk.ref)
            try:
                _read_chunk(location, chunk, c_rel, c_where, dst, lo, hi)
                return
            except (CorruptCheckpointError, IncompleteCheckpointError, StorageError,
                    FileNotFoundError) as exc:
                corrupt = isinstance(exc, CorruptCheckpointError)
                if corrupt:  # an incremental save never bases on it again
                    note_bad(location.display, c_rel)
                errors.append(exc)
                with self._lock:
                    self._bad_refs[(index, chunk.ref, chunk.offset if corrupt else -1)] = exc
                if len(self.locations) > 1:
                    msg = f"{exc} (reading it from another location)"
                    self.warnings.append(msg)
                    warnings.warn(msg, stacklevel=5)
        first_error = errors[0]  # a storage error stays one: it is not bad data
        if isinstance(first_error, ShardckptError):
            raise dead(first_error)
        raise first_error

    def read_box(self, meta: TensorMeta, offsets: tuple[int, ...], lengths: tuple[int, ...],
                 out: torch.Tensor) -> None:
        """Copy the global box ``offsets/lengths`` of a tensor into ``out`` (shape ``lengths``)."""
        isz = itemsize(meta.dtype)
        out = out.detach()  # same memory; a Parameter (leaf requiring grad) is filled in place
        dtype = out.dtype
        for piece in meta.pieces:
            span = piece_span(piece, isz, offsets, lengths)
            if span is None:
                continue
            dst_region = out[tuple(slice(a - b, a - b + n)
                                   for a, b, n in zip(span.lo, offsets, span.size))]
            whole = span.size == piece.lengths and span.size == lengths
            if whole and out.is_contiguous() and out.device.type == "cpu" and \
                    out.dtype == torch_dtype(meta.dtype):
                self.read_span(piece, 0, byte_view(out))
                continue
            buf = torch.empty(span.end - span.start, dtype=torch.uint8)
            self.read_span(piece, span.start, byte_view(buf))
            src = buf.view(torch_dtype(meta.dtype)).as_strided(span.size, span.strides, 0)
            dst_region.copy_(src.to(dtype) if src.dtype != dtype else src)
        if math.prod(lengths) and not meta.pieces:
            raise IncompleteCheckpointError(f"{self.location.display}/{self.step_dir}: "
                                            f"tensor has no pieces")


def _read_chunk(location: Location, chunk: Chunk, rel: str, where: str, dst: memoryview,
                lo: int, hi: int) -> None:
    """Bytes ``lo:hi`` of ``chunk`` (in file ``rel``) into ``dst``, checked on the way."""
    if chunk.codec == "raw" and lo == 0 and hi == chunk.raw and hasattr(location, "read_into"):
        n = location.read_into(rel, chunk.offset, dst)
        if n != chunk.stored:
            raise CorruptCheckpointError(f"{where}: chunk at offset {chunk.offset}: "
                                         f"read {n} of {chunk.stored} bytes")
        if checksum(dst) != chunk.xxh3:
            raise CorruptCheckpointError(
                f"{where}: checksum mismatch in chunk at offset {chunk.offset}")
        return
    stored = location.read_range(rel, chunk.offset, chunk.stored)
    raw = memoryview(decode_chunk(stored, chunk, where))
    dst[:] = raw[lo:hi]
