"""Retention applied at every location of a manager, each from its own listing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from .errors import PruneLockedError, ShardckptError
from .format import manifest as M
from .policy import RetentionPolicy
from .prune import PruneReport, prune_location
from .storage import Location
from .storage.probe import reachable_all
from .warnsite import warn_user


def _warn_kept_dirs(report: PruneReport) -> None:
    """A step directory kept steps reference has no valid manifest: say so (background
    retention reports nothing else; a warning repeats once per call site, see warnsite.py)."""
    for d, why in sorted(report.kept_dirs.items()):
        warn_user(f"retention: {report.location}/{d} kept: {why}", UserWarning)


def prune_locations(locations: Sequence[Location], policy: RetentionPolicy,
                    manifests: Mapping[int, M.Manifest], dry_run: bool, lock_wait: float,
                    unknown_metric: str = "warn") -> PruneReport:
    """The root's report, with the replicas' in ``replicas``. A dead replica fails in seconds
    and is skipped; once every other location has been pruned, one error is raised: the first
    that is not :class:`PruneLockedError` (another prune at work is no failure), else the first.
    Its ``failures`` attribute lists ``(location, error)`` for every location that failed."""
    reports: list[PruneReport] = []
    failures: list[tuple[str, ShardckptError]] = []
    for loc in reachable_all(locations):
        try:
            reports.append(prune_location(loc, policy, dry_run=dry_run, lock_wait=lock_wait,
                                          manifests=dict(manifests),
                                          unknown_metric=unknown_metric))
            _warn_kept_dirs(reports[-1])
        except ShardckptError as exc:
            failures.append((loc.display, exc))
    if failures:
        real = [e for _, e in failures if not isinstance(e, PruneLockedError)]
        first = (real or [failures[0][1]])[0]
        first.failures = failures  # type: ignore[attr-defined]
        raise first
    return replace(reports[0], replicas=tuple(reports[1:]))
