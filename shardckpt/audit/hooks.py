"""The one-line calls that the lifecycle's code makes to record its events (see :mod:`.trail`).

Each hook builds the record's detail from the operation's own result and never raises: an
audit record that cannot be written is a warning and a count, never a failed save, prune or
repair. Never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any

from ..redact import redact_url
from ..storage import Location
from ..storage.marker import MARKER
from .trail import append


def _safely(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # building the detail failed: still never fail the caller
            import warnings

            from .trail import AuditWarning

            warnings.warn(f"shardckpt: audit hook {fn.__name__} failed: {type(exc).__name__}: "
                          f"{exc}", AuditWarning, stacklevel=2)
            return None
    return run


def _revision(provenance: Mapping[str, Any] | None) -> str | None:
    code = (provenance or {}).get("code")
    rev = code.get("revision") if isinstance(code, Mapping) else None
    return rev if isinstance(rev, str) else None


class SaveAuditor:
    """A save callback (rank 0 only, as every callback): one ``commit`` or ``save_failed``
    record per save, at the root. ``provenance()`` gives the manager's provenance record (for
    the git revision), or None."""

    def __init__(self, location: Location, provenance: Callable[[], Any]) -> None:
        self.location, self.provenance = location, provenance

    def __call__(self, event: Any) -> None:
        try:
            rev = _revision(self.provenance())
        except Exception:
            rev = None
        if event.ok:
            detail = {"nbytes": event.nbytes, "locations": list(event.locations),
                      "degraded": event.degraded, "world_size": event.world_size,
                      "tags": list(event.tags), "metrics": dict(event.metrics),
                      "write_s": round(event.write_s, 6)}
            append(self.location, "commit", event.step, "ok", detail, rev)
        else:
            try:  # a failed save never creates a root, nor writes into a folder that is
                # not one yet (no root marker: nothing was ever committed there)
                if self.location.size(MARKER) is None:
                    return
            except Exception:
                return
            append(self.location, "save_failed", event.step, "failed",
                   {"error": event.error, "error_type": event.error_type,
                    "world_size": event.world_size}, rev)


def _policy_rules(policy: Any) -> dict[str, Any]:
    out = {}
    for f in fields(policy):
        value = getattr(policy, f.name)
        if value is not None and f.name != "keep_tags":
            out[f.name] = list(value) if isinstance(value, tuple) else value
    out["keep_tags"] = list(policy.keep_tags)
    return out


@_safely
def record_prune(location: Location, policy: Any, report: Any) -> None:
    """After a prune of ``location`` that changed something: what went, and the rule that
    decided (the policy's rules; a deleted step is one that no rule kept)."""
    if report.dry_run or not (report.deleted or report.reaped):
        return
    detail = {"deleted": sorted(report.deleted), "reaped": sorted(report.reaped),
              "policy": _policy_rules(policy),
              "rule": "deleted: kept by no rule of the policy",
              "kept": {str(s): list(r) for s, r in sorted(report.kept.items())}}
    append(location, "prune", None, "ok", detail)


@_safely
def record_repair(locations: Sequence[Location], report: Any) -> None:
    """After a repair that did something: the files, where to, and from where; at the root and
    at every location that received files."""
    if report.dry_run or not (report.repaired or report.manifests_restored or report.failed):
        return
    sources = {(a.location, a.file): a.source for a in report.plan}
    files = [{**e, "from": sources.get((e["location"], e["file"]))} for e in report.repaired]
    detail = {"files": files, "manifests_restored": list(report.manifests_restored),
              "failed": list(report.failed)}
    outcome = "ok" if report.ok else "failed"
    targets = {locations[0].display}
    targets |= {e["location"] for e in report.repaired}
    targets |= set(report.manifests_restored)
    for loc in locations:
        if loc.display in targets:
            append(loc, "repair", report.step, outcome, detail)


@_safely
def record_verify(location: Location, doc: Mapping[str, Any]) -> None:
    """A verify verdict (``shardckpt verify``'s document)."""
    checks = [{"name": c.get("name"), "ok": c.get("ok")} for c in doc.get("checks", ())]
    append(location, "verify", doc.get("step"), "ok" if doc.get("ok") else "failed",
           {"exit_code": doc.get("exit_code"), "checks": checks})


@_safely
def record_export(location: Location, result: Any) -> None:
    append(location, "export", result.step, "ok",
           {"format": result.format, "out": str(result.out), "tensors": result.tensors,
            "nbytes": result.nbytes})


@_safely
def record_import(location: Location, result: Any) -> None:
    append(location, "import", result.step, "ok",
           {"source": str(result.source), "tensors": result.tensors, "nbytes": result.nbytes})


@_safely
def record_restore(location: Location, step: int, profile: Mapping[str, Any]) -> None:
    """A load served by the local tier (rank 0 records it at the persistent root, with the
    bytes every rank received from peers)."""
    if profile.get("tier") in (None, "persistent"):
        return
    append(location, "restore_local", step, "ok",
           {"tier": profile.get("tier"), "bytes_received": profile.get("bytes_received")})


def location_url(location: Location) -> str:
    return redact_url(location.url)


__all__ = ["SaveAuditor", "record_export", "record_import", "record_prune", "record_repair",
           "record_restore", "record_verify"]
