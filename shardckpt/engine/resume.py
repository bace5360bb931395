"""``CheckpointManager.load``: which step to load, and what to do when its data is bad.

Every rank calls :func:`load_state` with the same arguments (it is collective). Without an
explicit step, rank 0 lists the committed steps, newest first, and every rank works down that
list together: a step whose data turns out bad while it is planned or read (a corrupt or
truncated shard, a missing file: :class:`~shardckpt.engine.load.CorruptLoadError` on every
rank) is reported with a warning naming the step and the file, and the next older step is loaded
in full, every key again. Once a step has loaded, rank 0 moves each bad newer step aside at each
location holding it (``step-N.corrupt-<utc>``, kept for inspection), so that the job can save
step N again. With an explicit step, a bad step raises on every rank.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

from ..catalog import Finder, Survey, aside_dirname, find_manifest
from ..errors import IncompleteCheckpointError, ShardckptError
from ..extras import RNG_KEY, has_key
from ..repro import restore_rng_state
from ..storage import Location, step_dirname
from ..storage.lease import StepLease
from .comm import Comm
from .load import CorruptLoadError, IncompleteLoadError, load_step
from .reader import CheckpointReader
from .readonce import counted

BAD_DATA = (CorruptLoadError, IncompleteLoadError)


def load_state(comm: Comm, finder: Finder, state: dict[str, Any], step: int | None,
               strict: bool, restore_rng: bool, threads: int) -> tuple[int, dict[str, float]]:
    """Collective. Restore ``state`` in place from ``step`` (default: the newest step that
    loads). Returns the step loaded and this rank's load profile."""
    found = finder.survey()
    if step is not None:
        return step, _load_one(comm, found, state, step, strict, restore_rng, threads)
    newest = finder.newest_valid(found, warn=comm.rank == 0)
    candidates = [s for s in reversed(found.committed()) if newest is not None and s <= newest]
    if comm.world_size > 1:  # rank 0's view decides, so every rank tries the same steps
        candidates = comm.broadcast_json(candidates, "load: agree on steps")
    if not candidates:
        raise IncompleteCheckpointError(
            f"{finder.locations[0].display}: no committed checkpoint to load")
    bad: list[int] = []
    for i, candidate in enumerate(candidates):
        try:
            profile = _load_one(comm, found, state, candidate, strict, restore_rng, threads)
        except BAD_DATA as exc:
            bad.append(candidate)
            if i + 1 == len(candidates):
                if len(bad) == 1:
                    raise
                tried = ", ".join(map(str, bad))  # every step, not only the last, is named
                raise type(exc)(f"no committed step could be loaded: steps {tried} (newest "
                                f"first) all have bad data; step {candidate}: {exc}",
                                exc.failures, exc.phase) from exc
            if comm.rank == 0:
                lines = "; ".join(f"rank {r}: {m}" for r, m in sorted(exc.failures.items()))
                warnings.warn(f"step {candidate} cannot be loaded, its data is bad ({lines}); "
                              f"loading step {candidates[i + 1]} instead, every key again",
                              stacklevel=3)
            continue
        if bad and comm.rank == 0:
            for s in bad:
                move_aside(found, s)
        for s in bad:
            finder.manifests.pop(s, None)
        return candidate, profile
    raise AssertionError("unreachable")  # the loop returns or raises


def _load_one(comm: Comm, found: Survey, state: dict[str, Any], step: int, strict: bool,
              restore_rng: bool, threads: int) -> dict[str, float]:
    """Load ``step`` into ``state`` (every key), with each rank's RNG states when the step was
    saved at this world size and ``restore_rng``."""
    locations = found.reachable
    entry = found.steps.get(step)
    if entry is not None and entry.manifest is not None:
        manifest = entry.manifest
    else:
        manifest, _ = find_manifest(locations, step)
    reader = CheckpointReader(counted(locations), step_dirname(step), manifest)  # bytes_read
    same_world = manifest.world_size == comm.world_size
    wants_rng = restore_rng and has_key(manifest, RNG_KEY)
    target = {**state, RNG_KEY: {}} if wants_rng and same_world else dict(state)
    profile = load_step(comm, reader, target, strict, threads)
    rng = target.pop(RNG_KEY, None)
    state.update(target)
    if rng is not None:
        missing = restore_rng_state(rng)
        if missing:
            warnings.warn(f"step {step}: RNG state not restored for {missing}", stacklevel=4)
    elif wants_rng:
        warnings.warn(f"step {step} was saved at world size {manifest.world_size}, this job "
                      f"has {comm.world_size}: per-rank RNG states are not restored",
                      stacklevel=4)
    return profile


def move_aside(found: Survey, step: int) -> list[str]:
    """Rank 0: move the directory of ``step`` aside at every reachable location holding it
    (``step-N.corrupt-<utc>``), under the step's writer lease. Returns where it went; a
    location that fails is warned about and left as it is."""
    entry = found.steps.get(step)
    moved: list[str] = []
    step_dir = step_dirname(step)
    for i, location in enumerate(found.locations):
        if i in found.unreachable or entry is None or entry.state[i] in ("absent",
                                                                         "unreachable"):
            continue
        try:
            aside = _move(location, step_dir, step)
        except (ShardckptError, OSError) as exc:
            warnings.warn(f"{location.display}/{step_dir}: its data is bad, but moving it aside "
                          f"failed: {exc}", stacklevel=4)
            continue
        moved.append(f"{location.display}/{aside}")
    if moved:
        warnings.warn(f"step {step}: its data is bad; moved aside to {', '.join(moved)} (kept "
                      f"for inspection; step {step} can be saved again)", stacklevel=4)
    return moved


def _move(location: Location, step_dir: str, step: int) -> str:
    with StepLease(location, step_dir):
        aside = aside_dirname(step, time.time())
        location.move_tree(step_dir, aside)
    return aside
