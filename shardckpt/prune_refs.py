"""The prune's side of incremental saves: never delete bytes a kept checkpoint references.

:func:`shardckpt.prune.prune_location` asks here, after it claimed the directories it is about
to delete (so that every save that could still reference them has either committed, and is in
a fresh listing, or holds a writer lease on its base, which keeps that base):

- :func:`referenced_files` recomputes, from the manifests of the steps that stay, which
  (step, file) pairs they reference. Nothing else is stored: the kept manifests are the truth;
- :func:`retire_step` handles a dropped step that kept steps reference: its durable retired
  record first (:mod:`.retired`: the step is hidden from then on), then its unreferenced
  files go; its manifest stays, so that references to it remain checkable;
- :func:`sweep_retired` deletes each retired step whole once nothing references it (the
  directory, then the record), trims the files nothing references any more from the others,
  and removes records left without a directory;
- :meth:`Referenced.hold` says why a directory must stay whole whatever its own state: kept
  steps reference it (a base step whose manifest was lost or damaged is never reaped as an
  unfinished save: ``repair`` from a replica restores the manifest), or a step after it has a
  manifest that cannot be read, whose references are unknown (:func:`opaque_reason`).

Each action is safe to interrupt (SIGKILL included): a crash after the record leaves a hidden
step with too many files (the next prune trims it), a crash during a whole deletion leaves a
record over part of a directory that nothing references (the next prune finishes it). Never
imports torch.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterable, Mapping

from . import catalog
from .errors import ShardckptError
from .format import manifest as M
from .format.refs import references
from .holes import punch_retired
from .retired import retire, retired_steps, unretire_record
from .storage import Location, step_dirname


class Referenced(dict[int, set[str]]):
    """Step -> the files of it that the kept steps (``kept``: their manifests) reference;
    ``users``: step -> the kept steps that reference it; ``opaque``: step -> why its corrupt
    manifest may reference any earlier step (:func:`opaque_reason`)."""

    kept: dict[int, M.Manifest]
    users: dict[int, set[int]]
    opaque: dict[int, str]

    def hold(self, step: int, manifest: str = "") -> str | None:
        """Why the directory of ``step`` stays whole (``None``: only its referenced files
        matter). ``manifest``: the state of its own manifest (``"missing"``, ``"damaged"``)."""
        if step in self.users:
            why = f"referenced by {steps_text(self.users[step])}"
            if manifest:
                why += (f"; its manifest is {manifest} (`shardckpt repair` from a replica "
                        f"restores it)")
            return why
        return self.unknown(step)

    def unknown(self, step: int) -> str | None:
        """Why nothing of the directory of ``step`` may go: a later step's manifest cannot be
        read, so what it references is unknown (``None``: no such step)."""
        later = [c for c in self.opaque if c > step]
        if later:
            c = min(later)
            return (f"the manifest of step {c} cannot be read ({self.opaque[c]}): it may "
                    f"reference these files (repair step {c} from a replica, or delete it)")
        return None


def steps_text(steps: Iterable[int]) -> str:
    """``step 2``, ``steps 2-4``, ``steps 2, 5-7``."""
    runs: list[list[int]] = []
    for s in sorted(steps):
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs]
    plural = len(runs) > 1 or runs[0][0] != runs[0][1]
    return f"step{'s' * plural} {', '.join(parts)}"


_NOT_TEXT = re.compile(rb"[^\x20-\x7e]")
_MARKERS = (b'"references"', b'"file":', b'"saves_since_full"')


def opaque_reason(location: Location, step: int) -> str | None:
    """Why the corrupt manifest of ``step`` may reference earlier steps, or ``None`` when its
    bytes prove it references none: the whole document is there (it ends with its checksum
    member), it is plain text, and none of the members that a manifest with references always
    has appears (each reference has a ``"file":`` member; the ``"references"`` and
    ``"saves_since_full"`` members come with them), so up to two damaged bytes cannot hide a
    reference. Anything else (unreadable, truncated, binary) may hide one."""
    rel = f"{step_dirname(step)}/{M.MANIFEST_NAME}"
    try:
        data = location.read_file(rel, catalog.MAX_MANIFEST_BYTES)
    except (ShardckptError, OSError):
        return "unreadable"
    if not data.endswith(b'"}\n') or b',"checksum":"' not in data[-64:]:
        return "truncated"
    if _NOT_TEXT.search(data, 0, len(data) - 1):
        return "not plain text"
    low = data.lower()
    if any(m in low for m in _MARKERS):
        return "damaged, with references"
    return None


def referenced_files(location: Location, cache: Mapping[int, M.Manifest],
                     dropping: Iterable[int]) -> Referenced:
    """What the committed steps of a fresh listing of ``location``, other than ``dropping``,
    reference."""
    found = catalog.survey([location], cache=cache, probe=False)
    drop = set(dropping)
    out = Referenced()
    out.kept, out.users, out.opaque = {}, {}, {}
    for step, entry in found.steps.items():
        if entry.manifest is None and entry.state[0] == "corrupt":
            why = opaque_reason(location, step)  # kept, like every corrupt step: never dropped
            if why is not None:
                out.opaque[step] = why
        if entry.manifest is None or step in drop:
            continue
        out.kept[step] = entry.manifest
        for r in references(entry.manifest.extra, step):
            out.setdefault(r.step, set()).add(r.file)
            out.users.setdefault(r.step, set()).add(step)
    return out


def _trim(location: Location, step: int, keep: set[str], check: Callable[[], None]) -> None:
    """Delete every entry of the step's directory but its manifest and ``keep``."""
    d = step_dirname(step)
    gone = False
    for name in location.listdir(d):
        if name != M.MANIFEST_NAME and name not in keep:
            check()
            location.remove(f"{d}/{name}")
            gone = True
    if gone:
        location.fsync_dir(d)


