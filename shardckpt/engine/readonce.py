"""Read-once load: bytes that several loading ranks need are read from storage by one of them
and sent to the others over the manager's private process group.

A DDP job of N ranks would otherwise read a checkpoint N times at a restart (an HSDP job once
per replica group): N times the GET traffic on an object store, and a restart that waits on the
slowest reader. :func:`share_reads` is called by every rank of a load after the plan phase
agreed, with this rank's read requests. In step, on every rank:

1. whether to share at all: ``SHARDCKPT_READ_ONCE`` (:func:`read_once_wanted`), on every rank
   (one all-reduce), and only with a process group;
2. one all-gather of the shard files each rank reads (as index runs); a file read by one rank
   alone stays that rank's, unchanged;
3. one all-gather of the byte spans each rank reads from the pieces of the shared files. Every
   rank computes the same :func:`plan_units`: the spans of one piece that overlap form a unit; a
   unit two or more ranks want is read by one of them, largest units first, each by the one of
   its ranks with the fewest bytes to read so far (its own unshared reads counted), so readers
   are spread by bytes;
4. each rank reads its units (every chunk checked against its checksum, from the first location
   with a good copy), then the failures are agreed: if a unit failed, every rank raises the
   reader's error (of the unit it wanted, if any), which names the file, and nothing is sent.
   The load's read phase then fails on every rank alike (:func:`~shardckpt.engine.load.agree`):
   bad data is a ``CorruptLoadError`` everywhere, and the fallback to an older step applies on
   all ranks alike. The same gather carries each rank's notes of files found corrupt
   (:mod:`.badfiles`), and every rank notes them all: a later incremental save bases on those
   bytes on no rank, not only on the one that read them (also when a good copy at another
   location let the read succeed);
5. the readers send each receiver its span as a raw ``uint8`` tensor, after its XXH3-64 (an
   ``int64`` tensor), checked on arrival; all sends and receives of a batch are posted at once.
   With a NCCL training backend and CUDA, the bytes travel through the device over a private
   NCCL group; otherwise over the manager's gloo group. A dead peer fails the load.

Reads of the shared spans are then served from memory; everything else is read from storage as
before. ``bytes_read`` (from storage, this rank) and ``bytes_received`` (from peers) go into the
load profile.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from .. import knobs
from ..errors import CollectiveError, CorruptCheckpointError, IncompleteCheckpointError
from ..format.manifest import expand, to_ranges
from ..format.shard import Piece
from .badfiles import note_all, noted
from .comm import Comm
from .failures import describe
from .reader import CheckpointReader
from .readunits import Unit, bytes_read, counted, plan_units, read_once_wanted, spans
from .tensorbytes import byte_view

__all__ = ["ServedReader", "bytes_read", "counted", "share_reads"]

DEVICE_BATCH = 1 << 30  # bytes staged on the device per batch of sends (NCCL)


class ServedReader(CheckpointReader):
    """A :class:`CheckpointReader` whose reads of shared spans come from memory."""

    served: dict[tuple[str, str, tuple[int, ...]], list[tuple[int, torch.Tensor]]]

    def read_span(self, piece: Piece, start: int, out: memoryview) -> None:
        for s, buf in self.served.get((piece.file, piece.key, piece.offsets), ()):
            if s <= start and start + len(out) <= s + buf.numel():
                out[:] = byte_view(buf)[start - s:start - s + len(out)]
                return
        super().read_span(piece, start, out)


def _signed(digest: int) -> int:
    return digest - (1 << 64) if digest >= 1 << 63 else digest


def _device_group(comm: Comm) -> tuple[Any, torch.device | None]:
    """The group and device the bytes travel on: a private NCCL group on this rank's CUDA device
    when training runs on NCCL (created once per comm, collectively), else the comm's gloo."""
    import torch.distributed as dist

    group = getattr(comm, "group", None)
    if not (torch.cuda.is_available() and "nccl" in str(dist.get_backend())):
        return group, None
    device = torch.device("cuda", torch.cuda.current_device())
    nccl = getattr(comm, "_read_once_nccl", None)
    if nccl is None:  # every rank loads together, so every rank of the group gets here
        ranks = dist.get_process_group_ranks(group)
        nccl = dist.new_group(ranks=ranks, backend="nccl", use_local_synchronization=True)
        dist.all_reduce(torch.zeros(1, device=device), group=nccl)  # every rank's first call
        comm._read_once_nccl = nccl  # type: ignore[attr-defined]
    return nccl, device


