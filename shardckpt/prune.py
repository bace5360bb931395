"""Pruning one location: apply a :class:`RetentionPolicy` and reap abandoned step directories.

The steps of :func:`prune_location`, each safe to interrupt at any point (SIGKILL included):

1. take the location's prune lock (:class:`~shardckpt.storage.lease.PruneLock`), so that two
   prunes of one location never run at once (a dry run takes no lock and changes nothing);
2. list the step directories *of this location* and read their manifests: committed steps,
   uncommitted directories (no manifest), and corrupt manifests (reported, never deleted);
3. plan with the pure planner; steps with a live writer lease count as in progress;
4. write one reaper lease on every directory about to go (the handshake with writers, see
   :mod:`shardckpt.storage.lease`); leave alone any that a writer took meanwhile;
5. delete each step the plan drops: ``manifest.json`` first, made durable, and only then the
   data. A crash after the manifest is gone leaves an uncommitted directory, never a listed
   checkpoint with missing files; a later prune reaps what is left;
6. reap uncommitted directories that no live writer holds and that nothing has touched for
   ``grace`` seconds (default one hour): an interrupted save's leftovers, also a step that
   holds no visible object but an unfinished S3 multipart upload (its upload is aborted,
   see :mod:`.orphans`); and directories that
   a save moved aside because their manifest was corrupt (``step-N.corrupt-<utc>``), once
   ``grace`` has passed since they were moved. A directory whose files kept steps reference
   is never reaped, whatever the state of its own manifest (missing or damaged: ``repair``
   from a replica restores it); nor is anything below a step whose manifest cannot be read
   and may reference it (``kept_dirs``, :meth:`.prune_refs.Referenced.hold`);
7. remove lease files whose holders are long gone, and release the lock.

The newest committed checkpoint and any step being written are never deleted.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from . import catalog
from .audit import record_prune
from .controldir import make_control_dirs
from .errors import StorageError
from .format import manifest as M
from .objectlock import retention_guard
from .orphans import pending_uploads, reap_temps, stale_temps
from .policy import (
    CheckpointRecord,
    RetentionPlan,
    RetentionPolicy,
    missing_metric,
    plan_retention,
)
from .prune_background import BackgroundPrune
from .prune_hold import hold_dirs, hold_steps, unheld
from .prune_lostlock import drop_lost_locks, release_lock
from .prune_refs import referenced_files, retire_step, sweep_plan, sweep_retired
from .steptags import effective_tags
from .storage import Location, step_dirname
from .storage.lease import (
    CONTROL_DIR,
    LEASE_DIR,
    WRITER,
    PruneLock,
    Record,
    claim_for_deletion,
    modified_time,
    read_leases,
    read_record,
)
from .warnsite import warn_user

DEFAULT_GRACE_S = 3600.0
DEFAULT_LOCK_WAIT_S = 60.0


class UnknownMetricError(ValueError):
    """``keep_best`` ranks by a metric that no checkpoint of the location has (a typo, say)."""


_warned_metric: set[RetentionPolicy] = set()  # policies already warned about (once each)
_warned_lock = threading.Lock()


def _check_metric(location: Location, policy: RetentionPolicy, records: list[CheckpointRecord],
                  unknown_metric: str) -> bool:
    """True when no checkpoint has ``policy.metric`` (then nothing may be deleted)."""
    problem = missing_metric(policy, records)
    if problem is None:
        return False
    text = f"{location.display}: {problem}; deleting nothing until one has it"
    if unknown_metric == "raise":
        raise UnknownMetricError(text)
    with _warned_lock:
        if policy in _warned_metric:
            return True
        _warned_metric.add(policy)
    warn_user(f"retention: {text}", UserWarning)  # the user's call, or the last save()
    return True


@dataclass(frozen=True)
class PruneReport:
    """What one prune of one location did (for a dry run: would do).

    ``kept`` maps each kept committed step to its reasons; ``deleted`` lists the committed steps
    removed; ``reaped`` the uncommitted step directories removed; ``skipped`` the uncommitted
    ones left alone, with why; ``corrupt`` the steps whose manifest could not be read (step ->
    error), which a prune never deletes; ``kept_dirs`` the step directories without a valid
    manifest (uncommitted or corrupt) kept because kept steps reference them, or may (directory
    -> why), which an operator should repair. ``replicas`` holds the reports of the other locations
    of a manager, each pruned from its own listing.
    """

    location: str
    dry_run: bool
    kept: Mapping[int, tuple[str, ...]]
    deleted: tuple[int, ...]
    reaped: tuple[str, ...] = ()
    skipped: Mapping[str, str] = field(default_factory=dict)
    corrupt: Mapping[int, str] = field(default_factory=dict)
    replicas: tuple[PruneReport, ...] = ()
    retired: tuple[int, ...] = ()  # of ``deleted``: kept steps reference them (prune_refs.py)
    kept_dirs: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The contract's ``prune`` document, plus ``reaped``, ``skipped`` and ``corrupt``."""
        return {
            "dry_run": self.dry_run,
            "kept": [{"step": s, "reasons": list(self.kept[s])} for s in sorted(self.kept)],
            "deleted": sorted(self.deleted),
            "reaped": sorted(self.reaped),
            "skipped": [{"dir": d, "reason": self.skipped[d]} for d in sorted(self.skipped)],
            "corrupt": [{"step": s, "error": self.corrupt[s]} for s in sorted(self.corrupt)],
            **({"replicas": [r.to_json() for r in self.replicas]} if self.replicas else {}),
            **({"retired": sorted(self.retired)} if self.retired else {}),
            **({"kept_dirs": [{"dir": d, "reason": self.kept_dirs[d]}
                              for d in sorted(self.kept_dirs)]} if self.kept_dirs else {}),
        }


