"""What the manifests say about each location's root marker (see :mod:`shardckpt.storage.marker`).

Every commit records, in ``extra["markers"]``, ``{location display URL: {"id": marker id,
"step": the last step committed there}}`` for each location the job expects a marker at: those
it commits to (this step), and those that failed but held checkpoints before (carried forward,
so a replica that failed stays known until it is repaired). A restarted job reads the newest
committed manifest of every other location (:func:`expected_markers`) before its first save:
a location recorded there must still hold that marker, or it is a failed location, never
adopted. Manifests written by an older version have no ``markers``: nothing is recorded, every
location is adopted as before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..catalog import read_manifest
from ..errors import ShardckptError
from ..format import manifest as M
from ..storage import Location
from ..storage.marker import same_location


def markers_of(manifest: M.Manifest) -> dict[str, tuple[str, int]]:
    """``extra["markers"]`` of ``manifest``: display URL -> (marker id, last step there)."""
    raw = manifest.extra.get("markers")
    out: dict[str, tuple[str, int]] = {}
    if not isinstance(raw, Mapping):
        return out
    for url, rec in raw.items():
        if isinstance(rec, str):
            out[str(url)] = (rec, manifest.step)
        elif isinstance(rec, Mapping) and isinstance(rec.get("id"), str):
            step = rec.get("step")
            out[str(url)] = (rec["id"], step if isinstance(step, int) else manifest.step)
    return out


def newest_manifest(location: Location) -> M.Manifest | None:
    """The newest committed manifest at ``location`` (None if there is none)."""
    try:
        steps = sorted(location.list_step_dirs(), reverse=True)
    except (ShardckptError, OSError):
        return None
    for step in steps:
        try:
            return read_manifest(location, step)
        except ShardckptError:
            continue
    return None


def expected_markers(locations: Sequence[Location], reachable: Sequence[int]
                     ) -> dict[int, tuple[str, int]]:
    """Location index -> the (marker id, last step) that the *other* locations recorded for
    it: of the newest committed manifest at each reachable one, the newest recording it. A
    location's own manifests never vouch for it (a folder replaced by another root's would)."""
    newest = {j: m for j in reachable if (m := newest_manifest(locations[j])) is not None}
    out: dict[int, tuple[str, int]] = {}
    for i, loc in enumerate(locations):
        best = -1
        for j, manifest in newest.items():
            rec = recorded_for(loc, markers_of(manifest)) if j != i else None
            if rec is not None and manifest.step > best:
                best, out[i] = manifest.step, rec
    return out


def recorded_for(location: Location, recorded: Mapping[str, tuple[str, int]]
                 ) -> tuple[str, int] | None:
    """The (id, step) recorded for ``location``, if any."""
    return next((rec for url, rec in recorded.items() if same_location(location, url)), None)


def markers_extra(locations: Sequence[Location], good: Sequence[int], step: int
                  ) -> dict[str, dict[str, Any]]:
    """``extra["markers"]`` for a commit of ``step`` to ``good`` (see the module)."""
    out: dict[str, dict[str, Any]] = {}
    for i, loc in enumerate(locations):
        if loc.marker_id is None:
            continue
        if i in good:
            out[loc.display] = {"id": loc.marker_id, "step": step}
        elif loc.marker_step is not None:  # failed now, held checkpoints before: kept known
            out[loc.display] = {"id": loc.marker_id, "step": loc.marker_step}
    return out


def note_committed(locations: Sequence[Location], committed: Sequence[int], step: int) -> None:
    for i in committed:
        locations[i].marker_step = step
