"""Finding checkpoints: what each location holds, and which manifest to trust. Never imports torch.

Every reader of checkpoints (the manager, prune, repair, export, verify and the CLI) asks here:

- :func:`read_manifest` / :func:`find_manifest`: the validated manifest of one step;
- :func:`survey`: every step directory of every location, classified. Remote locations are
  probed first (:mod:`shardckpt.storage.probe`), all at once, so a dead replica costs a few
  seconds and is reported, never fatal while another location answers.

What a step directory is, at one location:

- ``ok``: its manifest is present and valid: the step is *committed* there;
- ``uncommitted``: no manifest (a save in progress, or one that died);
- ``corrupt``: a manifest file is present but invalid (truncated, checksum, lies). Not
  committed; a new save of that step moves the directory aside (``step-N.corrupt-<utc>``);
- ``unreadable``: the manifest could not be read (a storage error);
- ``absent`` / ``unreachable``: no such directory there / the location did not answer;
- ``listed``: present, not read (``survey(first_valid=True)`` found it valid elsewhere).

"Latest" has two meanings. :meth:`Survey.committed` gives the steps to *resume* from (newest
valid); :meth:`Survey.latest_manifest` the newest step directory holding a manifest file, valid
or not: what ``show``, ``verify``, ``export`` and ``diff`` inspect by default, so that a broken
newest checkpoint is reported instead of quietly passed over.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .errors import CorruptCheckpointError, IncompleteCheckpointError, StorageError
from .format import manifest as M
from .retired import retired_name, retired_steps
from .storage import Location, step_dirname
from .storage.location import STEP_DIR
from .storage.probe import Unreachable, reachable_all

MAX_MANIFEST_BYTES = 1 << 30
READ_THREADS = 16  # concurrent manifest reads on an object store
ASIDE_DIR = re.compile(r"step-(\d{10})\.corrupt-(\d{8}T\d{6}Z)(?:-\d+)?")
HAS_MANIFEST = ("ok", "corrupt", "unreadable")


def read_manifest(location: Location, step: int) -> M.Manifest:
    """The validated manifest of ``step``; ``IncompleteCheckpointError`` if it is not committed."""
    rel = f"{step_dirname(step)}/{M.MANIFEST_NAME}"
    try:
        size = location.size(rel)
        if size is not None and size > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(f"{location.display}/{rel}: {size} bytes is larger "
                                         f"than any manifest ({MAX_MANIFEST_BYTES})")
        data = location.read_file(rel, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise IncompleteCheckpointError(
            f"{location.display}/{rel}: no manifest, step {step} is not committed") from None
    manifest = M.parse(data, f"{location.display}/{rel}")
    if manifest.step != step:
        raise CorruptCheckpointError(f"{location.display}/{rel}: manifest is for step "
                                     f"{manifest.step}, found in the directory of step {step}")
    return manifest


def find_manifest(locations: Sequence[Location], step: int) -> tuple[M.Manifest, int]:
    """The manifest of ``step`` from the first location holding a valid one, and its index.

    If none does, raises the most telling error: a corrupt manifest before an unreadable one
    before "not committed" (``IncompleteCheckpointError`` when the step is committed nowhere).
    """
    errors: list[Exception] = []
    for i, loc in enumerate(locations):
        try:
            if loc.size(retired_name(step)) is not None:  # hidden: see shardckpt/retired.py
                raise IncompleteCheckpointError(
                    f"{loc.display}/{step_dirname(step)}: step {step} is retired (pruned, kept "
                    f"only for the files that later steps reference)")
            return read_manifest(loc, step), i
        except (IncompleteCheckpointError, CorruptCheckpointError, StorageError) as exc:
            errors.append(exc)
    rank = (CorruptCheckpointError, StorageError, IncompleteCheckpointError)
    raise min(errors, key=lambda e: next(i for i, c in enumerate(rank) if isinstance(e, c)))


def aside_dirname(step: int, now: float) -> str:
    """Where a corrupt step directory is moved: ``step-NNNNNNNNNN.corrupt-YYYYmmddTHHMMSSZ``."""
    stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{step_dirname(step)}.corrupt-{stamp}"


@dataclass
class StepEntry:
    """One step across the locations: ``state[i]`` as in the module doc, ``manifest`` the first
    valid one (None if none is), ``errors[i]`` why location i's manifest is not valid."""

    step: int
    state: list[str]
    manifest: M.Manifest | None = None
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def committed(self) -> bool:
        return self.manifest is not None

    def error(self) -> str:
        """The first location's complaint (for a step committed nowhere)."""
        return next(iter(self.errors.values()), f"step {self.step}: no manifest")