def _format_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _last_activity(location: Location, step_dir: str, leases: list[Record]) -> float | None:
    """The newest time stamp seen on ``step_dir``: the directory, its entries, the last renewal
    of its (expired) writer leases."""
    stamps = [modified_time(location, step_dir)]
    stamps += [modified_time(location, f"{step_dir}/{name}")
               for name in location.listdir(step_dir)]
    stamps += [r.renewed for r in leases]
    known = [s for s in stamps if s is not None]
    return max(known) if known else None


def _survey(location: Location, cache: Mapping[int, M.Manifest]
            ) -> tuple[dict[int, M.Manifest], list[int], dict[int, str], list[str]]:
    """Committed steps, uncommitted directories, corrupt manifests and aside directories."""
    found = catalog.survey([location], cache=cache, probe=False)
    if found.unreachable:
        raise StorageError(found.unreachable[0])
    committed: dict[int, M.Manifest] = {}
    uncommitted: list[int] = []
    corrupt: dict[int, str] = {}
    for step, entry in found.steps.items():
        state = entry.state[0]
        if entry.manifest is not None:
            committed[step] = entry.manifest
        elif state == "uncommitted":
            uncommitted.append(step)
        elif state == "corrupt":
            corrupt[step] = entry.errors[0]
        else:  # the manifest could not be read: never judge a step on a failed read
            raise StorageError(entry.errors.get(0, f"step {step}: {state}"))
    return committed, uncommitted, corrupt, sorted(name for _, name in found.aside)


def _records(location: Location, committed: Mapping[int, M.Manifest]
             ) -> tuple[list[CheckpointRecord], dict[int, str]]:
    """Retention's view of the committed steps, with their tags now (``shardckpt tag``, issue
    32); a step whose ``tags.json`` cannot be read (step -> why) is never deleted: a lost
    ``pinned`` must not let it go."""
    records, bad = [], {}
    for s, m in committed.items():
        try:
            tags = effective_tags(location, m)
        except StorageError as exc:
            bad[s], tags = f"tags.json is unreadable: {exc}", tuple(m.tags)
        records.append(CheckpointRecord(s, m.unix_time, dict(m.metrics), tags))
    return records, bad


def _aside_time(name: str) -> float:
    stamp = catalog.ASIDE_DIR.fullmatch(name)
    assert stamp is not None
    moved = datetime.strptime(stamp.group(2), "%Y%m%dT%H%M%SZ")
    return moved.replace(tzinfo=timezone.utc).timestamp()


