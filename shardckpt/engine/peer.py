"""Moving a rank's files to another rank over a process group: chunk streams, each chunk
checked against its XXH3-64 on arrival. Used by the node-local tier to push each rank's files
to its peer nodes after a save, and to bring a rank the files of a step that only another node
holds on restore. Files never cross a shared filesystem; nothing is pickled.

Every rank of the group calls :func:`run_transfers` with the same list of :class:`Transfer` s.
Each rank takes part only in the transfers it sends or receives, in list order; since every
rank walks the same order, the earliest unfinished transfer always has both its ends at it, so
the exchange never deadlocks.

One transfer on the wire (``src`` to ``dst``; int64 and uint8 tensors)::

    [n] + n bytes of JSON  {"files": [[name, nbytes], ...], "error": null | str}
    per file, per chunk:   [0, xxh3] + the chunk's bytes      (status 0: data follows)
                      or   [1, 0] + [n] + n bytes of JSON str  (the sender failed: stream ends)

A receiver that finds a bad chunk keeps draining the stream (the sender never waits on a peer
that gave up), discards the file and reports the error, naming the file, the offset and the
sender. Only a failed collective (a dead peer, a timeout) raises from here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import xxhash

from ..errors import CollectiveError
from ..storage import Location, Sink
from .tensorbytes import byte_view

DEFAULT_CHUNK = 4 << 20
_OK, _FAILED = 0, 1


@dataclass(frozen=True)
class Transfer:
    """Rank ``src`` (of the group) sends the files ``names`` of its step directory to ``dst``."""

    src: int
    dst: int
    names: tuple[str, ...]


@dataclass
class PeerReport:
    """This rank's side of an exchange."""

    bytes_sent: int = 0
    bytes_received: int = 0
    received: dict[str, int] = field(default_factory=dict)  # name -> bytes, durable at dest
    errors: list[str] = field(default_factory=list)


def _signed(digest: int) -> int:
    return digest - (1 << 64) if digest >= 1 << 63 else digest


def _digest(view: memoryview) -> int:
    return xxhash.xxh3_64_intdigest(view)