@dataclass
class _Needs:
    """What this rank reads: file index -> piece index -> [start, end), and the pieces."""

    names: list[str]
    spans: dict[int, dict[int, tuple[int, int]]] = field(default_factory=dict)
    pieces: dict[tuple[int, int], Piece] = field(default_factory=dict)

    @classmethod
    def of(cls, reader: CheckpointReader, requests: Sequence[Any]) -> _Needs:
        names = sorted(reader.manifest.files)
        file_index = {n: i for i, n in enumerate(names)}
        needs = cls(names)
        where: dict[str, dict[tuple[str, tuple[int, ...]], int]] = {}
        for req in requests:
            for piece, s, e in spans(req.meta, req.offsets, req.lengths):
                if e <= s:
                    continue
                if piece.file not in where:
                    header = reader.check_any(piece.file)
                    where[piece.file] = {(p.key, p.offsets): i
                                         for i, p in enumerate(header.pieces)}
                f, p = file_index[piece.file], where[piece.file][(piece.key, piece.offsets)]
                old = needs.spans.setdefault(f, {}).get(p)
                needs.spans[f][p] = (min(s, old[0]), max(e, old[1])) if old else (s, e)
                needs.pieces[(f, p)] = piece
        return needs


def share_reads(comm: Comm, reader: CheckpointReader, requests: Sequence[Any], threads: int,
                profile: dict[str, float]) -> CheckpointReader:
    """Collective (see the module): read this rank's share of the bytes several ranks need and
    exchange them. Returns the reader the read phase uses (this one when nothing is shared).
    Raises, after every collective, the failure of a read this rank needed (naming the file)."""
    profile["bytes_received"] = 0.0
    if comm.world_size == 1:
        return reader
    error: BaseException | None = None
    try:
        wanted = getattr(comm, "group", None) is not None and read_once_wanted(reader.locations)
    except ValueError as exc:  # a bad SHARDCKPT_READ_ONCE: raised once every rank has decided
        error, wanted = exc, False
    if comm.any_true(not wanted, "load: read once?"):
        if error is not None:
            raise error
        return reader
    try:
        needs = _Needs.of(reader, requests)
    except Exception as exc:  # reported after the collectives, which every rank must join
        error, needs = exc, _Needs(sorted(reader.manifest.files))
    files_of = [expand(tuple((a, b) for a, b in runs)) for runs in comm.all_gather_json(
        [list(r) for r in to_ranges(needs.spans)], "load: files each rank reads")]
    count: dict[int, int] = {}
    for files in files_of:
        for f in files:
            count[f] = count.get(f, 0) + 1
    mine = [[f, p, s, e] for f, per in sorted(needs.spans.items()) if count.get(f, 0) > 1
            for p, (s, e) in sorted(per.items())]
    spans_of = comm.all_gather_json(mine, "load: spans of the shared files")
    sizes = [reader.manifest.files[n].nbytes for n in needs.names]
    units, _ = plan_units(comm.world_size, sizes, files_of, spans_of)
    buffers, failed = _read_units(comm.rank, reader, needs, units, threads)
    outcomes = comm.all_gather_json({"failed": failed, "bad_files": noted()},
                                    "load: shared reads")
    for outcome in outcomes:  # every rank notes what any reader found corrupt (badfiles.py)
        note_all(outcome["bad_files"])
    failures = [o["failed"] for o in outcomes]
    bad = {int(k): (r, v) for r, f in enumerate(failures) for k, v in f.items()}
    if bad and error is None:  # every rank fails alike: the first unit it wanted, else the first
        i = min(bad, key=lambda i: (comm.rank not in units[i].spans, i))
        reader_rank, (msg, kind) = bad[i]
        cls = {"corrupt": CorruptCheckpointError,
               "incomplete": IncompleteCheckpointError}.get(kind, CollectiveError)
        error = cls(f"rank {reader_rank} read {needs.names[units[i].file]} for ranks "
                    f"{sorted(units[i].spans)} and found it bad: {msg}")
    if not bad:
        try:
            profile["bytes_received"] = float(_exchange(comm, units, buffers, needs.names))
        except Exception as exc:
            error = error or exc
    profile["shared_units"] = float(len(units))
    if error is not None:
        raise error
    served = copy.copy(reader)
    served.__class__ = ServedReader
    assert isinstance(served, ServedReader)
    served.served = {}
    for i, u in enumerate(units):
        if i in buffers:
            piece = needs.pieces[(u.file, u.piece)]
            start = u.lo if u.reader == comm.rank else u.spans[comm.rank][0]
            served.served.setdefault((piece.file, piece.key, piece.offsets), []).append(
                (start, buffers[i]))
    return served


