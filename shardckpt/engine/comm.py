"""JSON-only collectives for the save/load protocols: no pickle crosses a process boundary.

:class:`Comm` is what the protocols need. :class:`GlooComm` runs on its own gloo group (created
once per manager, collectively), so the checkpoint protocol never touches training's process
group or stream; :meth:`GlooComm.close` destroys that group (see there for why it must not be
left to the interpreter's exit). :class:`LocalComm` is the single-process stand-in;
:class:`ThreadComm` runs N ranks as threads of one process, so unit tests can drive multi-rank
logic without processes.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import timedelta
from typing import Any, Protocol

import torch
import zstandard

from ..errors import CollectiveError
from .tensorbytes import byte_view

COMPRESS_ABOVE = 64 << 10  # bytes of JSON above which a payload travels zstd-compressed
MAX_PAYLOAD = 4 << 30


def encode_json(obj: Any) -> bytes:
    """A payload: ``b"J"`` + JSON, or ``b"Z"`` + a zstd frame of it when large (leaf lists repeat
    key prefixes, dtypes and shapes: they shrink several-fold)."""
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > COMPRESS_ABOVE:
        return b"Z" + zstandard.ZstdCompressor(level=1).compress(data)
    return b"J" + data


def decode_json(payload: bytes) -> Any:
    kind, body = payload[:1], payload[1:]
    if kind == b"Z":
        body = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_PAYLOAD)
    elif kind != b"J":
        raise CollectiveError(f"malformed collective payload (kind {kind!r})")
    return json.loads(body)


class Comm(Protocol):
    """The collectives of the save and load protocols. Every rank calls each, in order; JSON
    values only. ``what`` names the step of the protocol in errors."""

    rank: int
    world_size: int

    def all_gather_json(self, obj: Any, what: str = "") -> list[Any]: ...

    def gather_json(self, obj: Any, what: str = "", dst: int = 0) -> list[Any] | None: ...

    def broadcast_json(self, obj: Any, what: str = "", src: int = 0) -> Any: ...

    def any_true(self, flag: bool, what: str = "") -> bool: ...


class LocalComm:
    rank = 0
    world_size = 1

    def all_gather_json(self, obj: Any, what: str = "") -> list[Any]:
        return [json.loads(json.dumps(obj))]

    def gather_json(self, obj: Any, what: str = "", dst: int = 0) -> list[Any] | None:
        return [json.loads(json.dumps(obj))]

    def broadcast_json(self, obj: Any, what: str = "", src: int = 0) -> Any:
        return json.loads(json.dumps(obj))

    def any_true(self, flag: bool, what: str = "") -> bool:
        return bool(flag)


class GlooComm:
    """Collectives over a private gloo group. Every rank of ``group`` must call each in order."""

    def __init__(self, process_group: Any = None, timeout_s: float = 600.0) -> None:
        import torch.distributed as dist

        self._dist = dist
        ranks = dist.get_process_group_ranks(process_group) if process_group is not None \
            else list(range(dist.get_world_size()))
        self.group = dist.new_group(ranks=ranks, backend="gloo",
                                    timeout=timedelta(seconds=timeout_s))
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self._global = ranks
        self.closed = False
        self._pid = os.getpid()

    def close(self, destroy: bool = True) -> None:
        """Destroy this comm's private groups (gloo, and read-once's NCCL group) now, on the
        calling thread, and drop the last references to them; idempotent.

        Left alive, a group is freed only by the garbage collection of a finalizing interpreter
        (a manager sits in reference cycles). Its C++ destructor then releases the GIL and joins
        its worker threads, and a worker that still has to free a Python object (the tensor of
        a finished collective whose Python wrapper died first) takes the GIL to do so; in a
        finalizing interpreter that thread is ended with ``pthread_exit``, whose unwinding
        through a ``noexcept`` frame aborts the process ("terminate called without an active
        exception", SIGABRT at exit). Destroyed here, the workers finish while Python is alive.
        A group that ``destroy_process_group()`` already unregistered is only let go, and so is
        every group with ``destroy=False`` (the caller is about to destroy it)."""
        if self.closed:
            return
        self.closed = True
        if os.getpid() != self._pid:  # a forked child: the group's threads are the parent's
            return  # (freeing it would join threads that do not exist here)
        groups = [g for g in (getattr(self, "_read_once_nccl", None), self.group) if g is not None]
        self.group, self._read_once_nccl = None, None
        destroy_group = self._dist.destroy_process_group
        destroy_group = getattr(destroy_group, "__wrapped__", destroy_group)  # not the guard
        while groups:
            group = groups.pop()
            try:
                if destroy:
                    destroy_group(group)
            except ValueError:  # already destroyed (destroy_process_group() with no argument)
                pass
            del group  # the last reference: the group is freed here, its threads joined

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise CollectiveError(f"rank {self.rank}: collective {what!r} on a closed comm "
                                  f"(its private group was destroyed)")

    def _fail(self, what: str, exc: BaseException) -> CollectiveError:
        return CollectiveError(
            f"rank {self.rank}: collective {what!r} failed (a peer died, hung past the timeout "
            f"or raised outside the protocol): {type(exc).__name__}: {str(exc)[:300]}")

    @staticmethod
    def _encode(obj: Any) -> torch.Tensor:
        return torch.frombuffer(bytearray(encode_json(obj)), dtype=torch.uint8)

    def _pad_to_largest(self, obj: Any) -> tuple[list[int], torch.Tensor]:
        """Every rank's payload size, and this rank's payload padded to the largest of them."""
        self._check_open("all_gather sizes")
        payload = self._encode(obj)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self._dist.all_gather(sizes, torch.tensor([payload.numel()]), group=self.group)
        padded = torch.zeros(max(int(s) for s in sizes), dtype=torch.uint8)
        padded[: payload.numel()] = payload
        return [int(s) for s in sizes], padded

    def all_gather_json(self, obj: Any, what: str = "all_gather") -> list[Any]:
        try:
            sizes, padded = self._pad_to_largest(obj)
            bufs = [torch.empty_like(padded) for _ in range(self.world_size)]
            self._dist.all_gather(bufs, padded, group=self.group)
        except RuntimeError as exc:
            raise self._fail(what, exc) from exc
        return [decode_json(bytes(byte_view(b[:n]))) for b, n in zip(bufs, sizes)]

    def gather_json(self, obj: Any, what: str = "gather", dst: int = 0) -> list[Any] | None:
        try:
            sizes, padded = self._pad_to_largest(obj)
            bufs = [torch.empty_like(padded) for _ in range(self.world_size)] \
                if self.rank == dst else None
            self._dist.gather(padded, bufs, dst=self._global[dst], group=self.group)
        except RuntimeError as exc:
            raise self._fail(what, exc) from exc
        if bufs is None:
            return None
        return [decode_json(bytes(byte_view(b[:n]))) for b, n in zip(bufs, sizes)]

    def broadcast_json(self, obj: Any, what: str = "broadcast", src: int = 0) -> Any:
        dist = self._dist
        self._check_open(what)
        try:
            payload = self._encode(obj) if self.rank == src else None
            size = torch.tensor([payload.numel() if payload is not None else 0])
            dist.broadcast(size, src=self._global[src], group=self.group)
            buf = payload if payload is not None else torch.empty(int(size), dtype=torch.uint8)
            if int(size):
                dist.broadcast(buf, src=self._global[src], group=self.group)
        except RuntimeError as exc:
            raise self._fail(what, exc) from exc
        return decode_json(bytes(byte_view(buf)))

    def any_true(self, flag: bool, what: str = "any") -> bool:
        """Whether ``flag`` is true on any rank: one all-reduce of one integer, cheaper than
        gathering JSON when all that matters is whether anything went wrong."""
        self._check_open(what)
        try:
            value = torch.tensor([int(bool(flag))], dtype=torch.int64)
            self._dist.all_reduce(value, op=self._dist.ReduceOp.MAX, group=self.group)
        except RuntimeError as exc:
            raise self._fail(what, exc) from exc
        return bool(value.item())


class _Exchange:
    """What the ranks of a :class:`ThreadComm` group share: one slot per rank, and a barrier."""

    def __init__(self, world_size: int, timeout_s: float) -> None:
        self.slots: list[Any] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout_s)


class ThreadComm:
    """One rank of a group of threads in one process (for tests): the same collectives and
    JSON round trips as :class:`GlooComm`. A rank that never arrives breaks the barrier, and
    its peers raise ``CollectiveError`` after ``timeout_s``."""

    def __init__(self, rank: int, exchange: _Exchange) -> None:
        self.rank, self.world_size, self._x = rank, len(exchange.slots), exchange

    @classmethod
    def group(cls, world_size: int, timeout_s: float = 30.0) -> list[ThreadComm]:
        exchange = _Exchange(world_size, timeout_s)
        return [cls(r, exchange) for r in range(world_size)]

    def _wait(self, what: str) -> None:
        try:
            self._x.barrier.wait()
        except threading.BrokenBarrierError as exc:
            raise CollectiveError(f"rank {self.rank}: collective {what!r} failed (a peer "
                                  f"never arrived)") from exc

    def _exchange(self, obj: Any, what: str) -> list[Any]:
        self._x.slots[self.rank] = encode_json(obj)
        self._wait(what)
        out = [decode_json(p) for p in self._x.slots]
        self._wait(what)  # nobody overwrites a slot before everyone has read it
        return out

    def all_gather_json(self, obj: Any, what: str = "all_gather") -> list[Any]:
        return self._exchange(obj, what)

    def gather_json(self, obj: Any, what: str = "gather", dst: int = 0) -> list[Any] | None:
        out = self._exchange(obj, what)
        return out if self.rank == dst else None

    def broadcast_json(self, obj: Any, what: str = "broadcast", src: int = 0) -> Any:
        return self._exchange(obj if self.rank == src else None, what)[src]

    def any_true(self, flag: bool, what: str = "any") -> bool:
        return any(self._exchange(bool(flag), what))


def release_comm(comm: Any, destroy: bool = True) -> None:
    """Destroy ``comm``'s private groups now (:meth:`GlooComm.close`); nothing for others."""
    close = getattr(comm, "close", None)
    if close is not None:
        close(destroy)


def make_comm(process_group: Any, timeout_s: float) -> LocalComm | GlooComm:
    """The comm for a manager: gloo when torch.distributed is initialized, else local."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return GlooComm(process_group, timeout_s)
    if process_group is not None:
        raise ValueError("process_group given but torch.distributed is not initialized")
    return LocalComm()
