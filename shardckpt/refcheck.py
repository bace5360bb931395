"""Checking a checkpoint's references to earlier steps before any byte of their files is read.

A manifest's ``references`` section (:mod:`shardckpt.format.refs`) names (step, file) pairs of
the same root. At each location, before reading a referenced chunk, a reader checks every such
pair against what the location holds: the step's directory exists, holds a valid manifest (the
step may be retired: its manifest is kept), and that manifest lists the file with the record
the referencing manifest copied. Only the target's *manifest* is read for this. A reference
chunk must then name a listed pair and lie inside that file's data region. Any failure is
``CorruptCheckpointError`` naming the referencing step, the target and why. Never imports torch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from .catalog import find_manifest, read_manifest, survey
from .errors import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    ShardckptError,
    StorageError,
)
from .format import manifest as M
from .format.refs import Reference, check_pieces, references
from .format.shard import Piece
from .holes import referenced_ranges
from .storage import Location, step_dirname

Targets = Mapping[tuple[int, str], Reference]


def resolve_targets(location: Location, manifest: M.Manifest) -> dict[tuple[int, str], Reference]:
    """Every reference of ``manifest`` checked at ``location`` (see the module)."""
    here = f"{location.display}/{step_dirname(manifest.step)}/{M.MANIFEST_NAME}"
    refs = references(manifest.extra, manifest.step, here)
    if not refs:
        return {}
    present = location.list_step_dirs()
    targets: dict[int, M.Manifest] = {}
    out: dict[tuple[int, str], Reference] = {}
    for r in refs:
        what = f"{here}: reference to step {r.step} file {r.file!r}"
        if r.step not in present:
            raise CorruptCheckpointError(f"{what}: step {r.step} is missing")
        if r.step not in targets:
            try:
                targets[r.step] = read_manifest(location, r.step)
            except IncompleteCheckpointError:
                raise CorruptCheckpointError(f"{what}: step {r.step} is not committed (no "
                                             f"manifest)") from None
            except CorruptCheckpointError as exc:
                raise CorruptCheckpointError(f"{what}: step {r.step} has no valid manifest "
                                             f"({exc})") from None
        target = targets[r.step]
        if any(t.step == manifest.step for t in references(target.extra, target.step)):
            raise CorruptCheckpointError(f"{what}: step {r.step} references step "
                                         f"{manifest.step} back (a cycle)")
        rec = target.files.get(r.file)
        if rec is None:
            raise CorruptCheckpointError(f"{what}: the manifest of step {r.step} does not "
                                         f"list that file")
        if (rec.nbytes, rec.header_offset, rec.header_xxh3) != (r.nbytes, r.header_offset,
                                                                 r.header_xxh3):
            raise CorruptCheckpointError(f"{what}: step {r.step} lists another file of that "
                                         f"name ({rec.nbytes} bytes, header {rec.header_xxh3})")
        found = location.size(f"{step_dirname(r.step)}/{r.file}")
        if found is None:  # as a missing file of the step's own: the load falls back
            raise IncompleteCheckpointError(f"{what}: the file "
                                            f"{location.display}/{step_dirname(r.step)}/{r.file}"
                                            f" is missing")
        if found != rec.nbytes:
            raise CorruptCheckpointError(f"{what}: the file "
                                         f"{location.display}/{step_dirname(r.step)}/{r.file} "
                                         f"holds {found} bytes, not {rec.nbytes}")
        out[(r.step, r.file)] = r
    return out


class RefTargets:
    """A reader's checked references, per location, resolved once (thread-safe)."""

    def __init__(self, manifest: M.Manifest, enabled: bool = True) -> None:
        self.manifest = manifest
        self.enabled = enabled  # False: a file read for its own chunks only (verify, repair)
        self._found: dict[int, dict[tuple[int, str], Reference]] = {}
        self._lock = threading.Lock()

    def check(self, location: Location, pieces: Iterable[Piece], where: str) -> None:
        """Check the reference chunks of ``pieces`` (a header read at ``location``)."""
        pieces = list(pieces)
        if not self.enabled or not any(c.ref is not None for p in pieces for c in p.chunks):
            return
        with self._lock:
            found = self._found.get(id(location))
        if found is None:
            found = resolve_targets(location, self.manifest)
            with self._lock:
                self._found[id(location)] = found
        check_pieces(pieces, found, where)


