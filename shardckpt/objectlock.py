"""S3 Object Lock for checkpoints: ``shardckpt lock`` and what ``prune`` must respect.

Object Lock protects object *versions*: a locked version cannot be deleted (by version id) or
overwritten until its retain-until date (``governance``: unless the caller has
``s3:BypassGovernanceRetention``; ``compliance``: by nobody, and the date cannot be shortened).
It needs a bucket created with Object Lock enabled (which turns versioning on).

- :func:`lock_step` sets retention on every version of every object of a step (and of every
  file it references), keeping a later date already there.
- :func:`retention_guard` gives the prune one :class:`RetentionGuard` per S3 location whose
  bucket is versioned (Object Lock or not): locked steps are kept ("locked until ...") and no
  request is made that would add a delete marker on them; unlocked steps are deleted by
  version id (the manifest's versions first), so that storage is actually freed. Elsewhere it
  returns None and the prune deletes as always. Never imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from .errors import ShardckptError, StorageError
from .format import manifest as M
from .storage import Location, step_dirname

MODES = ("governance", "compliance")
SUPPORTED = ("s3:// buckets created with Object Lock enabled (versioning on); local paths and "
             "other fsspec stores have no Object Lock")


class LockUnsupportedError(ShardckptError, ValueError):
    """The location cannot hold Object Lock retention (the CLI exits 64, naming what can)."""


def _s3(location: Location) -> tuple[Any, str, str]:
    """(filesystem, bucket, key prefix of the root ending in '/') of an S3 location."""
    is_s3 = getattr(location, "_is_s3", None)
    if not callable(is_s3) or not is_s3():
        raise LockUnsupportedError(f"{location.display}: Object Lock is not supported here; "
                                   f"supported: {SUPPORTED}")
    fs = location.fs  # type: ignore[attr-defined]
    bucket, prefix, _ = fs.split_path(location.root)  # type: ignore[attr-defined]
    return fs, bucket, (prefix.rstrip("/") + "/") if prefix else ""


def _call(location: Location, method: str, **kwargs: Any) -> Any:
    fs = location.fs  # type: ignore[attr-defined]
    try:
        return fs.call_s3(method, **kwargs)
    except Exception as exc:
        raise StorageError(f"{location.display}: {method} failed: {type(exc).__name__}: "
                           f"{location._scrub(str(exc))}") from exc  # type: ignore[attr-defined]


def lock_enabled(location: Location) -> bool:
    _, bucket, _ = _s3(location)
    try:
        doc = location.fs.call_s3("get_object_lock_configuration",  # type: ignore[attr-defined]
                                  Bucket=bucket)
    except Exception:  # ObjectLockConfigurationNotFoundError: never enabled
        return False
    return (doc.get("ObjectLockConfiguration") or {}).get("ObjectLockEnabled") == "Enabled"


def versioned(location: Location) -> bool:
    """Whether the bucket keeps versions; False when the store cannot say (no right to ask)."""
    _, bucket, _ = _s3(location)
    try:
        doc = location.fs.call_s3("get_bucket_versioning", Bucket=bucket)  # type: ignore
    except Exception:
        return False
    return doc.get("Status") in ("Enabled", "Suspended")


def object_versions(location: Location, reldir: str) -> list[tuple[str, str, bool, bool]]:
    """(key, version id, is latest, is a delete marker) of every version under ``reldir``."""
    _, bucket, prefix = _s3(location)
    out: list[tuple[str, str, bool, bool]] = []
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": f"{prefix}{reldir.rstrip('/')}/"}
    while True:
        page = _call(location, "list_object_versions", **kwargs)
        out += [(v["Key"], v["VersionId"], bool(v.get("IsLatest")), False)
                for v in page.get("Versions", [])]
        out += [(v["Key"], v["VersionId"], bool(v.get("IsLatest")), True)
                for v in page.get("DeleteMarkers", [])]
        if not page.get("IsTruncated"):
            return out
        kwargs["KeyMarker"] = page.get("NextKeyMarker")
        kwargs["VersionIdMarker"] = page.get("NextVersionIdMarker")


def _retention(location: Location, bucket: str, key: str, version: str
               ) -> tuple[str | None, datetime | None]:
    """A version's retention, from ``HeadObject`` (its ``x-amz-object-lock-*`` headers: the
    same answer as ``GetObjectRetention``, which some S3 implementations lack)."""
    try:
        doc = location.fs.call_s3("head_object", Bucket=bucket,  # type: ignore[attr-defined]
                                  Key=key, VersionId=version)
    except Exception:  # gone meanwhile: nothing retains it
        return None, None
    mode, until = doc.get("ObjectLockMode"), doc.get("ObjectLockRetainUntilDate")
    if isinstance(until, str):
        until = datetime.fromisoformat(until.replace("Z", "+00:00"))
    if isinstance(until, datetime) and until.tzinfo is None:
        until = until.replace(tzinfo=timezone.utc)
    return mode, until


def parse_until(text: str) -> datetime:
    """``--until``: an ISO 8601 date or time (UTC when no zone is given), in the future."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--until {text!r}: not an ISO 8601 date or time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    if when <= datetime.now(timezone.utc):
        raise ValueError(f"--until {text!r}: in the past")
    return when