def prune_location(location: Location, policy: RetentionPolicy, *, dry_run: bool = False,
                   grace: float = DEFAULT_GRACE_S, lock_wait: float = 0.0,
                   manifests: Mapping[int, M.Manifest] | None = None,
                   unknown_metric: str = "warn") -> PruneReport:
    """Apply ``policy`` to ``location`` from its own listing, and reap stale uncommitted steps.

    Any one process may call this, at any time, also while training saves to the location.
    Raises :class:`PruneLockedError` if another prune still holds the lock after ``lock_wait``
    seconds, :class:`~shardckpt.storage.lease.LeaseError` if the lock was lost part-way
    (nothing unsafe was done), and ``StorageError`` if the store fails. ``manifests`` may hold
    already-validated manifests by step, to save reading them again.

    When ``policy.keep_best`` ranks by a metric that none of the location's checkpoints has
    (a misspelt name, or no evaluation yet), no checkpoint is deleted: ``unknown_metric="warn"``
    warns (once per policy) and still reaps leftovers; ``"raise"`` raises
    :class:`UnknownMetricError` (a ``ValueError`` naming the metrics that exist) before anything
    is changed. Once one checkpoint has the metric, the rules apply as documented.

    A root that does not exist is left alone (an empty report, nothing created); the control
    folder ``.shardckpt/`` of a local root is created with the root's owner and mode.
    """
    if not grace >= 0:
        raise ValueError(f"grace must be >= 0 seconds, got {grace!r}")
    if unknown_metric not in ("warn", "raise"):
        raise ValueError(f"unknown_metric must be 'warn' or 'raise', got {unknown_metric!r}")
    if not dry_run and not location.root_exists():  # before the first save: nothing to create
        return PruneReport(location.display, False, {}, ())
    if not dry_run:
        make_control_dirs(location)
    if not dry_run:
        drop_lost_locks(location)
    lock = None if dry_run else PruneLock.acquire(location, wait=lock_wait)
    try:
        report = _prune(location, policy, dry_run, grace, lock, manifests or {}, unknown_metric)
    except BaseException:
        if lock is not None:
            with contextlib.suppress(Exception):  # the first error is the one to report
                release_lock(location, lock)
        raise
    if lock is not None:
        release_lock(location, lock)
    record_prune(location, policy, report)  # issue 32: the audit trail (never raises)
    return report


