"""Lease and lock records: small JSON documents under ``ROOT/.shardckpt/`` (see :mod:`.lease`).

A :class:`Record` says who holds it (host, boot, PID namespace, PID and its start time) and until
when. A record whose holder is certainly dead no longer counts, whatever its expiry: same host,
same boot, same PID namespace, and that PID is gone or now belongs to a process started at
another time (Linux only; elsewhere only expiry frees a record). Records are written whole
through :meth:`~shardckpt.storage.base.Location.put_record` (no fsync: a crash of the host ends
every lease it held anyway).
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone

from .base import Location

CONTROL_DIR = ".shardckpt"
LEASE_DIR = f"{CONTROL_DIR}/leases"
LOCK_PATH = f"{CONTROL_DIR}/prune.lock"
CLAIMS_DIR = f"{CONTROL_DIR}/claims"  # exclusive creates in progress (local disks)
RECORD_FORMAT = "shardckpt-lease"
MAX_RECORD_BYTES = 64 << 10
WRITER, REAPER, PRUNER = "writer", "reaper", "prune-lock"
REAPER_PREFIX = "_reaper."


def claim_path(relpath: str) -> str:
    """The claim file of an exclusive create of ``relpath`` (``step-N/manifest.json`` ->
    ``.shardckpt/claims/step-N.manifest.json.claim``)."""
    return f"{CLAIMS_DIR}/{relpath.replace('/', '.')}.claim"


# ------------------------------------------------------------------------------ holder identity
# Where a scheduler or launcher says which job a process belongs to, first match wins.
JOB_ENV = ("SHARDCKPT_JOB_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "PBS_JOBID", "LSB_JOBID",
           "JOB_ID")


def job_id() -> str | None:
    """This process's job id (``SHARDCKPT_JOB_ID``, else the scheduler's), or None."""
    for name in JOB_ENV:
        value = os.environ.get(name)
        if value:
            return value[:200]
    return None


def _read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (Linux); None if there is no such pid."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@dataclass(frozen=True)
class Record:
    """One lease or lock record. Times are POSIX seconds of the holder's clock."""

    kind: str
    token: str
    dirs: tuple[str, ...]
    host: str
    pid: int
    boot: str | None
    pidns: str | None
    start: int | None
    acquired: float
    renewed: float
    expires: float
    job: str | None = None  # the scheduler's job id of the holder (see job_id), if any

    def __post_init__(self) -> None:
        dirs = self.dirs
        if isinstance(dirs, str) or not all(isinstance(d, str) for d in dirs):
            raise ValueError(f"dirs must be a list of step directory names, got {dirs!r}")
        object.__setattr__(self, "dirs", tuple(dirs))

    @classmethod
    def new(cls, kind: str, dirs: Iterable[str], ttl: float, now: float) -> Record:
        pid = os.getpid()
        return cls(kind, uuid.uuid4().hex, tuple(dirs), socket.gethostname(), pid,
                   _read_text("/proc/sys/kernel/random/boot_id"), _pid_namespace(),
                   _start_ticks(pid), now, now, now + ttl, job_id())

    def to_bytes(self) -> bytes:
        return json.dumps({"format": RECORD_FORMAT, **asdict(self)}, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> Record:
        """Raises ``ValueError`` (or a subclass) on anything that is not a valid record."""
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.pop("format", None) != RECORD_FORMAT:
            raise ValueError("not a shardckpt lease record")
        known = {f.name for f in fields(cls)}  # a newer writer may add fields: ignore them
        rec = cls(**{k: v for k, v in doc.items() if k in known})
        for name in ("acquired", "renewed", "expires"):
            value = getattr(rec, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} is not a time")
        if not isinstance(rec.token, str) or not isinstance(rec.pid, int):
            raise ValueError("bad token or pid")
        if rec.job is not None and not isinstance(rec.job, str):
            raise ValueError("bad job id")
        return rec

    def holder_dead(self) -> bool:
        """True only when the holder certainly is gone (see the module docstring)."""
        if self.boot is None or self.pidns is None or self.host != socket.gethostname():
            return False
        if self.boot != _read_text("/proc/sys/kernel/random/boot_id"):
            return False
        if self.pidns != _pid_namespace():
            return False
        start = _start_ticks(self.pid)
        return start is None or (self.start is not None and start != self.start)

    def live(self, now: float) -> bool:
        """In force at ``now``: not expired, and its holder not certainly dead."""
        return now < self.expires and not self.holder_dead()

    def describe(self) -> str:
        until = datetime.fromtimestamp(self.expires, timezone.utc).isoformat(timespec="seconds")
        job = f" job {self.job}" if self.job else ""
        return f"{self.kind} {self.host}:{self.pid}{job} (until {until})"

    def holder(self) -> str:
        """Who holds it: host, pid and job id (``job ?`` when the holder had none)."""
        return f"host {self.host}, pid {self.pid}, job {self.job or '?'}"


def put_record(location: Location, relpath: str, record: Record) -> None:
    """Write ``record`` whole (temp file and rename on local disks, one PUT on object stores),
    without fsync (see the module)."""
    location.put_record(relpath, record.to_bytes())


def read_record(location: Location, relpath: str) -> Record | None:
    """The record at ``relpath``; None if it is absent or not a valid record."""
    try:
        return Record.parse(location.read_file(relpath, MAX_RECORD_BYTES))
    except (FileNotFoundError, ValueError, TypeError, UnicodeDecodeError):
        return None


def modified_time(location: Location, relpath: str) -> float | None:
    """Last modification of a file or directory (POSIX seconds), or None if unknown/absent."""
    return location.modified_time(relpath)
