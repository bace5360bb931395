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
  and removes records left without a directory.

Each action is safe to interrupt (SIGKILL included): a crash after the record leaves a hidden
step with too many files (the next prune trims it), a crash during a whole deletion leaves a
record over part of a directory that nothing references (the next prune finishes it). Never
imports torch.
"""

from __future__ import annotations

import contextlib
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
    """Step -> the files of it that the kept steps (``kept``: their manifests) reference."""

    kept: dict[int, M.Manifest]


def referenced_files(location: Location, cache: Mapping[int, M.Manifest],
                     dropping: Iterable[int]) -> Referenced:
    """What the committed steps of a fresh listing of ``location``, other than ``dropping``,
    reference."""
    found = catalog.survey([location], cache=cache, probe=False)
    drop = set(dropping)
    out = Referenced()
    out.kept = {}
    for step, entry in found.steps.items():
        if entry.manifest is None or step in drop:
            continue
        out.kept[step] = entry.manifest
        for r in references(entry.manifest.extra, step):
            out.setdefault(r.step, set()).add(r.file)
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
            if s in present and s not in referenced]


def manifest_for(location: Location, step: int, cache: Mapping[int, M.Manifest]
                 ) -> M.Manifest | None:
    try:
        return cache.get(step) or catalog.read_manifest(location, step)
    except (ShardckptError, OSError):
        return None


__all__ = ["Referenced", "manifest_for", "referenced_files", "retire_step", "sweep_plan",
           "sweep_retired"]
