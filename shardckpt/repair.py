"""Heal one location from another: find missing or corrupt files and copy good ones over.

A file is good at a location when its size, header and every chunk checksum match the manifest.
A step is repaired in two stages: :func:`plan_step` looks at every location and decides what to
do (the plan: files to copy, manifests to restore, and what cannot be repaired), and
:func:`execute` carries the plan out. A dry run is the first stage alone, so it reports exactly
what the real run does. Copies are verified the same way after writing. A location's missing or
corrupt manifest is recreated (from a healthy location's bytes) only when every shard file there
is good or copied in by the same plan, and is written after those copies succeeded, so repair
never makes a damaged checkpoint look committed. A retired step (incremental saves) is
repaired as one (:mod:`.repair_refs`): only the files kept steps reference are expected, and
its retired record is written, before anything else, at each location that gets a file of it.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from .audit import record_repair
from .catalog import MAX_MANIFEST_BYTES, read_manifest
from .engine.reader import CheckpointReader
from .errors import CorruptCheckpointError, IncompleteCheckpointError, StorageError
from .format import manifest as M
from .format.shard import checksum
from .refcheck import RefTargets
from .repair_refs import Target, repair_targets, steps_to_repair
from .retired import retire, retired_name
from .storage import Location, step_dirname

COPY_BLOCK = 16 << 20
_PROBLEMS = (CorruptCheckpointError, IncompleteCheckpointError, StorageError, FileNotFoundError)
COPY, RESTORE, RETIRE = "copy", "restore_manifest", "write_retired_record"


@dataclass(frozen=True)
class Action:
    """One step of a repair plan: copy ``file`` (or restore ``manifest.json``) at ``location``
    from ``source``, because of ``problem``."""

    kind: str
    location: str
    file: str
    source: str
    problem: str

    def to_json(self) -> dict[str, str]:
        return {"action": self.kind, "location": self.location, "file": self.file,
                "source": self.source, "problem": self.problem}

    def describe(self, step: int) -> str:
        if self.kind == RETIRE:
            return (f"step {step}: write {self.location}/{self.file}, as at {self.source} "
                    f"({self.problem})")
        verb = "copy" if self.kind == COPY else "restore"
        return (f"step {step}: {verb} {self.location}/{step_dirname(step)}/{self.file} from "
                f"{self.source} ({self.problem})")


@dataclass
class StepRepair:
    """The plan for one step and, unless ``dry_run``, what executing it did.

    ``plan`` is the same for a dry run and a real run of the same damage. ``repaired`` and
    ``manifests_restored`` are the plan's copies and restores (dry run: those that would be
    done; real run: those done and verified); ``unrepairable`` what no location could supply,
    plus, in a real run, actions that failed. ``healthy_before``: nothing needed doing;
    ``ok``: every location holds a good copy after the repair (dry run: would). ``retired``:
    a retired step (only the files kept steps reference are expected; ``note`` says so);
    ``retired_records``: the locations where its retired record is (would be) written.
    """

    step: int
    dry_run: bool = False
    retired: bool = False
    note: str = ""
    retired_records: list[str] = field(default_factory=list)
    plan: list[Action] = field(default_factory=list)
    repaired: list[dict[str, str]] = field(default_factory=list)
    unrepairable: list[dict[str, str]] = field(default_factory=list)
    manifests_restored: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)

    @property
    def healthy_before(self) -> bool:
        return not self.plan and not self.unrepairable

    @property
    def ok(self) -> bool:
        return not self.unrepairable

    def to_json(self) -> dict[str, object]:
        return {"step": self.step, "dry_run": self.dry_run,
                "plan": [a.to_json() for a in self.plan], "repaired": self.repaired,
                "unrepairable": self.unrepairable, "manifests_restored": self.manifests_restored,
                "failed": self.failed, "healthy_before": self.healthy_before, "ok": self.ok,
                **({"retired": True, "note": self.note,
                    "retired_records": self.retired_records} if self.retired else {})}


def verify_file(location: Location, step: int, manifest: M.Manifest, file: str,
                only: Collection[int] | None = None) -> str | None:
    """None if ``file`` is intact at ``location`` (size, header as the manifest recorded it,
    every piece fitting its tensor, every chunk checksum; of the chunks at the offsets ``only``,
    if given: those other steps reference), else what is wrong with it."""
    step_dir = step_dirname(step)
    reader = CheckpointReader([location], step_dir, manifest)
    if only is not None:  # a file other steps reference: its own chunks, not its references
        reader.refs = RefTargets(manifest, enabled=False)
    else:  # the files it references are verified on their own, at every location
        reader.refs = RefTargets(manifest, locations=[location], presence=False)
    where = f"{location.display}/{step_dir}/{file}"
    try:
        header = reader.check_file(file)
        rel = f"{step_dir}/{file}"
        for p in header.pieces:
            M.meta_of_piece(manifest, p, manifest.files[file].rank, where)
            for c in p.chunks:
                if c.ref is None and (only is None or c.offset in only) and \
                        checksum(location.read_range(rel, c.offset, c.stored)) != c.xxh3:
                    return f"checksum mismatch in chunk at offset {c.offset}"
    except _PROBLEMS as exc:
        return str(exc)
    return None


def copy_file(src: Location, dst: Location, rel: str, nbytes: int) -> None:
    dst.remove(rel)
    sink = dst.open_sink(rel)
    try:
        for offset in range(0, nbytes, COPY_BLOCK):
            sink.write(src.read_range(rel, offset, min(COPY_BLOCK, nbytes - offset)))
        sink.commit()
    except BaseException:
        sink.abort()
        raise


@dataclass
class _Survey:
    manifest: M.Manifest
    manifest_bytes: bytes
    source: int
    only: Mapping[str, Collection[int]] | None = None  # files (and chunk offsets) to check


def plan_step(locations: Sequence[Location], step: int,
              only: Mapping[str, Collection[int]] | None = None, retired: bool = False,
              note: str = "") -> tuple[StepRepair, _Survey | None]:
    """Look at ``step`` everywhere and plan its repair (of the files ``only``, if given: those
    other steps reference; ``retired``: a retired step, see :mod:`.repair_refs`); changes
    nothing."""
    report = StepRepair(step, dry_run=True, retired=retired, note=note)
    survey: _Survey | None = None
    states: list[str | None] = []
    for loc in locations:
        try:
            m = read_manifest(loc, step)
            states.append(None)
            if survey is None:
                data = loc.read_file(f"{step_dirname(step)}/{M.MANIFEST_NAME}",
                                     MAX_MANIFEST_BYTES)
                survey = _Survey(m, data, len(states) - 1, only)
        except _PROBLEMS as exc:
            states.append(str(exc))
    if survey is None:
        report.unrepairable.append({"location": "*", "file": M.MANIFEST_NAME,
                                    "problem": "no location holds a valid manifest"})
        return report, None
    files = sorted(f for f in survey.manifest.files if only is None or f in only)
    status = {(i, f): verify_file(loc, step, survey.manifest, f, only and only[f])
              for i, loc in enumerate(locations) for f in files}
    fixed = dict(status)  # what each file's state will be once the plan has run
    for f in files:
        good = [i for i in range(len(locations)) if status[(i, f)] is None]
        for i, loc in enumerate(locations):
            problem = status[(i, f)]
            if problem is None:
                continue
            entry = {"location": loc.display, "file": f, "problem": problem}
            if not good:
                report.unrepairable.append(entry)
                continue
            report.plan.append(Action(COPY, loc.display, f, locations[good[0]].display, problem))
            report.repaired.append(entry)
            fixed[(i, f)] = None
    source = locations[survey.source].display
    for i, loc in enumerate(locations):
        problem = states[i]
        if problem is None:
            continue
        entry = {"location": loc.display, "file": M.MANIFEST_NAME, "problem": problem}
        if not all(fixed[(i, f)] is None for f in files):
            report.unrepairable.append({**entry, "problem": problem + " (and shards are not "
                                        "all good there, so it is not recreated)"})
            continue
        if retired and not files and problem.endswith("is not committed"):
            continue  # a retired step nothing references: not recreated where it is gone
        report.plan.append(Action(RESTORE, loc.display, M.MANIFEST_NAME, source, problem))
        report.manifests_restored.append(loc.display)
    if retired:
        _plan_records(locations, report)
    return report, survey


def _plan_records(locations: Sequence[Location], report: StepRepair) -> None:
    """A retired step: its record first, at each location that gets a file of it or holds its
    directory without the record (so that it is hidden there too, as it is at ``holder``)."""
    name, d = retired_name(report.step), step_dirname(report.step)
    touched = {a.location for a in report.plan}
    have: dict[str, tuple[bool, bool]] = {}
    for loc in locations:
        try:
            names = set(loc.listdir(""))
            have[loc.display] = (name in names, d in names)
        except (StorageError, OSError):
            continue  # unreachable: its copies (if any) fail and are reported
    holder = next((where for where, (rec, _) in have.items() if rec), "ROOT")
    first = [Action(RETIRE, loc.display, name, holder, "retired there, not here")
             for loc in locations if loc.display in have and not have[loc.display][0]
             and (have[loc.display][1] or loc.display in touched)]
    report.plan[:0] = first
    report.retired_records += [a.location for a in first]


def execute(locations: Sequence[Location], planned: StepRepair,
            survey: _Survey | None) -> StepRepair:
    """Carry out ``planned`` (from :func:`plan_step`), in its order; returns what was done.

    A copy is verified after writing; a copy that fails leaves its location's manifest alone
    (not recreated). Failures are recorded in ``failed`` and ``unrepairable``, never raised.
    """
    done = StepRepair(planned.step, dry_run=False, plan=list(planned.plan),
                      unrepairable=list(planned.unrepairable), retired=planned.retired,
                      note=planned.note)
    if survey is None:
        return done
    by_name = {loc.display: loc for loc in locations}
    step_dir = step_dirname(planned.step)
    broken: set[str] = set()  # locations where a copy failed
    for action in planned.plan:
        loc = by_name[action.location]
        entry = {"location": action.location, "file": action.file, "problem": action.problem}
        try:
            if action.kind == RETIRE:  # before any file of it there (see plan_step)
                retire(loc, planned.step, survey.manifest.save_id, time.time())
                done.retired_records.append(action.location)
            elif action.kind == COPY:
                size = survey.manifest.files[action.file].nbytes
                loc.makedirs(step_dir)
                copy_file(by_name[action.source], loc, f"{step_dir}/{action.file}", size)
                after = verify_file(loc, planned.step, survey.manifest, action.file,
                                    survey.only and survey.only[action.file])
                if after is not None:
                    raise CorruptCheckpointError(f"copy failed: {after}")
                done.repaired.append(entry)
            else:
                if action.location in broken:
                    raise IncompleteCheckpointError("not recreated: a copy of a shard there "
                                                    "failed")
                loc.fsync_dir(step_dir)
                loc.write_atomic(f"{step_dir}/{M.MANIFEST_NAME}", survey.manifest_bytes)
                loc.fsync_dir("")
                done.manifests_restored.append(action.location)
        except (*_PROBLEMS, OSError) as exc:
            broken.add(action.location)
            failure = {**entry, "problem": f"{action.problem}; repair failed: {exc}"}
            done.failed.append({**action.to_json(), "error": str(exc)})
            done.unrepairable.append(failure)
    return done


def repair_step(locations: Sequence[Location], step: int | Target, dry_run: bool = False,
                only: Mapping[str, Collection[int]] | None = None) -> StepRepair:
    """Make every location hold a good copy of ``step`` (of its files ``only``, if given; a
    :class:`~shardckpt.repair_refs.Target` says which files, and whether it is retired)
    where some location has one.

    ``dry_run`` returns the plan alone; otherwise the plan is executed. Both report the same
    ``plan``."""
    t = step if isinstance(step, Target) else Target(step, only)
    planned, survey = plan_step(locations, t.step, t.only, t.retired, t.note)
    if dry_run:
        return planned
    done = execute(locations, planned, survey)
    record_repair(locations, done)  # issue 32: the audit trail (never raises)
    return done


def repair(locations: Sequence[Location], step: int | None = None,
           dry_run: bool = False) -> list[StepRepair]:
    """Repair one step, or every step that has a directory at the first location (ROOT; see
    :func:`steps_to_repair`)."""
    targets, _ = repair_targets(locations, step)  # incremental: referenced and retired steps
    out = []
    for t in targets:
        r = repair_step(locations, t, dry_run)
        if step is not None or not committed_nowhere(r):  # else a crashed save, not damage
            out.append(r)
    if step is None and not dry_run and all(r.ok for r in out):
        restore_markers(locations)
    return out


def restore_markers(locations: Sequence[Location]) -> list[str]:
    """After a repair that left every step healthy: give each location the root marker that
    the other locations' newest manifests recorded for it (a refilled replica is accepted again
    by a restarted job), or a new one where none is recorded and there is none. Returns the
    locations whose marker was written."""
    from .engine.rootmarks import expected_markers
    from .storage.marker import read_marker, restore_marker, write_marker

    expected, out = expected_markers(locations, range(len(locations))), []
    for i, loc in enumerate(locations):
        try:  # an unreachable location keeps what it has: the next repair restores it
            rec, found = expected.get(i), read_marker(loc)
            if rec is not None and found != rec[0]:
                restore_marker(loc, rec[0])
                out.append(loc.display)
            elif rec is None and found is None:
                write_marker(loc)
                out.append(loc.display)
        except StorageError:
            continue
    return out


def committed_nowhere(report: StepRepair) -> bool:
    return bool(report.unrepairable) and report.unrepairable[0]["location"] == "*"


def summary(reports: Sequence[StepRepair], dry_run: bool,
            left: Mapping[int, Sequence[str]] | None = None, command: str = "") -> str:
    """One line on the state *after* the repair (for a dry run: after the planned repair).

    ``left``: the steps found only at other locations than ROOT (step -> those locations,
    :func:`steps_to_repair`), which this repair does not restore: the line says how many, names
    them and ``command`` (the repair command without ``--step``), which restores one with
    ``--step N``; so that "N of N healthy" never reads as "everything is there"."""
    n = len(reports)
    before = sum(1 for r in reports if r.healthy_before)
    fixed = sum(1 for r in reports if not r.healthy_before and r.ok)
    damaged = n - before - fixed
    if dry_run:
        line = (f"{n} checkpoint{'s' * (n != 1)} checked: {before} healthy everywhere, {fixed} "
                f"would be repaired, {damaged} cannot be; after this repair {before + fixed} of "
                f"{n} would be healthy everywhere (dry run: nothing was changed)")
    else:
        line = (f"{n} checkpoint{'s' * (n != 1)} checked: {before} already healthy everywhere, "
                f"{fixed} repaired, {damaged} still damaged; {before + fixed} of {n} now healthy "
                f"everywhere")
    return line + _not_restored(left or {}, dry_run, command)


def _not_restored(left: Mapping[int, Sequence[str]], dry_run: bool, command: str) -> str:
    if not left:
        return ""
    k = len(left)
    steps = [str(s) for s in sorted(left)]
    named = ", ".join(steps if k <= 12 else [*steps[:5], "...", *steps[-5:]])
    where = sorted({w for locs in left.values() for w in locs})
    how = f"{command} --step N" if command else "repair --step N"
    return (f"; NOT RESTORED: {k} step{'s' * (k != 1)} exist{'s' * (k == 1)} only at "
            f"{', '.join(where)}, not at ROOT ({named}), and "
            f"{'would not be' if dry_run else 'were not'} restored: `{how}` restores step N")


def restore_command(root: Location, replicas: Sequence[Location]) -> str:
    """The repair command (locations redacted, without ``--step``) that the summary names."""
    args = [root.display, *(a for r in replicas for a in ("--replica", r.display))]
    return " ".join(["shardckpt", "repair", *(shlex.quote(a) for a in args)])


__all__ = ["Action", "StepRepair", "Target", "execute", "plan_step", "repair", "repair_step",
           "repair_targets", "restore_command", "restore_markers", "steps_to_repair",
           "summary"]
