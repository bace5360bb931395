"""What a repair looks at in a root of incremental saves: the steps, and which ones are retired.

A retired step (:mod:`.retired`) is no checkpoint any more: it holds only the files (and, on a
local disk, the chunks) that kept steps reference. A repair treats it so, at every location:

- it expects only those files and chunks, never the ones the prune deleted (they are no damage);
- where it copies a file of it, restores its manifest, or finds its directory without the
  record, it writes the retired record first, so that a refilled replica is the same root as
  the one it was refilled from: the step hidden there too, and each of its kept steps holding
  every file it references;
- it does not recreate a retired step that nothing references at a location lacking it (the
  next prune deletes it).

A step is retired when a location holds its directory and its record, unless ROOT holds it
committed (a valid manifest, no record): a replica's own retention is no damage to ROOT. The
*kept* steps are the others that hold a valid manifest somewhere. Never imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .catalog import MAX_MANIFEST_BYTES, survey
from .errors import ShardckptError
from .format import manifest as M
from .format.refs import references
from .holes import referenced_ranges
from .refcheck import with_references
from .storage import Location, step_dirname

Only = Mapping[str, set[int]]


@dataclass(frozen=True)
class Target:
    """One step to repair: ``only`` the files (and chunk offsets) to check, or None for all of
    them; ``retired``: a retired step (see the module), with ``note`` saying so."""

    step: int
    only: Only | None = None
    retired: bool = False
    note: str = ""


@dataclass
class _Root:
    kept: dict[int, M.Manifest]
    retired: set[int]


def _look(locations: Sequence[Location]) -> _Root:
    """ROOT (the first location) decides which steps are retired: a step a replica's own
    retention retired while ROOT still holds it committed is a checkpoint of ROOT, repaired
    as one and never hidden there (a replica's pruning is no damage to ROOT)."""
    found = survey(locations, probe=False)
    retired = set(found.retired)
    for s in [s for s, where in found.retired.items() if 0 not in where]:
        try:  # retired at replicas only: still a checkpoint of ROOT if committed there
            m = M.parse(locations[0].read_file(f"{step_dirname(s)}/{M.MANIFEST_NAME}",
                                               MAX_MANIFEST_BYTES),
                        f"{locations[0].display}/{step_dirname(s)}/{M.MANIFEST_NAME}")
        except (ShardckptError, OSError):
            continue  # ROOT lacks it (or its manifest): brought back retired, as before
        if m.step == s:
            retired.discard(s)
    kept = {s: e.manifest for s, e in found.steps.items()
            if e.manifest is not None and s not in retired}
    return _Root(kept, retired)


def referenced_by_kept(locations: Sequence[Location], kept: Mapping[int, M.Manifest],
                       step: int) -> tuple[dict[str, set[int]], list[int]]:
    """The files of ``step`` the ``kept`` steps reference, each with the offsets of the chunks
    they reference (read from each one's headers at the first location where those read;
    where none does, the files its manifest lists, with no chunk to check), and those steps."""
    users = {s: m for s, m in kept.items()
             if any(r.step == step for r in references(m.extra, s))}
    out: dict[str, set[int]] = {}
    for s, m in sorted(users.items()):
        for r in references(m.extra, s):
            if r.step == step:
                out.setdefault(r.file, set())
        for loc in locations:
            try:
                for f, rs in referenced_ranges(loc, {s: m}, step).items():
                    out.setdefault(f, set()).update(a for a, _ in rs)
                break
            except (ShardckptError, OSError):
                continue
    return out, sorted(users)


def _retired_target(locations: Sequence[Location], root: _Root, step: int) -> Target:
    only, users = referenced_by_kept(locations, root.kept, step)
    if users:
        note = (f"step {step} is retired (pruned, kept only for the files later steps "
                f"reference): checking the {len(only)} file{'s' * (len(only) != 1)} that "
                f"step{'s' * (len(users) != 1)} {', '.join(map(str, users))} "
                f"reference{'s' * (len(users) == 1)}; the "
                f"files the prune deleted are not missing")
    else:
        note = (f"step {step} is retired and no kept step references it any more: nothing to "
                f"check (the next prune deletes it)")
    return Target(step, only, True, note)


def steps_to_repair(locations: Sequence[Location]) -> tuple[list[int], dict[int, list[str]]]:
    """The steps a repair without ``--step`` looks at, and those it leaves alone.

    It looks at every step that has a directory at the first location (ROOT): the checkpoints
    committed there, damaged or not. A step found only at the other locations is one that
    ROOT's retention (or a prune) deleted while a replica kept it, or that never reached ROOT:
    a repair does not bring it back, and it is returned in the second item (step -> the
    locations holding it) for the report. ``repair --step N`` restores such a step on
    request. (:func:`repair_targets` adds the retired steps and the steps ROOT's checkpoints
    reference.)"""
    at_root = set(locations[0].list_step_dirs())
    elsewhere: dict[int, list[str]] = {}
    for loc in locations[1:]:
        for s in loc.list_step_dirs():
            if s not in at_root:
                elsewhere.setdefault(s, []).append(loc.display)
    return sorted(at_root), dict(sorted(elsewhere.items()))


def repair_targets(locations: Sequence[Location], step: int | None = None
                   ) -> tuple[list[Target], dict[int, list[str]]]:
    """The steps a repair looks at (of ``step`` alone: it, then the earlier steps it
    references), and, without ``step``, the steps it leaves alone (see
    :func:`shardckpt.repair.steps_to_repair`)."""
    root = _look(locations)
    if step is not None:
        if step in root.retired:
            return [_retired_target(locations, root, step)], {}
        return [Target(s, only, s in root.retired)  # the chunks ``step`` references there
                for s, only in with_references(locations, step)], {}
    at_root, left = steps_to_repair(locations)
    steps = set(at_root) | root.retired
    for s in at_root:  # the steps that ROOT's checkpoints reference, wherever they are
        if s in root.kept:
            steps |= {r.step for r in references(root.kept[s].extra, s)}
    left = {s: w for s, w in left.items() if s not in steps}
    return [_retired_target(locations, root, s) if s in root.retired else Target(s)
            for s in sorted(steps)], left


__all__ = ["Target", "referenced_by_kept", "repair_targets", "steps_to_repair"]
