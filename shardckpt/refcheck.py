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


def resolve_targets(location: Location, manifest: M.Manifest,
                    problems: dict[tuple[int, str], ShardckptError] | None = None
                    ) -> dict[tuple[int, str], Reference]:
    """Every reference of ``manifest`` checked at ``location`` (see the module). With
    ``problems``, a referenced file that is missing or of another size at this location is
    noted there (another location may hold a good copy) instead of raised."""
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
        out[(r.step, r.file)] = r
        found = location.size(f"{step_dirname(r.step)}/{r.file}")
        bad: ShardckptError | None = None
        if found is None:  # as a missing file of the step's own: the load falls back
            bad = IncompleteCheckpointError(f"{what}: the file {location.display}/"
                                            f"{step_dirname(r.step)}/{r.file} is missing")
        elif found != rec.nbytes:
            bad = CorruptCheckpointError(f"{what}: the file {location.display}/"
                                         f"{step_dirname(r.step)}/{r.file} holds {found} "
                                         f"bytes, not {rec.nbytes}")
        if bad is not None:
            if problems is None:
                raise bad
            problems[(r.step, r.file)] = bad
    return out


def target_problem(location: Location, step: int) -> tuple[str | None, M.Manifest | None]:
    """Why the referenced ``step`` cannot be trusted at ``location`` (its directory missing,
    no manifest: not committed, an invalid or unreadable manifest) and None, or None and its
    manifest (retired or not): the check :func:`resolve_targets` makes, as words for ``ls``,
    ``show`` and ``verify``."""
    rel = f"{step_dirname(step)}/{M.MANIFEST_NAME}"
    try:
        return None, read_manifest(location, step)
    except IncompleteCheckpointError:
        if location.size(rel) is None and step not in location.list_step_dirs():
            return "missing (no directory of that step)", None
        return f"missing (step {step} is not committed)", None
    except CorruptCheckpointError as exc:
        return f"invalid ({_reason(exc, location, rel)})", None
    except (StorageError, OSError) as exc:
        return f"unreadable ({_reason(exc, location, rel)})", None


def _reason(exc: Exception, location: Location, rel: str) -> str:
    text = str(exc)
    prefix = f"{location.display}/{rel}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def untrusted_targets(locations: Sequence[Location], manifest: M.Manifest,
                      known: Mapping[int, M.Manifest] | None = None) -> dict[int, str]:
    """Each step ``manifest`` references that has a valid manifest at none of ``locations``:
    step -> why, at the first location (``LOCATION/step-N/manifest.json PROBLEM``). Its data
    bytes may be intact, but no reference to it can be trusted: what ``verify`` and ``info()``
    report, and what ``repair`` from a location holding a valid manifest of it heals. ``known``:
    manifests already validated, by step (not read again)."""
    out: dict[int, str] = {}
    for step in sorted({r.step for r in references(manifest.extra, manifest.step)}):
        if known is not None and step in known:
            continue
        why: list[str] = []
        for loc in locations:
            problem, _ = target_problem(loc, step)
            if problem is None:
                break
            why.append(f"{loc.display}/{step_dirname(step)}/{M.MANIFEST_NAME} {problem}")
        else:
            out[step] = why[0] if why else f"step {step}: no location"
    return out


class DeadReference(ShardckptError):
    """Marker mixed into the error raised when no location holds a usable copy of a
    referenced file or chunk: the referencing step's own file is not to blame."""


def dead(exc: ShardckptError) -> ShardckptError:
    """``exc`` re-raised as the same kind of error, marked :class:`DeadReference`."""
    if isinstance(exc, DeadReference):
        return exc
    kind = _DEAD.get(type(exc))
    if kind is None:
        kind = _DEAD.setdefault(type(exc), type(type(exc).__name__, (type(exc), DeadReference),
                                                 {"__module__": type(exc).__module__}))
    return kind(str(exc))


_DEAD: dict[type, type] = {}


class RefTargets:
    """A reader's checked references, per location, resolved once (thread-safe).

    A referenced file gets the same per-file, per-location fallback as a file of the step's
    own: it is bad data only when no location holds a usable copy (:meth:`sources`)."""

    def __init__(self, manifest: M.Manifest, enabled: bool = True,
                 locations: Sequence[Location] = (), presence: bool = True) -> None:
        self.manifest = manifest
        self.enabled = enabled  # False: a file read for its own chunks only (verify, repair)
        # False: the references are checked, not that some location holds their files (verify
        # of a step's own file: the referenced files are verified on their own)
        self.presence = presence
        self.locations = list(locations)
        self._found: dict[int, ShardckptError | tuple[dict[tuple[int, str], Reference],
                                                      dict[tuple[int, str], ShardckptError]]] = {}
        self._lock = threading.Lock()

    def _resolve(self, location: Location) -> tuple[dict[tuple[int, str], Reference],
                                                     dict[tuple[int, str], ShardckptError]]:
        with self._lock:
            got = self._found.get(id(location))
        if got is None:
            problems: dict[tuple[int, str], ShardckptError] = {}
            try:
                got = (resolve_targets(location, self.manifest, problems), problems)
            except (ShardckptError, OSError) as exc:  # remembered: raised again, not redone
                got = exc if isinstance(exc, ShardckptError) else StorageError(str(exc))
            with self._lock:
                self._found[id(location)] = got
        if isinstance(got, ShardckptError):
            raise type(got)(str(got))
        return got

    def check(self, location: Location, pieces: Iterable[Piece], where: str) -> None:
        """Check the reference chunks of ``pieces`` (a header read at ``location``): valid
        references, each to a file that some location holds with its recorded size."""
        pieces = list(pieces)
        if not self.enabled or not any(c.ref is not None for p in pieces for c in p.chunks):
            return
        first: ShardckptError | None = None
        for loc in [location, *(x for x in self.locations if x is not location)]:
            try:  # the manifests of the referenced steps, where some location holds them
                found, _ = self._resolve(loc)
                break
            except (ShardckptError, OSError) as exc:
                first = first or (exc if isinstance(exc, ShardckptError)
                                  else StorageError(str(exc)))
        else:
            assert first is not None
            raise first
        check_pieces(pieces, found, where)
        if self.presence:
            for pair in sorted({c.ref for p in pieces for c in p.chunks if c.ref is not None}):
                self.sources(pair, location)

    def sources(self, pair: tuple[int, str], first: Location) -> list[Location]:
        """The locations holding a usable copy of the referenced file ``pair`` (checked
        references, the file present with its recorded size), ``first`` first; none: the first
        location's error, marked :class:`DeadReference`."""
        order = [first, *(loc for loc in self.locations if loc is not first)]
        out: list[Location] = []
        errors: list[ShardckptError] = []
        for loc in order:
            try:
                _, problems = self._resolve(loc)
            except (ShardckptError, OSError) as exc:
                errors.append(exc if isinstance(exc, ShardckptError) else StorageError(str(exc)))
                continue
            if pair in problems:
                errors.append(problems[pair])
            else:
                out.append(loc)
        if not out:
            raise dead(errors[0])
        return out


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


__all__ = ["DeadReference", "RefTargets", "dead", "ref_path", "referenced_todo", "resolve_targets",
           "retired_referenced", "target_problem", "untrusted_targets", "with_references",
           "with_retired"]
