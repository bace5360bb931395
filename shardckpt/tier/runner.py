"""The node-local tier inside a :class:`~shardckpt.CheckpointManager`: which tiers a ``save``
writes, and the local tier's own pipeline (a one-thread pool, staging buffers, and two private
gloo groups: the store's for the save protocol, a gate for deciding on the caller's thread).

* ``save(step, ..., tier=None)`` writes the tiers that are due: the local one every
  ``LocalTier.every`` steps, the persistent one every ``save_every`` (a call where neither is
  due writes the persistent tier, as without a local tier). ``tier="local" | "persistent" |
  "both"`` overrides.
* A local save never waits for a persistent one (separate pipelines and groups). A local save
  due while the previous local save is still running on any rank is skipped on every rank,
  never queued, and counted (``skipped``): warned about at the 1st, 10th, 100th... skip (not
  at every step of a fast loop), and summed up at ``close`` (a log record, rank 0).

Construction is collective (the manager's ranks, in the same order on every rank).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import knobs
from ..audit import record_restore
from ..engine.comm import make_comm
from ..engine.lazy import LazySnapshot
from ..engine.load import CorruptLoadError, IncompleteLoadError
from ..engine.snapshot import Snapshot, StagingPool
from ..errors import IncompleteCheckpointError
from ..extras import with_extras
from ..format import manifest as M
from ..golden import GOLDEN_KEY
from ..handles import CheckpointInfo, SaveHandle
from ..planning.statedict import collect
from .choice import Candidate
from .config import LocalTier
from .goldencheck import GoldenMismatchError, check_golden, with_golden
from .local import LocalTierStore
from .pathcheck import check_paths
from .persistentlist import PersistentSteps, full_listing, warm_up
from .recover import recover

logger = logging.getLogger("shardckpt.tier")

TIERS = ("local", "persistent", "both")
BAD_DATA = (GoldenMismatchError, CorruptLoadError, IncompleteLoadError)


def tiers_to_write(step: int, tier: str | None, local_due: bool,
                   save_every: int | None) -> tuple[bool, bool]:
    """(local, persistent): what ``save(step, tier=tier)`` writes."""
    if tier is None:
        persistent = save_every is not None and step % save_every == 0
        return local_due, persistent or not local_due
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS} or None, got {tier!r}")
    return tier in ("local", "both"), tier in ("persistent", "both")


class LocalTierRunner:
    """One rank's local tier within a manager (see the module)."""

    def __init__(self, config: LocalTier, process_group: Any = None, *,
                 compression: str | None = None, file_mode: int | None = None,
                 async_save: bool = True) -> None:
        self.store = LocalTierStore(config, process_group, compression=compression,
                                    file_mode=file_mode)
        self._gate = make_comm(process_group, knobs.COLLECTIVE_TIMEOUT_S.get())
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardckpt-local")
        self._staging = StagingPool(lazy=False)
        self._inflight: SaveHandle | None = None
        self.warming: Any = None  # rank 0: the persistent tier's client being made (warm_up)
        self.async_save = async_save
        self.skipped: list[int] = []  # steps whose local save was skipped (previous one busy)

    @property
    def config(self) -> LocalTier:
        return self.store.config

    def due(self, step: int) -> bool:
        return self.config.due(step)

    def save(self, step: int, state: dict[str, Any], *, metrics: Mapping[str, float],
             tags: Iterable[str], golden: Any, capture_rng: bool, blocking: bool | None
             ) -> SaveHandle | None:
        """Collective: snapshot ``state`` and save it to the local tier (in the background
        unless ``blocking``). None if skipped because the previous local save is running."""
        busy = self._inflight is not None and not self._inflight.done()
        if self._gate.world_size > 1:
            busy = self._gate.any_true(busy, "local save: is the previous one still running")
        if busy:
            self.skipped.append(step)
            n = len(self.skipped)
            if _power_of_ten(n):  # the 1st, 10th, 100th...: not every step; close() sums up
                warnings.warn(f"local save of step {step} skipped: the previous local save is "
                              f"still running ({n} skipped so far; warned again at the "
                              f"{10 * n}th, all counted at close)", stacklevel=3)
            return None
        self.wait()  # the previous one is done: raise its error here, once
        blocking = (not self.async_save) if blocking is None else blocking
        extra: dict[str, Any] = {}
        staged: Any
        try:
            full = with_extras(state, capture_rng, golden, extra)
            staged = self._staging.stage(collect(full), blocking)
        except Exception as exc:  # the protocol tells every rank, nothing is written
            full, staged = dict(state), exc
        future = self._pool.submit(self._run, step, full, staged, dict(metrics), tuple(tags),
                                   extra)
        handle = SaveHandle(step, future)
        self._inflight = handle
        if blocking:
            self.wait()
        return handle

    def _run(self, step: int, state: dict[str, Any], staged: Any, metrics: dict[str, float],
             tags: tuple[str, ...], extra: dict[str, Any]) -> CheckpointInfo:
        if isinstance(staged, (Snapshot, LazySnapshot)):
            try:
                staged = staged.ready()
            except Exception as exc:
                staged = exc
        manifest = self.store.save(step, state, metrics=metrics, tags=tags, extra=extra,
                                   collected=staged)
        return CheckpointInfo.from_manifest(manifest)

    def wait(self) -> None:
        """Wait for the local save in flight; raise its error (once)."""
        handle, self._inflight = self._inflight, None
        if handle is not None and not handle.error_reported:
            handle.wait()

    def steps(self) -> list[int]:
        """This node's complete local steps."""
        return self.store.steps()

    def load(self, state: dict[str, Any], strict: bool,
             persistent_steps: Sequence[int] | PersistentSteps,
             load_persistent: Callable[[int], Mapping[str, float]], restore_rng: bool = True,
             verify_golden: bool = False) -> tuple[Candidate, dict[str, Any]]:
        """Collective: restore from the newest step recoverable from either tier
        (:func:`shardckpt.tier.recover.recover`)."""
        self.wait()
        return recover(self.store, state, strict, persistent_steps=persistent_steps,
                       load_persistent=load_persistent, restore_rng=restore_rng,
                       verify_golden=verify_golden)

    def load_for(self, manager: Any, state: dict[str, Any], strict: bool = True,
                 restore_rng: bool = True, verify_golden: bool = False) -> int:
        """Collective: ``manager.load(state)`` across tiers (issue 28). The persistent tier's
        steps and loads are the manager's own (``steps()``, ``load(step=...)``); sets
        ``manager.last_load_profile`` and returns the step restored. ``verify_golden``: each
        candidate must also reproduce its golden outputs (:mod:`.goldencheck`). The persistent
        tier is listed while the holdings are surveyed, and validated only where it can change
        the choice (:mod:`.persistentlist`)."""
        manager.wait()
        steps = PersistentSteps(manager, self.store.comm, self.warming)

        def load_persistent(step: int) -> Mapping[str, float]:
            return load_checked(manager, self.store.comm, state, step, strict, restore_rng,
                                verify_golden)

        try:
            cand, profile = self.load(state, strict, steps, load_persistent, restore_rng,
                                      verify_golden)
        finally:
            steps.close()
        manager.last_load_profile = profile
        received = self.store.comm.all_gather_json(  # the job's, for the audit record
            float(profile.get("bytes_received", 0) or 0), "load: bytes received")
        if manager.rank == 0:  # issue 32: a restore from the local tier is audited
            record_restore(manager.location, cand.step,
                           {**profile, "bytes_received": sum(received)})
        return cand.step

    def abandon_newer(self, step: int) -> None:
        """A load that did not use the local tier (``trusted_keys``) restored ``step``: this
        node's newer local steps belong to a timeline the job abandons; its leader deletes
        them, with a warning, so that a later restart never resumes from them."""
        if not self.store.is_leader:
            return
        newer = [s for s in self.store.location.list_step_dirs() if s > step]
        if newer:
            warnings.warn(f"local tier {self.store.location.display}: restored step {step} "
                          f"without the local tier (trusted_keys); deleting the newer local "
                          f"step(s) {', '.join(map(str, sorted(newer)))}, a timeline the job "
                          f"abandons", stacklevel=3)
            self.store.drop_newer(step)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
            self._staging.release()
            if self.skipped and self._gate.rank == 0:  # the same count on every rank
                logger.warning("local tier %s: %d local save(s) skipped in this run, the "
                               "previous one still running (steps %s)", self.store.location
                               .display, len(self.skipped), _steps(self.skipped))


