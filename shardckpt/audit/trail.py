"""The audit trail: one immutable JSON object per lifecycle event under ``ROOT/audit/``.

Each record is created exclusively (``If-None-Match: *`` on S3, an ``O_EXCL`` claim then an
atomic rename on local disks: :meth:`~shardckpt.storage.base.Location.write_exclusive`) under a
name no other writer can pick (time, then random bits), and never rewritten: two processes
recording at once (a training job and a prune from cron) each add their own object, and none
can lose the other's. Nothing in shardckpt deletes under ``audit/``: prune and repair work on
``step-NNNNNNNNNN`` directories only.

A record says who (user, host, job id from ``SLURM_JOB_ID``, ``TORCHELASTIC_RUN_ID``, ...),
when, what (the event, the step, a detail object), the outcome and the git revision of the
code (from the save's provenance). Strings go through :func:`~shardckpt.redact.scrub_text` and
secret-looking keys through :func:`~shardckpt.redact.redact_tree`: credentials never reach it.

Recording never fails the operation it describes: a record that cannot be written is a warning
and counts in :func:`write_failures`. Never imports torch.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import stat
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from ..redact import redact_tree, scrub_text
from ..storage import Location
from ..storage.marker import MARKER
from ..storage.records import job_id

AUDIT_DIR = "audit"
FORMAT = "shardckpt-audit"
MAX_RECORD_BYTES = 1 << 20
EVENTS = ("commit", "save_failed", "prune", "repair", "tag", "verify", "export", "import",
          "sign", "lock", "restore_local")

_failures = 0
_failures_lock = threading.Lock()


class AuditWarning(UserWarning):
    """An audit record could not be written (the operation itself went on)."""


def write_failures() -> int:
    """How many audit records this process could not write (each was warned about)."""
    return _failures


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers): the uid says who
        return f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, Mapping):
        return {str(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


def utc_iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, timezone.utc).isoformat(timespec="microseconds")


def make_record(event: str, step: int | None, outcome: str, detail: Mapping[str, Any] | None,
                git_revision: str | None = None, now: float | None = None) -> dict[str, Any]:
    """The record of one event (a JSON object; see the module docstring)."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r} (one of {', '.join(EVENTS)})")
    unix = time.time() if now is None else now
    return {"format": FORMAT, "version": 1, "time": utc_iso(unix), "unix_time": unix,
            "event": event, "step": step, "user": _user(), "host": socket.gethostname(),
            "job": job_id(), "pid": os.getpid(), "outcome": outcome,
            "git_revision": git_revision,
            "detail": _scrub(redact_tree(dict(detail or {}), "detail"))}


def record_name(rec: Mapping[str, Any]) -> str:
    """``audit/<UTC time, ns>-<random>-<event>.json``: sorts by time, unique per writer."""
    stamp = datetime.fromtimestamp(rec["unix_time"], timezone.utc).strftime("%Y%m%dT%H%M%S")
    frac = f"{rec['unix_time'] % 1:.6f}"[2:]
    return f"{AUDIT_DIR}/{stamp}.{frac}Z-{uuid.uuid4().hex[:12]}-{rec['event']}.json"


def append(location: Location, event: str, step: int | None = None, outcome: str = "ok",
           detail: Mapping[str, Any] | None = None, git_revision: str | None = None) -> str | None:
    """Add one record at ``location``; returns its path, or None (warned, counted) when it
    could not be written. Never raises."""
    global _failures
    try:
        rec = make_record(event, step, outcome, detail, git_revision)
        data = json.dumps(rec, sort_keys=True, allow_nan=False, default=str).encode() + b"\n"
        rel = record_name(rec)
        like = _local_audit_dir(location) if location.is_local else None
        location.write_exclusive(rel, data)
        if like is not None:  # moded and owned like the root's files, whoever writes it
            _like(os.path.join(location.root, rel), *like)  # type: ignore[attr-defined]
        return rel
    except Exception as exc:
        with _failures_lock:
            _failures += 1
        where = getattr(location, "display", "?")
        warnings.warn(f"shardckpt: could not write the audit record of {event} "
                      f"(step {step}) at {where}: {type(exc).__name__}: "
                      f"{scrub_text(str(exc))}", AuditWarning, stacklevel=2)
        return None


def _like(path: str, mode: int, uid: int, gid: int) -> None:
    try:
        os.chown(path, uid, gid)
    except OSError:
        pass  # not ours to give away
    os.chmod(path, mode)


def _local_audit_dir(location: Location) -> tuple[int, int, int] | None:
    """Make ``audit/`` of a local root with the root's mode and owner (a prune from cron may
    run as another user than training); returns the (mode, uid, gid) that a record takes: the
    root marker's, else None (the location's own file mode then)."""
    root = location.root  # type: ignore[attr-defined]
    if not os.path.isdir(root):  # a root with no save yet (a restore from the local tier)
        location.makedirs("")
    st = os.stat(root)
    path = os.path.join(root, AUDIT_DIR)
    try:
        os.mkdir(path, 0o700)  # no wider than the root's mode while it is being set
    except FileExistsError:
        pass
    else:
        _like(path, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    try:
        marker = os.stat(os.path.join(root, MARKER))
    except OSError:
        return None
    return stat.S_IMODE(marker.st_mode), marker.st_uid, marker.st_gid


def read_trail(location: Location, step: int | None = None
               ) -> tuple[list[dict[str, Any]], list[str]]:
    """Every record at ``location`` (of ``step`` only, if given), oldest first, and the names of
    objects under ``audit/`` that are not valid records (reported, never deleted)."""
    records: list[dict[str, Any]] = []
    bad: list[str] = []
    for name in location.listdir(AUDIT_DIR):
        if not name.endswith(".json"):
            continue
        rel = f"{AUDIT_DIR}/{name}"
        try:
            rec = json.loads(location.read_file(rel, MAX_RECORD_BYTES))
        except FileNotFoundError:
            continue
        except ValueError:
            bad.append(rel)
            continue
        if not isinstance(rec, dict) or rec.get("format") != FORMAT or \
                not isinstance(rec.get("unix_time"), (int, float)):
            bad.append(rel)
            continue
        if step is not None and rec.get("step") != step:
            continue
        rec["_name"] = name
        records.append(rec)
    records.sort(key=lambda r: (r["unix_time"], r["_name"]))
    for rec in records:
        rec.pop("_name")
    return records, bad


__all__ = ["AUDIT_DIR", "EVENTS", "AuditWarning", "append", "make_record", "read_trail",
           "write_failures"]
