"""What each location holds: committed steps, and whether each one is whole there."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import catalog
from ..errors import StorageError
from ..format import manifest as M
from ..format.refs import references
from ..format.shard import TRAILER, TRAILER_SIZE
from ..storage import Location, step_dirname

# how a location's state of a step shows in ``ls`` (the catalog's word where not listed here)
_SHOWN = {"corrupt": "corrupt manifest"}
# states of a location that are no damage to report: whole, never saved there (a degraded
# save, or a replica added later), or unreachable (reported once per location)
NOT_DAMAGE = frozenset({"ok", "absent", "unreachable"})


@dataclass
class StepHealth:
    manifest: M.Manifest
    health: list[str] = field(default_factory=list)  # per location: ok / missing / corrupt / ...
    # incremental: each damaged file of an earlier step it references, where
    ref_problems: list[dict[str, object]] = field(default_factory=list)


@dataclass
class Survey:
    """``steps``: the committed steps; ``corrupt``: steps with a manifest file valid nowhere
    (step -> error); ``aside``: (location, directory) of each corrupt step moved aside."""

    steps: dict[int, StepHealth] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    corrupt: dict[int, str] = field(default_factory=dict)
    aside: list[tuple[str, str]] = field(default_factory=list)


def file_health(loc: Location, step: int, m: M.Manifest) -> str:
    """``ok`` if every shard file is present with its recorded size and the header its
    trailer points to is the one the manifest recorded (one 32-byte read per file: a file
    replaced by another writer's, of the same size, shows as ``header mismatch``)."""
    d = step_dirname(step)
    for name, rec in m.files.items():
        size = loc.size(f"{d}/{name}")
        if size is None:
            return "missing files"
        if size != rec.nbytes:
            return "wrong sizes"
        tail = loc.read_range(f"{d}/{name}", size - TRAILER_SIZE, TRAILER_SIZE)
        if len(tail) != TRAILER_SIZE or (TRAILER.unpack(tail)[0], f"{TRAILER.unpack(tail)[2]:016x}"
                                         ) != (rec.header_offset, rec.header_xxh3):
            return "header mismatch"
    return "ok"


def _file_state(loc: Location, rel: str, nbytes: int, header_offset: int, header_xxh3: str
                ) -> str:
    size = loc.size(rel)
    if size is None:
        return "missing"
    if size != nbytes:
        return f"{size} bytes, not {nbytes}"
    tail = loc.read_range(rel, size - TRAILER_SIZE, TRAILER_SIZE)
    if len(tail) != TRAILER_SIZE or (TRAILER.unpack(tail)[0], f"{TRAILER.unpack(tail)[2]:016x}"
                                     ) != (header_offset, header_xxh3):
        return "header mismatch"
    return "ok"


def ref_health(loc: Location, m: M.Manifest, cache: dict[tuple[str, str], object] | None = None
               ) -> list[dict[str, object]]:
    """Incremental saves: what is not whole at ``loc`` of the earlier steps ``m`` references,
    as ``{"step", "file", "problem"}``: once per step whose manifest is not valid there
    (``file``: ``step-NNNNNNNNNN/manifest.json``; the directory missing, not committed, an
    invalid or unreadable manifest: no reference to it can be trusted, as the loader refuses
    it), else each referenced file that its manifest does not list with the record ``m``
    copied, or that is missing, of another size or with another header (the checks of
    :func:`file_health`), ``file`` named as ``verify`` names it (``step-NNNNNNNNNN/<file>``).
    ``cache`` spares reading a base again for each step that references it."""
    from ..refcheck import target_problem

    cache = {} if cache is None else cache
    out: list[dict[str, object]] = []
    for r in references(m.extra, m.step):
        d = step_dirname(r.step)
        mkey = (loc.display, f"{d}/{M.MANIFEST_NAME}")
        if mkey not in cache:
            cache[mkey] = target_problem(loc, r.step)
        problem, target = cache[mkey]  # type: ignore[misc]
        if problem is not None:
            if not any(o["step"] == r.step for o in out):
                out.append({"step": r.step, "file": mkey[1], "problem": problem})
            continue
        rel = f"{d}/{r.file}"
        rec = target.files.get(r.file)
        if rec is None:
            state = f"not listed by the manifest of step {r.step}"
        elif (rec.nbytes, rec.header_offset, rec.header_xxh3) != (r.nbytes, r.header_offset,
                                                                 r.header_xxh3):
            state = f"listed by the manifest of step {r.step} with another record"
        else:
            key = (loc.display, rel)
            if key not in cache:
                cache[key] = _file_state(loc, rel, r.nbytes, r.header_offset, r.header_xxh3)
            state = str(cache[key])
        if state != "ok":
            out.append({"step": r.step, "file": rel, "problem": state})
    return out


def ref_state(problems: list[dict[str, object]]) -> str:
    """The health word of a location whose own files are whole but ``problems`` (of
    :func:`ref_health`) are not: names the first damaged step and file."""
    p = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    why = f", so no reference to step {p['step']} can be trusted" \
        if str(p["file"]).endswith(M.MANIFEST_NAME) else ""
    return f"depends on damaged step {p['step']}: {p['file']} {p['problem']}{why}{more}"


def survey(locations: list[Location], progress: bool = False) -> Survey:
    """Every step of every location, read and sized; ``progress``: a bar on stderr (TTY).

    An unreachable location is reported (``problems``) and marked ``unreachable``; the others
    are shown. ``StorageError`` only when none answers.
    """
    from .progress import bar

    def each(loc: Location, steps: list[int]) -> list[int] | object:
        return bar(steps, desc=f"reading {loc.display}", total=len(steps), enabled=progress,
                   unit="step")

    found = catalog.survey(locations, each=each)
    if len(found.unreachable) == len(locations):
        raise StorageError("; ".join(f"{locations[i].display}: cannot be listed: {why}"
                                     for i, why in sorted(found.unreachable.items())))
    out = Survey(corrupt=found.corrupt(),
                 aside=[(locations[i].display, name) for i, name in found.aside])
    out.problems += [f"{locations[i].display}: cannot be listed: unreachable: {why}"
                     for i, why in sorted(found.unreachable.items())]
    cache: dict[tuple[str, str], object] = {}
    for step, entry in sorted(found.steps.items()):
        out.problems += [msg for i, msg in sorted(entry.errors.items())
                         if entry.state[i] in ("corrupt", "unreadable")]
        if entry.manifest is None:
            continue
        health = [file_health(loc, step, entry.manifest) if state == "ok"
                  else _SHOWN.get(state, state)
                  for loc, state in zip(locations, entry.state)]
        found_refs: list[dict[str, object]] = []
        for i, loc in enumerate(locations):  # incremental: the files it references, too
            if health[i] == "ok" and (bad := ref_health(loc, entry.manifest, cache)):
                health[i] = ref_state(bad)
                found_refs += [{**b, "location": loc.display} for b in bad]
        out.steps[step] = StepHealth(entry.manifest, health, found_refs)
    return out