def _power_of_ten(n: int) -> bool:
    while n % 10 == 0:
        n //= 10
    return n == 1


def _steps(steps: Sequence[int]) -> str:
    shown = [str(s) for s in steps]
    return ", ".join(shown if len(shown) <= 8 else [*shown[:3], "...", *shown[-3:]])


# -------------------------------------------------------------- the manager's thin calls
class NoLocalTier:
    """A manager without a local tier: nothing is ever due, nothing to wait for."""

    def due(self, step: int) -> bool:
        return False

    def wait(self) -> None:
        pass

    def abandon_newer(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def local_tier(config: LocalTier | None, process_group: Any, compression: str | None,
               file_mode: int | None, async_save: bool, persistent: Sequence[Any] = ()
               ) -> LocalTierRunner | NoLocalTier:
    """The manager's local tier (collective when there is one); ``ValueError`` on every rank
    if a node's path overlaps a ``persistent`` location or is shared by two nodes."""
    if config is None:
        return NoLocalTier()
    if not isinstance(config, LocalTier):
        raise TypeError("local must be a shardckpt.LocalTier or None")
    # rank 0 makes the persistent store's client while the tier's groups are created: a
    # resume then lists its step names in a few milliseconds (tier/persistentlist.py)
    warming = warm_up(persistent) if _group_rank(process_group) == 0 else None
    runner = LocalTierRunner(config, process_group, compression=compression,
                             file_mode=file_mode, async_save=async_save)
    runner.warming = warming
    store = runner.store
    try:
        check_paths(store.comm, store.location, store.node, store.node_map.nodes,
                    store.is_leader, persistent)
    except BaseException:
        runner.close()
        raise
    return runner


def _group_rank(process_group: Any) -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(process_group)
    return 0


def save_tiers(runner: LocalTierRunner | NoLocalTier, step: int, state: dict[str, Any],
               tier: str | None, save_every: int | None, metrics: Mapping[str, float],
               tags: Iterable[str], golden: Any, capture_rng: bool, blocking: bool | None
               ) -> tuple[SaveHandle | None, bool]:
    """Run the local part of ``save(step, tier=tier)``: (its handle, or None when skipped or
    not due; whether the persistent tier is to be written too)."""
    if not isinstance(runner, LocalTierRunner):
        if tier not in (None, "persistent"):
            raise ValueError(f"tier={tier!r} needs a local tier (CheckpointManager(local=...))")
        return None, True
    local, persistent = tiers_to_write(step, tier, runner.due(step), save_every)
    handle = runner.save(step, state, metrics=metrics, tags=tags, golden=golden,
                         capture_rng=capture_rng, blocking=blocking) if local else None
    return handle, persistent


def tier_steps(runner: LocalTierRunner | NoLocalTier, tier: str | None) -> list[int] | None:
    """``steps(tier="local")``: this node's complete local steps; None: the persistent tier's."""
    if tier in (None, "persistent"):
        return None
    if tier != "local":
        raise ValueError(f"tier must be 'local', 'persistent' or None, got {tier!r}")
    if not isinstance(runner, LocalTierRunner):
        raise ValueError("steps(tier='local') needs a local tier (CheckpointManager(local=...))")
    return runner.steps()


def load_checked(manager: Any, comm: Any, state: dict[str, Any], step: int, strict: bool,
                 restore_rng: bool, verify_golden: bool) -> dict[str, Any]:
    """Collective: ``manager.load(state, step=step)``, then (``verify_golden``) the golden
    replay of that step (``GoldenMismatchError`` on every rank if it differs). Returns the
    load's profile."""
    manifest: M.Manifest | None = None
    target = state
    if verify_golden:
        manifest = manager.manifest(step)
        target = with_golden(state, manifest, True)
    manager.load(target, step=step, strict=strict, restore_rng=restore_rng)
    if manifest is not None:
        golden = target.pop(GOLDEN_KEY, None)
        state.update(target)
        check_golden(comm, state, manifest, golden, f"persistent step {step}")
    return {**manager.last_load_profile, "bytes_received": 0}


def load_tiers(manager: Any, runner: LocalTierRunner | NoLocalTier, state: dict[str, Any],
               step: int | None, strict: bool, restore_rng: bool, verify_golden: bool) -> int:
    """The manager's ``load`` with a local tier and no step (:meth:`LocalTierRunner.load_for`)
    or with ``verify_golden``: without a local tier, the persistent steps newest first (only
    ``step`` when given), each restored then replayed, every rank moving on together past one
    that differs or whose data is bad (with a warning); an explicit ``step`` raises."""
    if step is None and isinstance(runner, LocalTierRunner):
        return runner.load_for(manager, state, strict, restore_rng, verify_golden)
    comm = manager._comm
    steps = [step] if step is not None else sorted(full_listing(manager, comm),
                                                  reverse=True)
    if not steps:
        raise IncompleteCheckpointError(f"{manager.location.display}: no committed checkpoint "
                                        f"to load")
    failed: list[str] = []
    for i, candidate in enumerate(steps):
        try:
            manager.last_load_profile = load_checked(manager, comm, state, candidate, strict,
                                                     restore_rng, verify_golden)
        except BAD_DATA as exc:  # every rank alike: the load and the replay agree first
            if i + 1 == len(steps):
                raise
            failed.append(str(exc))
            continue
        if failed and comm.rank == 0:
            warnings.warn(f"restored persistent step {candidate}; newer steps failed their "
                          f"load or golden replay: " + " | ".join(failed), stacklevel=3)
        return candidate
    raise AssertionError("unreachable")
