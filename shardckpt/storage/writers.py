"""Two writers on one root: at most one of them ever commits a given step.

Two jobs may save to the same root (a double ``sbatch``, an overlapping requeue). A save guards
its step directory three times:

1. **Leases** (Dekker's handshake, as between a writer and a prune in :mod:`.lease`): rank 0
   writes its own writer lease on the step directory, *then* looks for another live writer
   lease on it. Of two writers, at least one sees the other; whoever sees one fails its save
   at once with :class:`~shardckpt.errors.ConcurrentWriterError` naming the other (host, pid,
   job id), and touches nothing in the directory. Both may fail; neither loses data.
2. **Under the lease, before the commit**: the writer looks again for another live writer
   lease (a writer whose renewals stalled may have been judged dead by the other) and checks
   that the files it wrote are still there.
3. **The commit is an exclusive create** of ``manifest.json``
   (:meth:`~shardckpt.storage.base.Location.write_exclusive`: ``link(2)`` of a durable temp
   file on a local disk, a ``PUT`` with ``If-None-Match: *`` on S3): of two writers that got
   this far, the second fails and names the first from the manifest it finds (its ``writer`` entry).

A failed save removes its directory only where no manifest and no other writer's live lease is
there (:func:`may_remove`): never a directory another writer holds or committed.

A second job on a root that a live job writes is warned about once, at its first save
(:func:`warn_other_jobs`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Iterable

from ..errors import ConcurrentWriterError, StorageError
from .base import Location
from .lease import read_leases
from .records import WRITER, Record, claim_path

MAX_READ = 256 << 20  # of a rival's manifest, read only to name its writer
_warned: weakref.WeakSet[Location] = weakref.WeakSet()  # locations already warned about
_warned_lock = threading.Lock()


def _ours(record: Record) -> bool:
    return record.host == socket.gethostname() and record.pid == os.getpid()


def rival_writers(location: Location, step_dir: str, token: str,
                  now: float | None = None) -> list[Record]:
    """The live writer leases on ``step_dir`` of other processes. Ours (``token``), and any
    other of this process (one an earlier, failed save abandoned at a failing location: saves
    of one manager never overlap), do not count."""
    now = time.time() if now is None else now
    return [r for r in read_leases(location, step_dir, WRITER).values()
            if r is not None and r.kind == WRITER and step_dir in r.dirs
            and r.token != token and not _ours(r) and r.live(now)]


def refuse(location: Location, step_dir: str, rivals: Iterable[Record], when: str
           ) -> ConcurrentWriterError:
    """The error of a save that found another writer on its step directory."""
    rivals = list(rivals)
    who = "; ".join(r.holder() for r in rivals)
    return ConcurrentWriterError(
        f"{location.display}/{step_dir}: another writer is saving this step ({who}); {when}. "
        f"At most one job commits a step: this save fails and leaves that writer's files "
        f"alone. Two jobs are writing to one root (a double submission or an overlapping "
        f"requeue?)", who)


def check_no_rival(location: Location, step_dir: str, token: str, when: str) -> None:
    """Raise :class:`ConcurrentWriterError` if another live writer lease covers ``step_dir``."""
    rivals = rival_writers(location, step_dir, token)
    if rivals:
        raise refuse(location, step_dir, rivals, when)


def committed_by(location: Location, step_dir: str, manifest: str) -> ConcurrentWriterError:
    """The error of a save whose exclusive commit found a manifest there: names its writer
    from that manifest (``extra.writer``) where it can be read."""
    who = None
    try:
        doc = json.loads(location.read_file(f"{step_dir}/{manifest}", MAX_READ))
        writer = doc.get("writer") if isinstance(doc, dict) else None
        if isinstance(writer, dict):
            who = (f"host {writer.get('host')}, pid {writer.get('pid')}, "
                   f"job {writer.get('job') or '?'}")
    except (FileNotFoundError, StorageError, ValueError, AttributeError):
        pass
    return ConcurrentWriterError(
        f"{location.display}/{step_dir}: another writer committed this step first "
        f"({who or 'writer unknown'}); this save is not committed and leaves that checkpoint "
        f"alone. Two jobs are writing to one root (a double submission or an overlapping "
        f"requeue?)", who)


def clear_claim(location: Location, relpath: str) -> None:
    """Remove the claim of an exclusive create of ``relpath`` that a writer left when it died
    (the caller holds the step's lease and found no other writer's)."""
    location.remove(claim_path(relpath))


def may_remove(location: Location, step_dir: str, token: str | None, manifest: str) -> bool:
    """Whether a failed save may remove ``step_dir``: no manifest is there (someone's commit)
    and no other writer's live lease covers it. Unknown (a storage error): no."""
    try:
        if location.size(f"{step_dir}/{manifest}") is not None:
            return False
        return not rival_writers(location, step_dir, token or "")
    except (StorageError, OSError):
        return False


def writer_identity() -> dict[str, object]:
    """Who commits: recorded in the manifest (``extra.writer``), so that a writer that loses
    the commit race can name the winner (a top-level ``writer`` member of the manifest)."""
    from .records import job_id

    return {"host": socket.gethostname(), "pid": os.getpid(), "job": job_id()}


def warn_other_jobs(location: Location) -> None:
    """Once per location (per process): warn if a live writer lease of another process is
    there, i.e. another job is saving to this root right now."""
    with _warned_lock:
        if location in _warned:
            return
        _warned.add(location)
    now = time.time()
    try:
        others = [r for r in read_leases(location, kind=WRITER).values()
                  if r is not None and r.live(now) and not _ours(r)]
    except (StorageError, OSError):
        return
    if others:
        who = "; ".join(f"{r.holder()} saving {', '.join(r.dirs)}" for r in others)
        warnings.warn(f"{location.display}: another job is writing to this checkpoint root "
                      f"({who}). Two jobs saving the same steps to one root fail each other's "
                      f"saves; give each job its own root", stacklevel=3)
