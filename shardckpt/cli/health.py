"""What each location holds: committed steps, and whether each one is whole there."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import CorruptCheckpointError, IncompleteCheckpointError, StorageError
from ..format import manifest as M
from ..manager import read_manifest
from ..storage import Location, step_dirname


@dataclass
class StepHealth:
    manifest: M.Manifest
    health: list[str] = field(default_factory=list)  # per location: ok / missing / corrupt / ...


@dataclass
class Survey:
    steps: dict[int, StepHealth] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def file_health(loc: Location, step: int, m: M.Manifest) -> str:
    """``ok`` if every shard file is present with its recorded size (a cheap check: no reads)."""
    d = step_dirname(step)
    for name, rec in m.files.items():
        size = loc.size(f"{d}/{name}")
        if size is None:
            return "missing files"
        if size != rec.nbytes:
            return "wrong sizes"
    return "ok"


def survey(locations: list[Location], progress: bool = False) -> Survey:
    """Every step of every location, read and sized; ``progress``: a bar on stderr (TTY)."""
    from .progress import bar

    out = Survey()
    per_loc: list[dict[int, str | M.Manifest]] = []
    unreachable: set[int] = set()
    for index, loc in enumerate(locations):
        found: dict[int, str | M.Manifest] = {}
        try:
            steps = loc.list_step_dirs()
        except StorageError as exc:  # an unreachable replica: say so, show the others
            if index == 0 and len(locations) == 1:
                raise
            out.problems.append(f"{loc.display}: cannot be listed: {exc}")
            unreachable.add(index)
            steps = {}
        for step in bar(steps, desc=f"reading {loc.display}", total=len(steps),
                        enabled=progress, unit="step"):
            try:
                found[step] = read_manifest(loc, step)
            except IncompleteCheckpointError:
                found[step] = "uncommitted"
            except (CorruptCheckpointError, StorageError) as exc:
                found[step] = "corrupt manifest" if isinstance(exc, CorruptCheckpointError) \
                    else "unreadable"
                out.problems.append(str(exc))
        per_loc.append(found)
    for step in sorted({s for f in per_loc for s in f}):
        manifest = next((f[step] for f in per_loc if isinstance(f.get(step), M.Manifest)), None)
        if not isinstance(manifest, M.Manifest):
            continue
        entry = StepHealth(manifest)
        for index, (loc, found) in enumerate(zip(locations, per_loc)):
            got = found.get(step, "unreachable" if index in unreachable else "absent")
            entry.health.append(file_health(loc, step, got) if isinstance(got, M.Manifest)
                                else str(got))
        out.steps[step] = entry
    return out
