"""``CheckpointManager``: the public entry point that ties storage, planning and engine together.

``save`` and ``load`` are collective: every rank of the process group calls them with the same
arguments, in the same order. Construction is collective too when torch.distributed is
initialized (it creates a private gloo group for the checkpoint protocol).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from . import catalog, exit_wait, knobs
from .audit import SaveAuditor
from .engine.background import background_options
from .engine.comm import make_comm, release_comm
from .engine.failpolicy import FailurePolicy, check_on_error
from .engine.failures import describe
from .engine.incremental import incremental_options
from .engine.index import full_manifest
from .engine.lazy import LazySnapshot
from .engine.reader import CheckpointReader
from .engine.readonce import check_read_once
from .engine.resume import load_state
from .engine.save import SaveOptions, SaveRequest, agree_on_state, save_step
from .engine.saveargs import check_manager_args, check_save_args
from .engine.snapshot import Snapshot, StagingPool
from .errors import ShardckptError
from .extras import with_extras
from .format import manifest as M
from .format.shard import Codec
from .handles import CheckpointInfo, SaveHandle
from .observe import SaveEvent, SaveObserver, SaveTracker, check_callbacks, check_metrics_path
from .planning.plancache import PlanCache
from .planning.statedict import collect
from .policy import RetentionPolicy
from .prune import DEFAULT_LOCK_WAIT_S, BackgroundPrune, PruneReport
from .prune_all import prune_locations
from .repro import collect_provenance, host_record
from .sign.trusted import trusted_keys_of, trusted_load
from .storage import open_location, step_dirname
from .storage.location import options_for
from .tier.runner import LocalTier, LocalTierRunner, load_tiers, local_tier, save_tiers, tier_steps
from .version import __version__


class CheckpointManager:
    """Saves and restores training state under ``root``. See ``shared/INTERFACE.md``."""

    def __init__(self, root: str, replicas: Iterable[str] = (), min_replicas: int | None = None,
                 retention: RetentionPolicy | None = None, save_every: int | None = None,
                 async_save: bool = True, compression: str | None = None,
                 storage_options: Mapping[str, Mapping[str, Any]] | None = None,
                 process_group: Any = None, *, snapshot: str = "eager", on_error: str = "raise",
                 config: Mapping[str, Any] | None = None,
                 data: Mapping[str, Any] | None = None, capture_rng: bool = True,
                 metrics_path: str | os.PathLike[str] | None = None,
                 callbacks: Iterable[Callable[[SaveEvent], Any]] | None = (),
                 file_mode: int | None = None, local: LocalTier | None = None,
                 trusted_keys: Iterable[str] = (), incremental: bool = False,
                 full_every: int = 0) -> None:
        urls = [str(root), *(str(r) for r in replicas)]
        self.min_replicas = check_manager_args(urls, min_replicas, save_every, retention, snapshot)
        check_on_error(on_error)
        metrics_path = check_metrics_path(metrics_path)
        save_callbacks = check_callbacks(callbacks)
        # file_mode: the exact mode of new local files (dirs: + x where r, rwx for the owner);
        # None: what the umask gives. World-writable: ValueError (see shardckpt.storage.location)
        self.locations = [open_location(u, options_for(u, storage_options), file_mode=file_mode)
                          for u in urls]
        self.location = self.locations[0]
        self._finder = catalog.Finder(self.locations)  # steps, manifests, locations down
        self._trusted = trusted_keys_of(trusted_keys)  # load() refuses unsigned (issue 32)
        # this rank's phase profile of the last save / load (seconds, counts): for benchmarks
        self.last_save_profile: dict[str, float] = {}
        self.last_load_profile: dict[str, float] = {}
        self.retention = retention
        self.save_every = save_every
        self.async_save = async_save
        self._codec = Codec(compression)
        self._incremental = incremental_options(incremental, full_every)  # engine/incremental.py
        self._comm = make_comm(process_group, knobs.COLLECTIVE_TIMEOUT_S.get())
        self._local = local_tier(local, process_group, compression, file_mode, async_save,
                                 self.locations)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardckpt-save")
        self._pending: list[SaveHandle] = []
        self._lock = threading.Lock()
        # eager: everything is copied inside save(); lazy (opt-in, with a contract: see
        # engine/lazy.py): parameters and optimizer state are copied while training goes on
        self._staging = StagingPool(lazy=snapshot == "lazy")
        self._failures = FailurePolicy(on_error, self.world_size)  # on_error, failed_saves
        self._plan_cache = PlanCache()
        self.capture_rng = capture_rng
        self._config, self._data = config, data
        self._provenance: dict[str, Any] | None = None
        self._closed = False
        self._retention_runner = BackgroundPrune(lambda: self._prune(False, lock_wait=0.0),
                                                 on_failure=lambda: self._observer.publish())
        # rank 0 logs each save, keeps the metrics textfile and calls the callbacks
        self._observer = SaveObserver(enabled=self.rank == 0, root=self.location.display,
                                      world_size=self.world_size, metrics_path=metrics_path,
                                      callbacks=(*save_callbacks, SaveAuditor(
                                          self.location, lambda: self._provenance)), urls=urls)
        self._observer.publish_initial()
        exit_wait.track(self)  # a save still in flight when the script ends is finished first

    @property
    def failed_saves(self) -> list[tuple[int, BaseException]]:  # (step, error), oldest first
        return self._failures.failed_saves

    @property
    def rank(self) -> int:
        return self._comm.rank

    @property
    def world_size(self) -> int:
        return self._comm.world_size

    # -------------------------------------------------------------------------------- save
    def should_save(self, step: int) -> bool:
        return self._local.due(step) or bool(self.save_every and step % self.save_every == 0)

    def save(self, step: int, state: dict[str, Any], metrics: Mapping[str, float] | None = None,
             tags: Iterable[str] = (), golden: Any = None,
             blocking: bool | None = None, tier: str | None = None) -> SaveHandle | None:
        """Collective. Snapshot ``state`` and write it as checkpoint ``step``.

        Returns once the state is snapshotted (``async_save``) or committed (``blocking=True``).
        A save issued while another is in flight first waits for that one. An earlier background
        save's failure is raised here once this save has started (``on_error="raise"``), or is
        warned about and kept in ``failed_saves`` (``"warn"``). A state that cannot be
        checkpointed (an unsupported type, a reserved key) raises here in one process and, in a
        job, on every rank: here for a blocking save; for an async one, which never waits here
        for the other ranks, from every rank's handle (or the next ``save``, ``wait``,
        ``close``), with a warning here on the rank at fault. Nothing is written. On rank 0, once
        the save is committed or has failed, it is logged (logger ``shardckpt``), the
        ``metrics_path`` file is rewritten and the ``callbacks`` get a ``SaveEvent``.
        """
        t0 = time.monotonic()  # the caller's stall is measured from here to the return
        self._check_open()
        metrics, tags = check_save_args(step, state, metrics, tags, golden)
        local, persistent = save_tiers(self._local, step, state, tier, self.save_every, metrics,
                                       tags, golden, self.capture_rng, blocking)  # issue 28
        if not persistent:
            return local
        with self._lock:  # a persistent save never waits for a local one
            pending, self._pending = self._pending, []
        previous, agreed = self._failures.settle(pending)
        if previous is not None and not agreed:  # an outcome the ranks may not share
            raise previous
        self._failures.check_limit(step)  # raises on every rank alike
        extra: dict[str, Any] = {"shardckpt_version": __version__,
                                 "provenance": self._provenance_record()}
        blocking = (not self.async_save) if blocking is None else blocking
        staged: Any = None
        error: Exception | None = None
        try:
            state = with_extras(state, self.capture_rng, golden, extra)
            # Flattening checks every value (type, key path): a blocking save writes straight
            # from the live tensors, an async one from a snapshot of them.
            staged = self._staging.stage(collect(state), blocking, state)
        except Exception as exc:
            error = exc
        req = SaveRequest(step, metrics, tags, extra)
        tracker = self._observer.start(step, metrics=metrics, tags=tags, blocking=blocking, t0=t0)
        try:
            if blocking or self.world_size == 1:
                agree_on_state(self._comm, step, error)  # raises on every rank if one failed
        except BaseException as exc:
            if isinstance(staged, LazySnapshot):  # this rank's copy had begun: stop it
                staged.cancel()
            tracker.failed(exc)
            tracker.returned()
            raise
        if error is not None:  # async, in a job: no collective here (it would wait for the
            # slowest rank); the protocol carries the error, and every rank's handle raises it
            warnings.warn(f"save of step {step} will fail on every rank: the state of rank "
                          f"{self.rank} cannot be checkpointed: {describe(error)}", stacklevel=2)
            staged = error
        tracker.submitted()
        try:
            future = self._pool.submit(self._run_save, req, state, staged, tracker, not blocking)
            handle = SaveHandle(step, future)
            with self._lock:
                self._pending.append(handle)
            if blocking:
                self._wait(strict=True)  # a blocking save always raises
        finally:
            tracker.returned()  # the event goes out once this and the outcome are both known
        if previous is not None:
            raise previous
        return handle

    def _provenance_record(self) -> dict[str, Any]:
        """Collected once per manager, at the first save (after the user's set_determinism)."""
        if self._provenance is None:
            hosts = self._comm.all_gather_json(host_record(), "save: gather hosts")
            try:
                record = collect_provenance(world_size=self.world_size, config=self._config,
                                            data=self._data)
            except Exception as exc:  # provenance must never stop a save
                record = {"error": f"{type(exc).__name__}: {exc}"}
            self._provenance = {**record, "hosts": hosts}
        return self._provenance

    def _run_save(self, req: SaveRequest, state: dict[str, Any], collected: Any,
                  tracker: SaveTracker | None = None, background: bool = False
                  ) -> CheckpointInfo | None:
        opts = replace(SaveOptions.from_knobs(self._codec), **self._incremental)
        if background:  # async: training runs beside it (engine/background.py)
            opts = background_options(opts)
        try:
            if isinstance(collected, (Snapshot, LazySnapshot)):  # lazy: the copy runs here
                try:
                    collected = collected.ready()
                except Exception as exc:  # reported to every rank by the protocol
                    collected = exc
            if tracker is not None:
                tracker.ready()
                # when save() was called and when the write began, for `shardckpt report`
                req = replace(req, extra={**req.extra, "timing": tracker.manifest_timing()})
            result = save_step(self._comm, self.locations, state, req, opts, collected,
                               self.min_replicas, self._plan_cache)
            manifest, self.last_save_profile = result.manifest, result.profile
        except BaseException as exc:
            if tracker is not None:
                tracker.failed(exc)
            raise
        if tracker is not None:
            tracker.committed(manifest.nbytes if manifest is not None else 0,
                              manifest.extra.get("locations", ()) if manifest is not None else (),
                              bool(manifest.extra.get("degraded")) if manifest is not None
                              else False, self.world_size)
        if manifest is None:
            return None
        self._finder.manifests[manifest.step] = manifest
        if self.retention is not None and self.rank == 0:
            self._retention_runner.request()  # on its own thread: pruning never delays a save
        return CheckpointInfo.from_manifest(manifest)

    def wait(self) -> None:
        """Wait for every in-flight save (both tiers); raise the first error among them (under
        ``on_error="warn"`` only one the ranks may not share: see ``failed_saves``)."""
        self._wait()
        self._local.wait()

    def _wait(self, strict: bool = False) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        first, _ = self._failures.settle(pending, strict)  # an error surfaces once, first place
        if first is not None:
            raise first

    # -------------------------------------------------------------------------------- query
    def steps(self, tier: str | None = None) -> list[int]:
        """Committed steps, ascending (a step counts once its manifest is present and valid).

        Works from the locations that answer: an unreachable replica is skipped, with one
        warning (again only once it has come back and gone away again). A step whose manifest
        is present but corrupt or unreadable everywhere is left out, with a warning.
        """
        local = tier_steps(self._local, tier)  # tier="local": this node's local steps
        return self._finder.committed() if local is None else local

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def manifest(self, step: int, *, pieces: bool = False) -> M.Manifest:
        """The validated manifest of ``step``; with ``pieces=True`` every tensor's pieces too,
        read from the headers of all its shard files (coverage checked)."""
        manifest = self._finder.manifest(step)
        if pieces:
            return full_manifest(CheckpointReader(self._finder.survey().reachable,
                                                  step_dirname(step), manifest))
        return manifest

    def info(self, step: int) -> CheckpointInfo:
        from .refcheck import untrusted_targets  # incremental: a base without a valid manifest
        m = self.manifest(step)
        return CheckpointInfo.from_manifest(m, untrusted_targets(self.locations, m,
                                                                 self._finder.manifests))

    # -------------------------------------------------------------------------------- load
    def load(self, state: dict[str, Any], step: int | None = None, strict: bool = True, *,
             restore_rng: bool = True, verify_golden: bool = False) -> int:
        """Collective. Restore ``state`` in place from ``step`` (default: the latest committed).

        Each rank's RNG states (Python, NumPy, torch, CUDA) are restored too when the checkpoint
        was saved at this world size (``restore_rng=False`` leaves them alone). Nothing of
        ``state`` changes unless every rank's keys, shapes, dtypes and destinations fit. Without
        ``step``, a newest step whose data is bad is skipped on every rank, with a warning, and
        moved aside by rank 0 once an older step has loaded (see :mod:`.engine.resume`).
        ``verify_golden``: replay the golden batches after the restore; fall back if they differ.
        """
        self._check_open()
        check_read_once(self._comm)  # a bad SHARDCKPT_READ_ONCE: ValueError on every rank
        if self._trusted:  # signature and SHA-256 checked first; never the local tier
            if verify_golden:
                raise ValueError("load(verify_golden=True) with trusted_keys is not supported")
            step = trusted_load(self, state, step, strict, restore_rng, self._trusted)
            self._local.abandon_newer(step)  # the local tier is not used: its newer steps go
            return step
        if verify_golden or (step is None and isinstance(self._local, LocalTierRunner)):
            return load_tiers(self, self._local, state, step, strict, restore_rng, verify_golden)
        self.wait()
        step, self.last_load_profile = load_state(self._comm, self._finder, state, step, strict,
                                                  restore_rng, knobs.IO_THREADS.get())
        return step

    # -------------------------------------------------------------------------------- prune
    def prune(self, dry_run: bool = False) -> PruneReport:
        """Apply ``retention`` now at every location, each from its own listing.

        Deletes what the policy drops (manifest first, then data) and reaps uncommitted step
        directories left untouched for an hour with no live writer. Not collective: only rank 0
        changes anything (other ranks get a dry-run report). Returns the root's report, with
        the replicas' in ``replicas``. Waits up to a minute for another prune of a location to
        finish, then raises ``PruneLockedError``. ``ValueError`` (naming the metrics that
        exist) if ``keep_best`` ranks by a metric no checkpoint has, before anything is deleted.
        """
        if not isinstance(dry_run, bool):  # prune(RetentionPolicy(...)) would be a dry run
            raise TypeError(f"prune(dry_run=) takes a bool, got {type(dry_run).__name__}; the "
                            f"policy is CheckpointManager(retention=...)")
        report = self._prune(dry_run or self.rank != 0, DEFAULT_LOCK_WAIT_S, "raise")
        for step in report.deleted:
            self._finder.manifests.pop(step, None)
        return report

    def _prune(self, dry_run: bool, lock_wait: float, unknown_metric: str = "warn"
               ) -> PruneReport:
        # a copy of the manifests: the save thread may add to them meanwhile
        return prune_locations(self.locations, self.retention or RetentionPolicy(),
                               dict(self._finder.manifests), dry_run, lock_wait, unknown_metric)

    # -------------------------------------------------------------------------------- close
    def _check_open(self) -> None:
        if self._closed:
            raise ShardckptError("CheckpointManager is closed")

    def close(self) -> None:
        """Wait for in-flight saves, then release threads. Raises a pending save's error."""
        if self._closed:
            return
        exit_wait.untrack(self)
        try:
            self.wait()
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)
            self._staging.release()
            self._retention_runner.close()  # the last commit's retention finishes first
            self._local.close()
            release_comm(self._comm)  # its gloo group dies now, not at interpreter teardown

    def _finish_at_exit(self, timeout: float) -> None:
        """The interpreter is exiting and ``close()`` was not called: let the saves in flight
        (and the retention they started) finish, for at most ``timeout`` seconds, then close."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        with self._lock:
            pending, self._pending = self._pending, []
        if not exit_wait.wait_for_saves(self.location.display, pending, timeout):
            return  # still writing: the staging buffers stay, the thread may yet finish
        if not self._retention_runner.close(max(0.0, deadline - time.monotonic())):
            exit_wait.logger.error("shardckpt: retention at %s was still running after %.0f s "
                                   "(SHARDCKPT_EXIT_WAIT_S) at exit", self.location.display,
                                   timeout)
        self._closed = True
        self._pool.shutdown(wait=False)
        self._staging.release()
        release_comm(self._comm)

    def _before_teardown(self, group: Any) -> None:
        """``destroy_process_group(group)`` was called (see :func:`exit_wait.guard_teardown`):
        saves in flight finish first, on the group the protocol runs on; raises their error."""
        if not self._closed and (group is None or group is getattr(self._comm, "group", None)):
            try:
                self.wait()
            finally:  # ours is destroyed here or next: never left to interpreter teardown
                release_comm(self._comm, destroy=group is None)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