def _read_units(rank: int, reader: CheckpointReader, needs: _Needs, units: list[Unit],
                threads: int) -> tuple[dict[int, torch.Tensor], dict[str, list[str]]]:
    """Read this rank's units from storage (each chunk checked); allocate its receive buffers.
    Returns the buffers by unit and the failures (unit -> [message, kind])."""
    buffers: dict[int, torch.Tensor] = {}
    failed: dict[str, list[str]] = {}

    def read(i: int) -> None:
        u = units[i]
        try:
            reader.read_span(needs.pieces[(u.file, u.piece)], u.lo, byte_view(buffers[i]))
        except Exception as exc:
            kind = "corrupt" if isinstance(exc, CorruptCheckpointError) else \
                "incomplete" if isinstance(exc, IncompleteCheckpointError) else "other"
            failed[str(i)] = [describe(exc), kind]

    mine = []
    for i, u in enumerate(units):
        if u.reader == rank:
            buffers[i] = torch.empty(u.hi - u.lo, dtype=torch.uint8)
            mine.append(i)
        elif rank in u.spans:
            s, e = u.spans[rank]
            buffers[i] = torch.empty(e - s, dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(read, mine))
    return buffers, failed


def _exchange(comm: Comm, units: list[Unit], buffers: dict[int, torch.Tensor],
              names: list[str]) -> int:
    """Send and receive the units' spans (see the module); returns the bytes received."""
    import torch.distributed as dist

    group, device = _device_group(comm)
    rank, received = comm.rank, 0
    batches: list[list[int]] = [[]]
    size = 0
    for i, u in enumerate(units):  # through the device: at most DEVICE_BATCH bytes at a time
        if device is not None and size >= DEVICE_BATCH:
            batches.append([])
            size = 0
        batches[-1].append(i)
        size += sum(e - s for r, (s, e) in u.spans.items() if r != u.reader)
    for batch in batches:
        ops, checks = [], []
        for j in batch:
            unit = units[j]
            if unit.reader == rank:
                for r, (s, e) in sorted(unit.spans.items()):
                    if r == rank:
                        continue
                    part = buffers[j][s - unit.lo:e - unit.lo]
                    digest = torch.tensor([_signed(xxhash.xxh3_64_intdigest(byte_view(part)))])
                    ops.append(dist.P2POp(dist.isend, _on(digest, device), group=group,
                                          group_peer=r, tag=2 * j))
                    ops.append(dist.P2POp(dist.isend, _on(part, device), group=group,
                                          group_peer=r, tag=2 * j + 1))
            elif rank in unit.spans:
                digest = _on(torch.zeros(1, dtype=torch.int64), device)
                data = _on(buffers[j], device)
                ops.append(dist.P2POp(dist.irecv, digest, group=group, group_peer=unit.reader,
                                      tag=2 * j))
                ops.append(dist.P2POp(dist.irecv, data, group=group, group_peer=unit.reader,
                                      tag=2 * j + 1))
                checks.append((j, digest, data))
        try:
            for work in dist.batch_isend_irecv(ops) if ops else []:
                work.wait()
        except RuntimeError as exc:
            raise CollectiveError(f"rank {rank}: the read-once exchange failed (a peer died or "
                                  f"hung past the timeout): {type(exc).__name__}: "
                                  f"{str(exc)[:300]}") from exc
        for j, digest, data in checks:
            unit = units[j]
            if device is not None:
                buffers[j].copy_(data)
            view = byte_view(buffers[j])
            if _signed(xxhash.xxh3_64_intdigest(view)) != int(digest.item()):
                raise CollectiveError(f"rank {rank}: bytes of {names[unit.file]} from rank "
                                      f"{unit.reader} failed their XXH3 check on arrival")
            received += len(view)
    return received


def _on(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return t if device is None else t.to(device)


def check_read_once(comm: Any) -> None:
    """Collective, at the start of a load: ``ValueError`` on every rank if any rank's
    ``SHARDCKPT_READ_ONCE`` is not a valid value (before anything is read or loaded)."""
    error: str | None = None
    try:
        knobs.READ_ONCE.get()
    except ValueError as exc:
        error = f"rank {comm.rank}: {exc}"
    errors = comm.all_gather_json(error, "load: check SHARDCKPT_READ_ONCE") \
        if comm.world_size > 1 else [error]
    first = next((e for e in errors if e), None)
    if first is not None:
        raise ValueError(f"{first} (nothing was loaded)")