@dataclass
class Survey:
    """What :func:`survey` found. ``locations`` are the ones asked, in order; ``unreachable``
    maps the index of each that failed its probe or listing to why; ``aside`` lists the
    (location index, directory name) of every step directory moved aside as corrupt;
    ``retired`` maps each retired step (:mod:`.retired`: hidden, kept only for the references
    to it) to the indexes of the locations where it is retired."""

    locations: list[Location]
    unreachable: dict[int, str] = field(default_factory=dict)
    steps: dict[int, StepEntry] = field(default_factory=dict)
    aside: list[tuple[int, str]] = field(default_factory=list)
    retired: dict[int, list[int]] = field(default_factory=dict)

    @property
    def reachable(self) -> list[Location]:
        """The locations that answered, in order (read from these)."""
        return [loc for i, loc in enumerate(self.locations) if i not in self.unreachable]

    def committed(self) -> list[int]:
        """Steps with a valid manifest somewhere, ascending: what can be resumed from."""
        return sorted(s for s, e in self.steps.items() if e.committed)

    def latest_manifest(self) -> int | None:
        """The newest step directory holding a manifest file anywhere, valid or not."""
        found = [s for s, e in self.steps.items() if any(x in HAS_MANIFEST for x in e.state)]
        return max(found) if found else None

    def corrupt(self) -> dict[int, str]:
        """Steps with a manifest file but a valid manifest nowhere: step -> error."""
        return {s: e.error() for s, e in sorted(self.steps.items())
                if not e.committed and any(x in HAS_MANIFEST for x in e.state)}

    def problems(self) -> list[str]:
        """One line per unreachable location and per bad manifest."""
        out = [f"{self.locations[i].display}: unreachable: {why}"
               for i, why in sorted(self.unreachable.items())]
        for entry in self.steps.values():
            out += [msg for i, msg in sorted(entry.errors.items())
                    if entry.state[i] in ("corrupt", "unreadable")]
        return out


def _list(location: Location) -> tuple[dict[int, str], list[str], set[int]]:
    steps: dict[int, str] = {}
    aside: list[str] = []
    names = location.listdir("")
    for name in names:
        if (m := STEP_DIR.fullmatch(name)) is not None:
            steps[int(m.group(1))] = name
        elif ASIDE_DIR.fullmatch(name):
            aside.append(name)
    retired = retired_steps(names) & set(steps)  # hidden: not a step of this listing
    return {s: n for s, n in steps.items() if s not in retired}, aside, retired


def _classify(location: Location, step: int, cache: Mapping[int, M.Manifest],
              trust_cache: bool) -> M.Manifest | tuple[str, str]:
    if step in cache and (trust_cache or location.size(
            f"{step_dirname(step)}/{M.MANIFEST_NAME}") is not None):
        return cache[step]  # known valid (and still there): no full read
    try:
        return read_manifest(location, step)
    except IncompleteCheckpointError as exc:
        return "uncommitted", str(exc)
    except CorruptCheckpointError as exc:
        return "corrupt", str(exc)
    except StorageError as exc:
        return "unreadable", str(exc)


