"""Leases and the prune lock: small JSON records under ``ROOT/.shardckpt/`` that work on any store.

No ``fcntl``, no compare-and-swap: each record is one small object written whole (temp file and
rename on local disks, one single-part PUT on object stores), and whether it is in force is
judged by the expiry time stamp inside it against the reader's clock. The same code therefore
works on a local disk, NFS and S3 / GCS, provided the clocks of the hosts involved agree to well
within a TTL (defaults: leases 300 s, renewed every 60 s; the prune lock 120 s, renewed every
24 s). Records are about liveness, not durability: on a local disk they are written without
fsync, since a crash of the host ends every lease it held anyway.

**Leases** (``.shardckpt/leases/``). A *writer* lease (``<step dir>.writer.<token>.json``) says
"a save is writing this step directory": rank 0 takes one before any rank writes, renews it from
a daemon thread, and removes it once the save has committed or failed. A prune never deletes or
reaps a step directory with a live writer lease. A *reaper* lease (``_reaper.<token>.json``)
says "a prune is deleting these directories". Each side writes its own lease first and only
then looks for the other's, so at least one of them sees the other (Dekker's handshake; local
disks and S3 are read-after-write consistent): a prune that sees a live writer lease leaves that
directory alone, a writer that sees a live reaper lease on its directory waits for it to go
before it clears the directory. A writer also refuses to commit once less than half its TTL is
left (its renewals stalled, so a prune may have judged it dead). What remains open: a writer
frozen (SIGSTOP, VM pause) for more than half a TTL *between* that check and its manifest upload
could still commit a directory that a prune is reaping.

**The prune lock** (``.shardckpt/prune.lock``), Fischer's protocol: read the lock; if a live
record of someone else is there, it is held. Otherwise write our own record with a fresh token,
wait ``settle`` seconds, and read it back: still ours means acquired. This is mutual exclusion
as long as every contender's read-then-write takes less than ``settle`` (default 250 ms); an
upload stalled for longer than that, or clocks further apart than the TTL, can let two prunes
both believe they hold it. That costs duplicate work, not data: every prune only deletes what
its own plan deletes, manifest first, and deleting twice is harmless. The holder renews the
lock while it works and stops deleting as soon as it finds it lost (taken over after a lapse).

The records themselves (holder identity, parsing, dead holders) are in :mod:`.records`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, TypeVar

from ..errors import LeaseError, PruneLockedError, ShardckptError
from ..knobs import LEASE_TTL_S, LOCK_SETTLE_MS, PRUNE_LOCK_TTL_S
from .base import Location
from .records import (
    CONTROL_DIR,
    LEASE_DIR,
    LOCK_PATH,
    PRUNER,
    REAPER,
    REAPER_PREFIX,
    WRITER,
    Record,
    modified_time,
    put_record,
    read_record,
)

_F = TypeVar("_F", bound=Callable[..., Any])
RENEWALS_PER_TTL = 5


# ------------------------------------------------------------------------------ held records
class _Held:
    """A record we wrote and keep alive: a daemon thread rewrites it every TTL/5."""

    def __init__(self, location: Location, relpath: str, record: Record, ttl: float,
                 clock: Callable[[], float]) -> None:
        self.location, self.relpath, self.record, self.ttl = location, relpath, record, ttl
        self._clock = clock
        self._mutex = threading.Lock()  # a renewal never races a release
        self._stop = threading.Event()
        self._released = False
        self.lost: str | None = None
        self.renew_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"shardckpt-{record.kind}-renew")

    def _start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl / RENEWALS_PER_TTL):
            try:
                self.renew()
            except Exception as exc:  # keep trying: expiry tells everyone else if we never get
                self.renew_error = exc  # through; check() tells our own holder
            if self.lost:
                return

    def _still_ours(self) -> bool:
        return True

    def renew(self) -> None:
        """Push the expiry to now + TTL (the daemon thread calls this every TTL/5)."""
        with self._mutex:
            if self._released or self.lost:
                return
            now = self._clock()
            if now >= self.record.expires:
                self.lost = f"{self.describe()} lapsed before it was renewed"
            if not self._still_ours():
                return
            record = replace(self.record, renewed=now, expires=now + self.ttl)
            put_record(self.location, self.relpath, record)
            self.record = record

    def check(self, margin: float = 0.0) -> None:
        """Raise :class:`LeaseError` if this record was lost, or has less than ``margin`` s left."""
        left = self.record.expires - self._clock()
        if self.lost:
            raise LeaseError(f"{self.location.display}/{self.relpath}: {self.lost}")
        if left < margin:
            raise LeaseError(f"{self.location.display}/{self.relpath}: {self.describe()} has "
                             f"{max(left, 0):.0f} s left (renewals stalled: "
                             f"{self.renew_error or 'no error seen'})")

    def describe(self) -> str:
        return self.record.describe()

    def _remove(self) -> None:
        self.location.remove(self.relpath)

    def abandon(self) -> None:
        """Stop renewing without touching storage: the record expires after its TTL."""
        self._stop.set()
        with self._mutex:
            self._released = True

    def release(self) -> None:
        """Stop renewing and remove the record (idempotent). Storage errors propagate."""
        self._stop.set()
        with self._mutex:
            if self._released:
                return
            self._released = True
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
        self._remove()

    def __enter__(self) -> _Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Lease(_Held):
    """A writer's claim on one step directory, or a reaper's on several."""

    @classmethod
    def acquire(cls, location: Location, dirs: str | Iterable[str], kind: str = WRITER,
                ttl: float | None = None, clock: Callable[[], float] = time.time) -> Lease:
        """Write a fresh lease on ``dirs`` (one step directory name, or several for a reaper)
        and start renewing it."""
        dirs = (dirs,) if isinstance(dirs, str) else tuple(dirs)
        if kind == WRITER and len(dirs) != 1:
            raise ValueError(f"a writer lease covers one step directory, got {dirs!r}")
        if kind not in (WRITER, REAPER):
            raise ValueError(f"lease kind must be {WRITER!r} or {REAPER!r}, got {kind!r}")
        ttl = float(LEASE_TTL_S.get() if ttl is None else ttl)
        record = Record.new(kind, dirs, ttl, clock())
        name = f"{dirs[0]}.{WRITER}" if kind == WRITER else REAPER_PREFIX.rstrip(".")
        relpath = f"{LEASE_DIR}/{name}.{record.token}.json"
        location.makedirs(LEASE_DIR)
        put_record(location, relpath, record)
        lease = cls(location, relpath, record, ttl, clock)
        lease._start()
        return lease

    def narrow(self, dirs: Iterable[str]) -> None:
        """Cover only ``dirs`` from now on (a reaper letting go of directories it skips)."""
        with self._mutex:
            if self._released:
                return
            record = replace(self.record, dirs=tuple(dirs))
            put_record(self.location, self.relpath, record)
            self.record = record


def read_leases(location: Location, step_dir: str | None = None, kind: str | None = None
                ) -> dict[str, Record | None]:
    """Lease file name -> record (None: unreadable): every lease, or only those that may
    cover ``step_dir`` and / or be of ``kind`` (judged by file name, so others are not read)."""
    out: dict[str, Record | None] = {}
    writer_prefix = f"{step_dir}.{WRITER}." if step_dir is not None else ""
    for name in location.listdir(LEASE_DIR):
        if not name.endswith(".json"):
            continue
        is_reaper = name.startswith(REAPER_PREFIX)
        if kind is not None and is_reaper != (kind == REAPER):
            continue
        if not is_reaper and not name.startswith(writer_prefix):
            continue
        record = read_record(location, f"{LEASE_DIR}/{name}")
        if record is not None or location.size(f"{LEASE_DIR}/{name}") is not None:
            out[name] = record
    return out


def live_leases(location: Location, step_dir: str, kind: str,
                clock: Callable[[], float] = time.time) -> list[Record]:
    """The leases of ``kind`` covering ``step_dir`` that are in force now."""
    leases = read_leases(location, step_dir, kind).values()
    now = clock()
    return [r for r in leases
            if r is not None and r.kind == kind and step_dir in r.dirs and r.live(now)]


def claim_for_deletion(location: Location, dirs: Iterable[str]
                       ) -> tuple[Lease | None, set[str]]:
    """A prune's half of the handshake, for many directories at once: a reaper lease on
    ``dirs``, and the directories among them that a live writer holds (which the lease then
    no longer covers: the caller must leave them alone). No lease when ``dirs`` is empty."""
    wanted = list(dict.fromkeys(dirs))
    if not wanted:
        return None, set()
    lease = Lease.acquire(location, wanted, REAPER)
    try:
        now = time.time()
        held = {d for r in read_leases(location, kind=WRITER).values()
                if r is not None and r.kind == WRITER and r.live(now) for d in r.dirs}
        blocked = held & set(wanted)
        if blocked:
            lease.narrow(d for d in wanted if d not in blocked)
    except BaseException:
        with contextlib.suppress(Exception):
            lease.release()
        raise
    return lease, blocked


def wait_out_reapers(location: Location, step_dir: str, poll: float = 0.2) -> None:
    """A writer's half of the handshake, after writing its own lease: wait while a live
    reaper lease covers ``step_dir`` (a prune is deleting it). A reaper that died holds a
    writer up for at most a lease TTL."""
    while live_leases(location, step_dir, REAPER):
        time.sleep(poll)


# ------------------------------------------------------------------------------ the prune lock
class PruneLock(_Held):
    """The lock that keeps two prunes of one location from running at once (see the module)."""

    def _still_ours(self) -> bool:
        current = read_record(self.location, self.relpath)
        if current is None or current.token != self.record.token:
            self.lost = (f"the prune lock was taken over by "
                         f"{current.describe() if current else 'nobody (it was removed)'}")
            return False
        return True

    def _remove(self) -> None:
        current = read_record(self.location, self.relpath)
        if current is not None and current.token == self.record.token:
            self.location.remove(self.relpath)

    @classmethod
    def acquire(cls, location: Location, wait: float = 0.0, ttl: float | None = None,
                settle: float | None = None, clock: Callable[[], float] = time.time,
                poll: float = 0.2) -> PruneLock:
        """Take the lock, retrying for up to ``wait`` seconds; else :class:`PruneLockedError`."""
        ttl = float(PRUNE_LOCK_TTL_S.get() if ttl is None else ttl)
        settle = LOCK_SETTLE_MS.get() / 1000 if settle is None else settle
        deadline = time.monotonic() + wait
        while True:
            holder = cls._try(location, ttl, settle, clock)
            if isinstance(holder, PruneLock):
                return holder
            left = deadline - time.monotonic()
            if left <= 0:
                who = holder.describe() if holder else "a prune that lost no time taking it"
                raise PruneLockedError(f"{location.display}: another prune holds the lock: {who}; "
                                       f"try again later", holder)
            time.sleep(min(poll, left))

    @classmethod
    def _try(cls, location: Location, ttl: float, settle: float,
             clock: Callable[[], float]) -> PruneLock | Record | None:
        current = read_record(location, LOCK_PATH)
        if current is not None and current.live(clock()):
            return current
        record = Record.new(PRUNER, (), ttl, clock())
        location.makedirs(CONTROL_DIR)
        put_record(location, LOCK_PATH, record)
        if settle:
            time.sleep(settle)  # Fischer's delay: a contender that read "free" has written by now
        back = read_record(location, LOCK_PATH)
        if back is None or back.token != record.token:
            return back
        lock = cls(location, LOCK_PATH, record, ttl, clock)
        lock._start()
        return lock


def remove_dead_writers(location: Location, step_dir: str, clock: Callable[[], float] = time.time
                       ) -> None:
    """Remove the expired writer leases on ``step_dir`` if it holds a manifest (committed);
    never one in force (each is read again just before it goes)."""
    names = [n for n, r in read_leases(location, step_dir, WRITER).items()
             if r is not None and step_dir in r.dirs and not r.live(clock())]
    if not names or location.size(f"{step_dir}/manifest.json") is None:
        return
    for name in names:
        current = read_record(location, f"{LEASE_DIR}/{name}")
        if current is not None and not current.live(clock()):
            location.remove(f"{LEASE_DIR}/{name}")


# ------------------------------------------------------------------------------ a save's lease
class StepLease:
    """A save's writer lease on its step directory at one location (rank 0 holds one per
    location). Taken before anyone writes, after which any reaper on the directory is waited
    out; :meth:`check` before the commit; released when the save ends (``with``), or
    :meth:`abandon` ed for a location that failed (no more renewals, no storage call: the
    record expires).
    """

    def __init__(self, location: Location, step_dir: str) -> None:
        self.location, self.step_dir = location, step_dir
        self.lease = Lease.acquire(location, step_dir, WRITER)
        try:
            wait_out_reapers(location, step_dir)
        except BaseException:
            self.release()
            raise

    @property
    def token(self) -> str:
        return self.lease.record.token

    def check(self) -> None:
        """``LeaseError`` if renewals stalled for half a TTL: a prune may think us dead."""
        self.lease.check(margin=self.lease.ttl / 2)

    def abandon(self) -> None:
        self.lease.abandon()

    def release(self) -> None:
        """Remove the record; a storage error is swallowed (a lease left behind expires). Once
        the step is committed, also the expired writer leases of dead writers of this step
        (a killed save's, say): no prune removes those while the step's directory exists."""
        with contextlib.suppress(ShardckptError, OSError):
            self.lease.release()
            remove_dead_writers(self.location, self.step_dir)

    def __enter__(self) -> StepLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = [
    "LEASE_DIR",
    "LOCK_PATH",
    "REAPER",
    "WRITER",
    "Lease",
    "LeaseError",
    "PruneLock",
    "PruneLockedError",
    "Record",
    "StepLease",
    "claim_for_deletion",
    "live_leases",
    "modified_time",
    "put_record",
    "read_leases",
    "read_record",
    "remove_dead_writers",
    "wait_out_reapers",
]