def referenced_todo(locations: Sequence[Location], manifest: M.Manifest
                    ) -> list[tuple[int, str, M.Manifest, set[int] | None]]:
    """(step, file, that step's manifest, the offsets of the chunks ``manifest`` references in
    it) for every file ``manifest`` references; the target's manifest from the first location
    holding a valid one (none: an empty manifest, so that checking the file reports it as not
    listed), the offsets from the referencing step's headers (None: check every chunk)."""
    out: list[tuple[int, str, M.Manifest, set[int] | None]] = []
    targets: dict[int, M.Manifest] = {}
    refs = references(manifest.extra, manifest.step)
    offsets = _offsets(locations, manifest, {r.step for r in refs})
    for r in refs:
        if r.step not in targets:
            targets[r.step] = _any_manifest(locations, r.step) or replace(
                manifest, step=r.step, files={}, extra={})
        got = offsets.get(r.step) if offsets is not None else None
        out.append((r.step, r.file, targets[r.step],
                    got.get(r.file, set()) if got is not None else None))
    return out


def _any_manifest(locations: Sequence[Location], step: int) -> M.Manifest | None:
    """The manifest of ``step`` (retired or not) from the first location with a valid one."""
    for loc in locations:
        try:
            return read_manifest(loc, step)
        except (CorruptCheckpointError, IncompleteCheckpointError, StorageError):
            continue
    return None


def _offsets(locations: Sequence[Location], manifest: M.Manifest, steps: set[int]
             ) -> dict[int, dict[str, set[int]]] | None:
    """Target step -> file -> offsets of the chunks ``manifest``'s headers reference there,
    from the first location whose headers read; None if none does."""
    for loc in locations:
        try:
            return {t: {f: {a for a, _ in rs} for f, rs in
                        referenced_ranges(loc, {manifest.step: manifest}, t).items()}
                    for t in steps}
        except (ShardckptError, OSError):
            continue
    return None


def with_references(locations: Sequence[Location], step: int
                    ) -> list[tuple[int, Mapping[str, set[int]] | None]]:
    """``step`` (all its files), then each earlier step it references (the files and chunks
    it references there): what ``repair --step`` heals."""
    try:
        manifest = find_manifest(locations, step)[0]
    except (CorruptCheckpointError, IncompleteCheckpointError, StorageError):
        return [(step, None)]
    steps = sorted({r.step for r in references(manifest.extra, step)})
    offsets = _offsets(locations, manifest, set(steps)) or {}
    return [(step, None), *((t, offsets.get(t, {})) for t in steps)]


def retired_referenced(location: Location) -> dict[int, dict[str, set[int]]]:
    """Each retired step of ``location`` -> the files of it that committed steps reference,
    and the offsets of the chunks they reference (the only bytes it still holds)."""
    found = survey([location], probe=False)
    kept = {s: e.manifest for s, e in found.steps.items() if e.manifest is not None}
    out: dict[int, dict[str, set[int]]] = {}
    for step in found.retired:
        try:
            out[step] = {f: {a for a, _ in rs}
                         for f, rs in referenced_ranges(location, kept, step).items()}
        except (ShardckptError, OSError):
            out[step] = {}
    return out


def with_retired(locations: Sequence[Location], steps: Iterable[int]
                 ) -> list[tuple[int, Mapping[str, set[int]] | None]]:
    """``steps`` to repair, each retired one with the only files and chunks it still holds."""
    retired = retired_referenced(locations[0])
    return [(s, retired.get(s)) for s in steps]


def ref_path(location: Location, ref: tuple[int, str]) -> tuple[str, str]:
    """The relative path of a referenced file, and how errors name it."""
    rel = f"{step_dirname(ref[0])}/{ref[1]}"
    return rel, f"{location.display}/{rel}"


__all__ = ["RefTargets", "ref_path", "referenced_todo", "resolve_targets",
           "retired_referenced", "with_references",
           "with_retired"]