def survey(locations: Iterable[Location], *, cache: Mapping[int, M.Manifest] | None = None,
           trust_cache: bool = False, first_valid: bool = False, probe: bool = True,
           each: Callable[[Location, list[int]], Iterable[int]] | None = None) -> Survey:
    """List and classify every step directory of every location (see the module).

    ``cache`` holds manifests already validated (by step), to save reading them again: a stat
    checks that each is still there, unless ``trust_cache``. ``first_valid``: a step found valid
    at one location is not read again at the later ones (state ``listed`` there). ``probe=False``
    skips the reachability probe; ``each(location, steps)`` may wrap the steps read at each
    location (a progress bar).
    """
    out = Survey(list(locations))
    cache = cache or {}
    n = len(out.locations)
    checked = reachable_all(out.locations) if probe else out.locations
    with ThreadPoolExecutor(max_workers=max(1, n), thread_name_prefix="shardckpt-list") as pool:
        listings = list(pool.map(_try_list, checked))
    per_loc: list[dict[int, M.Manifest | tuple[str, str]]] = []
    for i, (loc, listing) in enumerate(zip(checked, listings)):
        if isinstance(listing, str):
            out.unreachable[i] = listing
            per_loc.append({})
            continue
        steps, aside, retired = listing
        out.aside += [(i, name) for name in aside]
        for s in sorted(retired):
            out.retired.setdefault(s, []).append(i)
        valid = {s for found in per_loc for s, m in found.items() if isinstance(m, M.Manifest)}
        skip = valid if first_valid else set()
        order = sorted(set(steps) - skip)
        todo = each(loc, order) if each is not None else order
        workers = 1 if loc.is_local else READ_THREADS
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shardckpt-read") as pool:
            found: dict[int, M.Manifest | tuple[str, str]] = dict(zip(order, pool.map(
                lambda s, loc=loc: _classify(loc, s, cache, trust_cache), todo)))
        found.update({s: ("listed", "") for s in skip & set(steps)})
        per_loc.append(found)
    for step in sorted({s for found in per_loc for s in found}):
        entry = StepEntry(step, [])
        for i in range(n):
            got = per_loc[i].get(step)
            if got is None:
                entry.state.append("unreachable" if i in out.unreachable else "absent")
            elif isinstance(got, M.Manifest):
                entry.state.append("ok")
                entry.manifest = entry.manifest or got
            else:
                entry.state.append(got[0])
                if got[1]:
                    entry.errors[i] = got[1]
        out.steps[step] = entry
    return out


def _try_list(location: Location) -> tuple[dict[int, str], list[str], set[int]] | str:
    """The step and aside directories of ``location``, or why it cannot be listed."""
    try:
        return _list(location)
    except StorageError as exc:
        return location.why if isinstance(location, Unreachable) else str(exc)


def latest_manifest_step(locations: Sequence[Location], where: str) -> int:
    """The newest step directory holding a manifest file (valid or not) among the reachable
    locations: the default step of ``show``, ``verify``, ``export`` and ``diff``. Raises
    ``IncompleteCheckpointError`` if there is none, naming ``where``."""
    step = survey(locations).latest_manifest()
    if step is None:
        raise IncompleteCheckpointError(f"{where}: no checkpoint")
    return step


class Finder:
    """The manager's view of its locations: cached manifests, and which locations are down.

    Each :meth:`survey` probes the locations, warns once per outage of one (again only after it
    came back and went away again) and raises ``StorageError`` when none answers.
    """

    def __init__(self, locations: Sequence[Location]) -> None:
        self.locations = list(locations)
        self.manifests: dict[int, M.Manifest] = {}  # valid manifests by step
        self._down: set[str] = set()

    def survey(self) -> Survey:
        found = survey(self.locations, cache=dict(self.manifests), trust_cache=True,
                       first_valid=True)
        down = {found.locations[i].display: why for i, why in found.unreachable.items()}
        if len(down) == len(found.locations):
            raise StorageError("no location is reachable: " + "; ".join(
                f"{n}: {why}" for n, why in down.items()))
        for name in sorted(set(down) - self._down):
            warnings.warn(f"{name} is unreachable ({down[name]}); reading from the other "
                          f"locations", stacklevel=4)
        self._down = set(down)
        for step in set(self.manifests) - set(found.steps):
            del self.manifests[step]
        self.manifests.update({s: e.manifest for s, e in found.steps.items()
                               if e.manifest is not None})
        return found

    def committed(self) -> list[int]:
        """Committed steps; a step whose manifest is corrupt or unreadable everywhere is left
        out, with a warning."""
        found = self.survey()
        for step, error in found.corrupt().items():
            warnings.warn(f"skipping step {step}: {error}", stacklevel=3)
        return found.committed()

    def manifest(self, step: int) -> M.Manifest:
        if step not in self.manifests:
            self.manifests[step] = find_manifest(self.survey().reachable, step)[0]
        return self.manifests[step]

    @staticmethod
    def newest_valid(found: Survey, warn: bool) -> int | None:
        """The newest committed step; newer steps whose manifest is corrupt are skipped, with
        a warning (if ``warn``) naming them and the step chosen instead."""
        committed = found.committed()
        step = committed[-1] if committed else None
        skipped = {s: e for s, e in found.corrupt().items() if step is None or s > step}
        if skipped and warn:
            warnings.warn("skipping step(s) " + ", ".join(
                f"{s} ({e})" for s, e in skipped.items()) + ": manifest corrupt; loading " +
                (f"step {step}" if step is not None else "nothing"), stacklevel=4)
        return step