def lock_step(location: Location, step: int, until: datetime, mode: str = "governance",
              referenced: Iterable[str] = ()) -> dict[str, Any]:
    """Retain every version of every object of ``step`` (and of the ``referenced`` step
    directories' files, paths relative to the root) until ``until``. A version already held
    longer keeps its date. ``LockUnsupportedError`` when the location has no Object Lock."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _, bucket, prefix = _s3(location)
    if not lock_enabled(location):
        raise LockUnsupportedError(f"{location.display}: bucket {bucket} does not have Object "
                                   f"Lock enabled; supported: {SUPPORTED}")
    d = step_dirname(step)
    targets = [v for v in object_versions(location, d) if not v[3]]
    for rel in referenced:
        key = f"{prefix}{rel}"
        targets += [v for v in object_versions(location, rel.rsplit("/", 1)[0])
                    if v[0] == key and not v[3]]
    locked, kept_later = 0, 0
    for key, version, _, _ in targets:
        _, current = _retention(location, bucket, key, version)
        if current is not None and current >= until:
            kept_later += 1
            continue
        _call(location, "put_object_retention", Bucket=bucket, Key=key, VersionId=version,
              Retention={"Mode": mode.upper(), "RetainUntilDate": until})
        locked += 1
    return {"step": step, "until": until.isoformat(), "mode": mode, "versions": len(targets),
            "locked": locked, "kept_later_date": kept_later}


class RetentionGuard:
    """The prune's view of a versioned S3 bucket (see the module docstring)."""

    def __init__(self, location: Location, lock: bool) -> None:
        self.location, self.lock = location, lock
        _, self.bucket, self.prefix = _s3(location)

    def locked_until(self, reldir: str) -> tuple[datetime, str] | None:
        """The latest retain-until date in the future among the versions under ``reldir``."""
        if not self.lock:
            return None
        now = datetime.now(timezone.utc)
        best: tuple[datetime, str] | None = None
        for key, version, _, marker in object_versions(self.location, reldir):
            if marker:
                continue
            mode, until = _retention(self.location, self.bucket, key, version)
            if until is not None and until > now and (best is None or until > best[0]):
                best = (until, str(mode or "").lower())
        return best

    def held(self, steps: Iterable[int]) -> dict[int, str]:
        """Step -> "locked until ..." for each of ``steps`` that Object Lock retains."""
        out = {}
        for step in steps:
            found = self.locked_until(step_dirname(step))
            if found is not None:
                out[step] = f"locked until {found[0].isoformat()} ({found[1]})"
        return out

    def remove_step(self, reldir: str) -> None:
        """Delete every version (and delete marker) under ``reldir`` by version id, the
        manifest's first: storage is freed, and no delete marker is written."""
        versions = object_versions(self.location, reldir)
        manifest = f"{self.prefix}{reldir}/{M.MANIFEST_NAME}"
        versions.sort(key=lambda v: v[0] != manifest)
        for key, version, _, _ in versions:
            _call(self.location, "delete_object", Bucket=self.bucket, Key=key,
                  VersionId=version)
        self.location.remove_tree(reldir)  # unfinished uploads, listing caches


def retention_guard(location: Location) -> RetentionGuard | None:
    """A guard for a versioned S3 location; None elsewhere (delete as usual)."""
    try:
        _s3(location)
    except LockUnsupportedError:
        return None
    lock = lock_enabled(location)
    if not lock and not versioned(location):
        return None
    return RetentionGuard(location, lock)


__all__ = ["MODES", "LockUnsupportedError", "RetentionGuard", "lock_step", "parse_until",
           "retention_guard"]