def retire_step(location: Location, manifest: M.Manifest, referenced: Referenced,
                check: Callable[[], None]) -> None:
    """Retire a dropped step that kept steps reference (see the module)."""
    check()
    retire(location, manifest.step, manifest.save_id, time.time())
    _trim(location, manifest.step, referenced[manifest.step], check)
    _punch(location, manifest, referenced)


def _punch(location: Location, manifest: M.Manifest | None, referenced: Referenced) -> None:
    """Local disks: give back the space of the chunks no kept step references (holes.py)."""
    if manifest is not None:
        with contextlib.suppress(ShardckptError, OSError):
            punch_retired(location, referenced.kept, manifest, referenced[manifest.step])


def sweep_retired(location: Location, referenced: Referenced,
                  check: Callable[[], None]) -> list[str]:
    """Delete unreferenced retired steps whole, trim the others; returns what went."""
    names = location.listdir("")
    present = set(location.list_step_dirs())
    gone: list[str] = []
    for step in sorted(retired_steps(names)):
        d = step_dirname(step)
        if step in present and referenced.unknown(step):
            continue  # a later step's references are unknown: nothing of it goes
        if step in present and step in referenced:
            _trim(location, step, referenced[step], check)
            _punch(location, manifest_for(location, step, {}), referenced)
            continue
        check()
        if step in present:
            location.remove(f"{d}/{M.MANIFEST_NAME}")  # no longer checkable: never a target
            location.fsync_dir(d)
            location.remove_tree(d)
            location.fsync_dir("")
            gone.append(f"{d} (retired)")
        unretire_record(location, step)
    return gone


def sweep_plan(location: Location, referenced: Referenced) -> list[str]:
    """What :func:`sweep_retired` would delete whole now (for a dry run; changes nothing)."""
    present = set(location.list_step_dirs())
    return [f"{step_dirname(s)} (retired)" for s in sorted(retired_steps(location.listdir("")))
            if s in present and s not in referenced and not referenced.unknown(s)]


def manifest_for(location: Location, step: int, cache: Mapping[int, M.Manifest]
                 ) -> M.Manifest | None:
    try:
        return cache.get(step) or catalog.read_manifest(location, step)
    except (ShardckptError, OSError):
        return None


__all__ = ["Referenced", "manifest_for", "opaque_reason", "referenced_files", "retire_step",
           "steps_text", "sweep_plan", "sweep_retired"]