def _prune(location: Location, policy: RetentionPolicy, dry_run: bool, grace: float,
           lock: PruneLock | None, cache: Mapping[int, M.Manifest],
           unknown_metric: str = "warn") -> PruneReport:
    committed, uncommitted, corrupt, aside = _survey(location, cache)
    uploads = pending_uploads(location)  # S3: unfinished multipart uploads, by step directory
    # Leases are read after the listing: a writer writes its lease before its directory, so
    # every directory listed above that a live writer holds has its lease visible here.
    leases = read_leases(location)
    now = time.time()
    by_dir: dict[str, list[Record]] = {}
    for record in leases.values():
        for d in record.dirs if record is not None else ():
            by_dir.setdefault(d, []).append(record)
    writing = {d for d, recs in by_dir.items()
               if any(r.kind == WRITER and r.live(now) for r in recs)}

    records, bad_tags = _records(location, committed)
    corrupt = {**corrupt, **bad_tags}  # reported (exit 2) and kept, whatever the policy says
    plan = plan_retention(policy, records, now,
                          in_progress=[s for s in committed if step_dirname(s) in writing])
    if _check_metric(location, policy, records, unknown_metric):  # a misspelt metric, say
        why = f"no checkpoint has metric {policy.metric!r}"
        plan = RetentionPlan({s: plan.kept.get(s, (why,)) for s in sorted(committed)}, ())
    skipped: dict[str, str] = {}
    stale: list[str] = []
    known = {step_dirname(s) for s in (*committed, *uncommitted, *corrupt)}
    hidden = [d for d in sorted(uploads) if d not in known]  # a killed save's only trace
    for d in [*map(step_dirname, uncommitted), *hidden]:
        stamps = [_last_activity(location, d, [r for r in by_dir.get(d, []) if r.kind == WRITER]),
                  uploads.get(d)]
        last = max((t for t in stamps if t is not None), default=None)
        if d in writing:
            skipped[d] = "being written (live writer lease)"
        elif last is not None and now - last < grace:
            skipped[d] = (f"uncommitted, last written {_format_age(max(now - last, 0))} ago "
                          f"(grace {_format_age(grace)})")
        else:
            stale.append(d)
    old_aside = []
    for d in aside:  # corrupt step directories moved aside by a save: kept for a grace period
        age = now - _aside_time(d)
        if age < grace:
            skipped[d] = (f"moved aside as corrupt {_format_age(max(age, 0))} ago "
                          f"(grace {_format_age(grace)})")
        else:
            old_aside.append(d)
    guard = retention_guard(location)  # S3 Object Lock: locked steps stay (issue 32)
    held = guard.held(plan.deleted) if guard is not None else {}
    held.update({s: f"kept: its {why}" for s, why in bad_tags.items() if s in plan.deleted})
    kept = {**plan.kept, **{s: (why,) for s, why in held.items()}}
    dropped = tuple(s for s in plan.deleted if s not in held)  # no delete marker on those
    if dry_run:  # what the real run would do, retired steps included (nothing is claimed)
        referenced = referenced_files(location, {**cache, **committed}, dropped)
        held = hold_dirs(referenced, [*skipped, *stale, *old_aside], corrupt)
        kept.update(hold_steps(referenced, dropped))
        dropped = tuple(s for s in dropped if s not in kept)
        return PruneReport(location.display, True, kept, dropped,
                           (*[d for d in (*stale, *old_aside) if d not in held],
                            *sweep_plan(location, referenced), *stale_temps(location, now, grace)),
                           unheld(skipped, held), corrupt,
                           retired=tuple(s for s in dropped if s in referenced), kept_dirs=held)

    assert lock is not None
    claim, blocked = claim_for_deletion(location, [*map(step_dirname, dropped), *stale])
    deleted: list[int] = []
    reaped: list[str] = []
    retired: list[int] = []
    try:  # incremental saves: what the steps that stay reference (a fresh listing)
        referenced = referenced_files(location, {**cache, **committed}, [
            s for s in dropped if step_dirname(s) not in blocked])
        held = hold_dirs(referenced, [*skipped, *stale, *old_aside], corrupt)
        kept.update(hold_steps(referenced, dropped))
        # newest first: a step references only earlier ones, so a prune killed part-way
        # leaves every step still listed with all the bytes it references
        for step in sorted(dropped, reverse=True):
            d = step_dirname(step)
            if d in blocked:  # a writer started on it after the listing
                kept[step] = ("in progress",)
                continue
            if step in kept:  # a corrupt later manifest may reference it: nothing goes
                continue
            lock.check()
            if step in referenced:  # kept steps reference its files: retired, not deleted
                retire_step(location, committed[step], referenced, lock.check)
                retired.append(step)
                deleted.append(step)
                continue
            if guard is not None:  # a versioned bucket: every version, by id, manifest first
                guard.remove_step(d)
            else:
                location.remove(f"{d}/{M.MANIFEST_NAME}")
                location.fsync_dir(d)  # un-committed for good before any data goes
                location.remove_tree(d)
            deleted.append(step)
        for d in stale:
            if d in held:  # kept steps reference it (or may): never reaped
                continue
            if d in blocked:
                skipped[d] = "being written (live writer lease)"
                continue
            lock.check()
            if location.size(f"{d}/{M.MANIFEST_NAME}") is not None:
                skipped[d] = "committed while the prune ran"
                continue
            location.remove_tree(d)
            reaped.append(d)
        for d in old_aside:  # no writer ever writes into an aside directory
            if d in held:  # kept steps reference its step: its files may be theirs
                continue
            lock.check()
            location.remove_tree(d)
            reaped.append(d)
        reaped += sweep_retired(location, referenced, lock.check)
        reaped += reap_temps(location, now, grace, lock.check)  # killed retirements' temps
    finally:
        if claim is not None:
            claim.release()
    if deleted or reaped:
        location.fsync_dir("")
    _remove_dead_leases(location, leases, now, keep_dirs={*skipped, *held})
    return PruneReport(location.display, False, kept, tuple(sorted(deleted)), tuple(reaped),
                       unheld(skipped, held), corrupt, retired=tuple(sorted(retired)),
                       kept_dirs=held)


def _remove_dead_leases(location: Location, leases: Mapping[str, Record | None], now: float,
                        keep_dirs: set[str]) -> None:
    """Drop lease files no one holds any more (except those still dating a leftover directory)
    and temp files of records left by killed writers."""
    for name, record in leases.items():
        path = f"{LEASE_DIR}/{name}"
        if record is None:
            stamp = modified_time(location, path)
            dead = stamp is not None and now - stamp > DEFAULT_GRACE_S
        else:
            dead = not record.live(now) and (record.kind != WRITER
                                             or not keep_dirs & set(record.dirs))
            if dead:  # read again: a late renewal may have revived it since the listing
                current = read_record(location, path)
                dead = current is None or not current.live(time.time())
        if dead:
            location.remove(path)
    for folder in (CONTROL_DIR, LEASE_DIR):  # temp files of records whose writer was killed
        for name in location.listdir(folder):
            path = f"{folder}/{name}"
            if ".tmp-" in name and now - (modified_time(location, path) or now) > DEFAULT_GRACE_S:
                location.remove(path)


__all__ = ["DEFAULT_GRACE_S", "BackgroundPrune", "PruneReport", "UnknownMetricError",
           "prune_location"]
