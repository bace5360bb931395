"""Heal one location from another: find missing or corrupt files and copy good ones over.

A file is good at a location when its size, header and every chunk checksum match the manifest.
Copies are verified the same way after writing. A location's missing or corrupt manifest is
recreated (from a healthy location's bytes) only when every shard file there is good, so repair
never makes a damaged checkpoint look committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .catalog import MAX_MANIFEST_BYTES, read_manifest
from .engine.reader import CheckpointReader
from .errors import CorruptCheckpointError, IncompleteCheckpointError, StorageError
from .format import manifest as M
from .format.shard import checksum
from .storage import Location, step_dirname

COPY_BLOCK = 16 << 20
_PROBLEMS = (CorruptCheckpointError, IncompleteCheckpointError, StorageError, FileNotFoundError)


@dataclass
class StepRepair:
    step: int
    repaired: list[dict[str, str]] = field(default_factory=list)
    unrepairable: list[dict[str, str]] = field(default_factory=list)
    manifests_restored: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"step": self.step, "repaired": self.repaired, "unrepairable": self.unrepairable,
                "manifests_restored": self.manifests_restored, "ok": not self.unrepairable}


def verify_file(location: Location, step: int, manifest: M.Manifest, file: str) -> str | None:
    """None if ``file`` is intact at ``location`` (size, header as the manifest recorded it,
    every piece fitting its tensor, every chunk checksum), else what is wrong with it."""
    step_dir = step_dirname(step)
    reader = CheckpointReader([location], step_dir, manifest)
    where = f"{location.display}/{step_dir}/{file}"
    try:
        header = reader.check_file(file)
        rel = f"{step_dir}/{file}"
        for p in header.pieces:
            M.meta_of_piece(manifest, p, manifest.files[file].rank, where)
            for c in p.chunks:
                if checksum(location.read_range(rel, c.offset, c.stored)) != c.xxh3:
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


def repair_step(locations: Sequence[Location], step: int, dry_run: bool = False) -> StepRepair:
    """Make every location hold a good copy of ``step`` where some location has one."""
    report = StepRepair(step)
    source, manifest, manifest_bytes = None, None, b""
    states: list[str] = []
    for i, loc in enumerate(locations):
        try:
            m = read_manifest(loc, step)
            states.append("ok")
            if manifest is None:
                source, manifest = i, m
                manifest_bytes = loc.read_file(f"{step_dirname(step)}/{M.MANIFEST_NAME}",
                                               MAX_MANIFEST_BYTES)
        except _PROBLEMS as exc:
            states.append(str(exc))
    if manifest is None or source is None:
        report.unrepairable.append({"location": "*", "file": M.MANIFEST_NAME,
                                    "problem": "no location holds a valid manifest"})
        return report
    step_dir = step_dirname(step)
    files = sorted(manifest.files)
    status = {(i, f): verify_file(loc, step, manifest, f)
              for i, loc in enumerate(locations) for f in files}
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
            if not dry_run:
                loc.makedirs(step_dir)
                copy_file(locations[good[0]], loc, f"{step_dir}/{f}", manifest.files[f].nbytes)
                after = verify_file(loc, step, manifest, f)
                if after is not None:
                    report.unrepairable.append({**entry, "problem": f"copy failed: {after}"})
                    continue
                status[(i, f)] = None
            report.repaired.append(entry)
    for i, loc in enumerate(locations):
        if states[i] == "ok":
            continue
        whole = all(status[(i, f)] is None for f in files)
        entry = {"location": loc.display, "file": M.MANIFEST_NAME, "problem": states[i]}
        if not whole:
            report.unrepairable.append({**entry, "problem": states[i] + " (and shards are "
                                        "not all good there, so it is not recreated)"})
            continue
        if not dry_run:
            loc.fsync_dir(step_dir)
            loc.write_atomic(f"{step_dir}/{M.MANIFEST_NAME}", manifest_bytes)
            loc.fsync_dir("")
        report.manifests_restored.append(loc.display)
    return report


def repair(locations: Sequence[Location], step: int | None = None,
           dry_run: bool = False) -> list[StepRepair]:
    """Repair one step, or every step committed at some location."""
    if step is not None:
        return [repair_step(locations, step, dry_run)]
    steps = sorted({s for loc in locations for s in loc.list_step_dirs()})
    out = []
    for s in steps:
        r = repair_step(locations, s, dry_run)
        uncommitted = r.unrepairable and r.unrepairable[0]["location"] == "*"
        if not uncommitted:  # a step committed nowhere is a crashed save, not damage
            out.append(r)
    return out