class _Link:
    """Point-to-point sends and receives of one transfer, named in errors."""

    def __init__(self, group: Any, peer: int, what: str) -> None:
        self.group, self.what = group, what
        self.peer = dist.get_global_rank(group, peer) if group is not None else peer

    def _fail(self, exc: BaseException) -> CollectiveError:
        return CollectiveError(f"{self.what}: the peer stream failed (the peer died or hung "
                               f"past the timeout): {type(exc).__name__}: {str(exc)[:300]}")

    def send(self, t: torch.Tensor) -> None:
        try:
            dist.send(t, self.peer, group=self.group)
        except RuntimeError as exc:
            raise self._fail(exc) from exc

    def recv(self, t: torch.Tensor) -> torch.Tensor:
        try:
            dist.recv(t, self.peer, group=self.group)
        except RuntimeError as exc:
            raise self._fail(exc) from exc
        return t

    def send_json(self, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send(torch.tensor([len(data)], dtype=torch.int64))
        self.send(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def recv_json(self) -> Any:
        n = int(self.recv(torch.zeros(1, dtype=torch.int64)))
        buf = self.recv(torch.empty(n, dtype=torch.uint8))
        return json.loads(bytes(byte_view(buf)))


def run_transfers(group: Any, rank: int, transfers: Sequence[Transfer], step_dir: str,
                  source: Location | None, dest: Location | None,
                  chunk_size: int = DEFAULT_CHUNK) -> PeerReport:
    """Collective over ``group`` (see the module). This rank sends its files from ``source``
    and writes what it receives to ``dest`` (each file durable before it is reported), both
    under ``step_dir``."""
    report = PeerReport()
    buf = torch.empty(max(1, chunk_size), dtype=torch.uint8)
    for t in transfers:
        if t.src == t.dst:
            raise ValueError(f"a transfer from rank {t.src} to itself")
        if rank == t.src:
            if source is None:
                raise ValueError(f"rank {rank} sends files but has no source location")
            link = _Link(group, t.dst, f"rank {rank} sending {step_dir} to rank {t.dst}")
            _send(link, source, step_dir, t.names, buf, report)
        elif rank == t.dst:
            if dest is None:
                raise ValueError(f"rank {rank} receives files but has no destination")
            link = _Link(group, t.src, f"rank {rank} receiving {step_dir} from rank {t.src}")
            _receive(link, t.src, dest, step_dir, buf, report)
    if report.received and dest is not None:
        dest.fsync_dir(step_dir)  # the new files' directory entries too
    return report


def _send(link: _Link, source: Location, step_dir: str, names: Iterable[str],
          buf: torch.Tensor, report: PeerReport) -> None:
    files: list[list[Any]] = []
    try:
        for name in names:
            size = source.size(f"{step_dir}/{name}")
            if size is None:
                raise FileNotFoundError(f"{source.display}/{step_dir}/{name}: missing")
            files.append([name, size])
    except Exception as exc:  # nothing follows the header: the receiver learns why
        link.send_json({"files": [], "error": f"{type(exc).__name__}: {exc}"})
        report.errors.append(str(exc))
        return
    link.send_json({"files": files, "error": None})
    ctrl = torch.zeros(2, dtype=torch.int64)
    for name, size in files:
        path = f"{step_dir}/{name}"
        offset = 0
        while offset < size:
            n = min(size - offset, buf.numel())
            view = byte_view(buf[:n])
            try:
                got = source.read_into(path, offset, view)
                if got != n:
                    raise OSError(f"{source.display}/{path}: {got} bytes at offset {offset}, "
                                  f"{n} expected (the file shrank)")
            except Exception as exc:
                ctrl[0], ctrl[1] = _FAILED, 0
                link.send(ctrl)
                link.send_json(f"{type(exc).__name__}: {exc}")
                report.errors.append(str(exc))
                return
            ctrl[0], ctrl[1] = _OK, _signed(_digest(view))
            link.send(ctrl)
            link.send(buf[:n])
            offset += n
            report.bytes_sent += n


def _receive(link: _Link, src: int, dest: Location, step_dir: str, buf: torch.Tensor,
             report: PeerReport) -> None:
    head = link.recv_json()
    if head["error"]:
        report.errors.append(f"rank {src} could not send {step_dir}: {head['error']}")
        return
    ctrl = torch.zeros(2, dtype=torch.int64)
    for name, size in head["files"]:
        path = f"{step_dir}/{name}"
        sink: Sink | None = None
        error: str | None = None
        try:
            dest.makedirs(step_dir)
            dest.remove(path)  # a stale copy from an interrupted save
            sink = dest.open_sink(path)
        except Exception as exc:
            error = f"{dest.display}/{path}: cannot write the copy from rank {src}: {exc}"
        offset = 0
        while offset < size:
            link.recv(ctrl)
            if int(ctrl[0]) != _OK:
                why = link.recv_json()
                if sink is not None:
                    sink.abort()
                report.errors.append(error or f"rank {src} failed sending {path} at offset "
                                              f"{offset}: {why}")
                return  # the stream ends here
            n = min(size - offset, buf.numel())
            view = byte_view(link.recv(buf[:n]))
            if error is None and _signed(_digest(view)) != int(ctrl[1]):
                error = (f"{dest.display}/{path}: chunk at offset {offset} from rank {src} "
                         f"failed its XXH3 check on arrival")
            if error is None and sink is not None:
                try:
                    sink.write(view)
                except Exception as exc:
                    error = f"{dest.display}/{path}: writing the copy from rank {src}: {exc}"
            offset += n
            report.bytes_received += n
        try:
            if error is None and sink is not None:
                sink.commit()
                report.received[name] = size
                continue
        except Exception as exc:
            error = f"{dest.display}/{path}: committing the copy from rank {src}: {exc}"
        if sink is not None:
            sink.abort()
        report.errors.append(error or f"{dest.display}/{path}: not written")
