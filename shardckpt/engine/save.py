"""The collective save protocol. Every rank of the comm calls :func:`save_step` in step.

Four phases, each a method of :class:`_SaveRun`, exchanging the messages of :mod:`.messages`:

1. **plan**: every rank flattens its state and sends rank 0 a :class:`RankPlan` (or the error
   that stopped it); if no rank failed, rank 0 prepares the step directory at every location
   (so a refused save leaves nothing behind), plans who writes what, and broadcasts an
   :class:`Assignment`;
2. **write**: every rank writes its pieces to its own shard files (their headers hold the piece
   index) at every prepared location, and sends rank 0 a :class:`WriteReport`;
3. **commit**: rank 0 builds and validates the manifest and commits it (written last) at each
   location that holds every file, if at least ``min_replicas`` do;
4. **decide**: rank 0 broadcasts the :class:`Outcome`; if any rank failed at any point, nobody
   committed and every rank raises the same :class:`CollectiveError` naming the failing ranks
   and their causes (``StorageError`` when too few locations could take the save).

The writer leases rank 0 takes are :class:`~shardckpt.storage.lease.StepLease` s on the save's
exit stack: released however the save ends.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .. import knobs
from ..errors import ConcurrentWriterError, ShardckptError, StorageError
from ..format import manifest as M
from ..format.refs import referenced_bytes
from ..format.shard import Codec, checksum
from ..planning.assign import LeafSpec, assign
from ..planning.fastplan import uniform_plan
from ..planning.plancache import PlanCache
from ..planning.statedict import Collected, TensorLeaf, collect
from ..storage import Location, step_dirname
from ..storage.lease import StepLease
from ..storage.writers import may_remove
from ..warnsite import warn_user
from .badfiles import forget_step
from .comm import Comm
from .failpolicy import mark_agreed
from .failures import agree_on_state, describe, raise_failures
from .incremental import finish_manifest, load_base, pick_base, remember_manifest, remember_written
from .messages import RIVAL, STORAGE, Assignment, FileEntry, Outcome, RankPlan, WriteReport
from .pipeline import PipelineConfig
from .stepdir import SaveRequest, build_manifest, commit_all, directory, prepare_all
from .writer import PieceData, tensor_bytes, write_rank

__all__ = ["SaveOptions", "SaveRequest", "SaveResult", "agree_on_state", "describe",
           "save_step"]


@dataclass(frozen=True)
class SaveOptions:
    codec: Codec
    chunk_size: int
    files_per_rank: int
    io_threads: int
    encode_threads: int
    memory_budget: int
    nice: int = 0  # of the encoder and writer threads (engine/background.py)
    # every rank writes where rank 0 commits (False: the local tier, each node its own path):
    # then rank 0 checks, under the lease, that every file is still there before the commit
    shared_location: bool = True
    incremental: bool = False  # reuse the base step's unchanged chunks (engine/incremental.py)
    full_every: int = 0  # incremental: a full save once the newest full one is this many old

    @classmethod
    def from_knobs(cls, codec: Codec) -> SaveOptions:
        return cls(codec, knobs.CHUNK_SIZE.get(), knobs.FILES_PER_RANK.get(),
                   knobs.IO_THREADS.get(), knobs.ENCODE_THREADS.get(),
                   knobs.MEMORY_BUDGET.get())


@dataclass(frozen=True)
class SaveResult:
    """The manifest committed (rank 0; None elsewhere) and this rank's phase profile: wall
    seconds per phase, ``<phase>_cpu`` seconds of this thread's CPU (which, unlike wall time,
    does not grow when many ranks share a few cores), and a few counts."""

    manifest: M.Manifest | None
    profile: dict[str, float]


class _Clock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t, self._cpu = time.perf_counter(), time.thread_time()

    def lap(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._t
        self.laps[f"{name}_cpu"] = self.laps.get(f"{name}_cpu", 0.0) + cpu - self._cpu
        self._t, self._cpu = now, cpu


def leaf_spec(leaf: TensorLeaf, world_size: int) -> LeafSpec:
    digest = None
    if world_size > 1 and not leaf.sharded and leaf.alias_of is None:
        digest = checksum(tensor_bytes(leaf.data))
    return LeafSpec(leaf.key, leaf.dtype, leaf.shape, leaf.offsets, leaf.lengths, leaf.sharded,
                    leaf.alias_of, digest)


def save_step(comm: Comm, locations: Sequence[Location], state: dict[str, Any],
              req: SaveRequest, opts: SaveOptions,
              collected: Collected | BaseException | None = None,
              min_replicas: int = 1, plan_cache: PlanCache | None = None) -> SaveResult:
    """Run the protocol on this rank (see the module).

    ``collected`` is the state already flattened and snapshotted (async saves), or the exception
    that doing so raised: it is reported to every rank instead of leaving them waiting.
    """
    with contextlib.ExitStack() as stack:
        run = _SaveRun(comm, list(locations), req, opts, min_replicas,
                       plan_cache if plan_cache is not None else PlanCache(), stack)
        try:
            assignment, collected = run.plan(state, collected)
            report = run.write(assignment, collected)
            outcome = run.commit(assignment, report)
            return run.decide(outcome)
        except BaseException as exc:
            if run.agreed:  # raised on every rank alike (engine/failpolicy.py)
                mark_agreed(exc)
            raise


class _SaveRun:
    """One save on one rank: what the phases share."""

    def __init__(self, comm: Comm, locations: list[Location], req: SaveRequest,
                 opts: SaveOptions, min_replicas: int, cache: PlanCache,
                 stack: contextlib.ExitStack) -> None:
        self.comm, self.locations, self.req, self.opts = comm, locations, req, opts
        self.min_replicas, self.cache, self.stack = min_replicas, cache, stack
        self.step_dir = step_dirname(req.step)
        self.clock = _Clock()
        self.error: BaseException | None = None  # this rank's first error
        self.leases: dict[int, StepLease] = {}  # rank 0: the writer lease at each location
        self.loc_failures: dict[int, str] = {}  # rank 0: locations that missed the save
        self.plans: list[RankPlan] = []  # rank 0: every rank's plan
        self.tensors: dict[str, M.TensorEntry] = {}  # rank 0: the manifest's tensor entries
        self.trees: list[Any] = []  # rank 0: every rank's state tree
        self.manifest: M.Manifest | None = None
        self.base: M.Manifest | None = None  # rank 0: the base of an incremental save
        self.counts: dict[str, float] = {}
        self.agreed = False  # a failure broadcast to every rank is being raised
        self.cause = ""  # rank 0: why the save was refused before writing (STORAGE, RIVAL)

    def plan(self, state: dict[str, Any], collected: Collected | BaseException | None
             ) -> tuple[Assignment, Collected]:
        """Phase 1: flatten, gather the plans on rank 0, prepare, plan, broadcast."""
        rank, world = self.comm.rank, self.comm.world_size
        specs: list[LeafSpec] = []
        prepared: list[int] = []
        try:
            if isinstance(collected, BaseException):
                error, collected = collected, None
                raise error
            if collected is None:
                collected = collect(state)
            specs = [leaf_spec(leaf, world) for leaf in collected.leaves]
        except Exception as exc:
            self.error = exc
        tree = collected.tree if isinstance(collected, Collected) else None
        mine = RankPlan(describe(self.error) if self.error else None, None,  # tree: packed
                        self.cache.outgoing(specs, tree), self.req.step)
        self.counts["leaves_sent"] = float(mine.leaves["leaves"] is not None)
        # Rank 0 alone sees every rank's leaves (only when their structure changed), plans, and
        # sends each rank its writes as index runs: what a rank receives does not grow with
        # the world.
        self.clock.lap("collect")
        gathered = self.comm.gather_json(mine.to_json(), "save: gather plans")
        msg: dict[str, Any] = {}
        if rank == 0:
            assert gathered is not None
            self.plans = [p if p.step == self.req.step or p.error else replace(
                p, error=f"saves step {p.step} while rank 0 saves step {self.req.step}: every "
                         f"rank must call save() with the same step, in the same order")
                for p in map(RankPlan.from_json, gathered)]
            if not any(p.error for p in self.plans):  # a refused save prepares nothing
                prepared = self._prepare()
            msg = self._assign(prepared).to_json()
        assignment = Assignment.from_json(self.comm.broadcast_json(msg, "save: write plan"))
        self.cache.ack(assignment.known, rank)
        if assignment.failures:
            self.agreed = True
            refused = f"save of step {self.req.step} refused, nothing was written"
            if assignment.cause:  # a location's failure, or another writer: not the state's
                self._raise_cause(assignment.cause == RIVAL, refused, assignment.failures)
            raise_failures(f"{refused}: state collection failed", assignment.failures,
                           self.error, world)
        assert isinstance(collected, Collected)
        return assignment, collected

    def _raise_cause(self, rival: bool, what: str, failures: dict[int, str]) -> None:
        """Every rank raises the same: ``ConcurrentWriterError`` (another writer) or
        ``StorageError`` (a location), naming the cause; one process raises its own error."""
        if self.comm.world_size == 1 and isinstance(self.error, StorageError):
            raise self.error
        text = f"{what}: " + "; ".join(failures.values())
        raise (ConcurrentWriterError(text) if rival else StorageError(text)) from self.error

    def _prepare(self) -> list[int]:
        """Rank 0: lease and prepare the step directory at each location; a failure is rank
        0's, reported to every rank with the plan (its cause: the storage, another writer).
        A refused save leaves no step directory it made behind."""
        prepared: list[int] = []
        try:
            prepared, self.loc_failures = prepare_all(self.locations, self.step_dir,
                                                      self.leases, self.stack)
            if len(prepared) < self.min_replicas:
                rival = [why for why in self.loc_failures.values()
                         if why.startswith(ConcurrentWriterError.__name__)]
                if rival:  # another writer: one error type, whatever else failed
                    raise ConcurrentWriterError(f"step {self.req.step}: " + "; ".join(rival))
                raise StorageError(f"step {self.req.step}: only {len(prepared)} of "
                                   f"{len(self.locations)} locations are writable (min_replicas"
                                   f"={self.min_replicas}): " + "; ".join(
                                       self.loc_failures.values()))
            return prepared
        except Exception as exc:
            self.error = exc
            self.cause = RIVAL if isinstance(exc, ConcurrentWriterError) else \
                STORAGE if isinstance(exc, StorageError) else ""
            self.plans[0] = replace(self.plans[0], error=describe(exc))
            for i in prepared:  # directories made for nothing: gone again (never a rival's)
                self._remove_step_dir(i)
            return []

    def _remove_step_dir(self, i: int) -> None:
        """Remove this save's step directory at location ``i``, unless another writer holds or
        committed it there."""
        loc, lease = self.locations[i], self.leases.get(i)
        if may_remove(loc, self.step_dir, lease.token if lease else None, M.MANIFEST_NAME):
            with contextlib.suppress(ShardckptError):
                loc.remove_tree(self.step_dir)

    def _assign(self, prepared: list[int]) -> Assignment:
        """Rank 0: the write plan (reused while every rank's structure and digests are)."""
        failures = {r: p.error for r, p in enumerate(self.plans) if p.error}
        writes: list[M.Ranges] = []
        parts = [dict(p.leaves) for p in self.plans]
        if not failures:
            try:
                resolved = self.cache.resolve_compact(parts)
                self.trees = self.cache.trees_of(parts)
                key = self.cache.plan_key(parts)
                self.counts["plan_reused"] = float(key == self.cache.key)
                fast = None if key == self.cache.key else \
                    uniform_plan(resolved, self.comm.world_size)  # planning/fastplan.py
                if key == self.cache.key:
                    self.tensors, writes = self.cache.plan
                elif fast is not None:
                    self.tensors, writes = fast[0], list(fast[1])
                    self.cache.key, self.cache.plan = key, (self.tensors, writes)
                else:
                    all_specs = resolved.specs()
                    plan = assign(all_specs)
                    self.tensors = directory(all_specs, plan)
                    for r, rank_specs in enumerate(all_specs):
                        index_of = {spec.key: i for i, spec in enumerate(rank_specs)}
                        writes.append(M.to_ranges(index_of[k] for k in plan.writes[r]))
                    self.cache.key, self.cache.plan = key, (self.tensors, writes)
            except Exception as exc:
                self.error = exc
                failures = {0: "planning: " + describe(exc)}
                self.cache.specs.clear()
                self.cache.key = self.cache.plan = None
        if self.opts.incremental and not failures:
            self.base = pick_base([self.locations[i] for i in prepared], self.req.step,
                                  self.opts.full_every, self.stack)
        return Assignment(failures, uuid.uuid4().hex, tuple(prepared), tuple(writes),
                          None if failures else self.cache.known(self.comm.world_size),
                          self.cause if failures else "",
                          self.base.step if self.base is not None else None,
                          self.base.save_id if self.base is not None else "")

    def write(self, assignment: Assignment, collected: Collected) -> WriteReport:
        """Phase 2: write this rank's pieces to every prepared location; report to rank 0."""
        rank = self.comm.rank
        targets = [(i, self.locations[i]) for i in assignment.prepared]
        report = WriteReport()
        try:
            todo = [PieceData(leaf.key, leaf.dtype, leaf.offsets, leaf.lengths, leaf.data)
                    for leaf in (collected.leaves[i] for i in M.expand(assignment.writes[rank]))]
            for _, loc in targets:  # rank 0 cleared the directory: old notes of it are void
                forget_step(loc.display, self.step_dir)
                if rank != 0:
                    loc.makedirs(self.step_dir)
            opts = self.opts
            config = PipelineConfig.plan(opts.codec, opts.chunk_size, opts.memory_budget,
                                         opts.files_per_rank)
            base = None if assignment.base is None else load_base(
                targets[0][1], assignment.base, rank, ((p.key, p.offsets, p.lengths) for p in todo),
                assignment.base_id)
            self.clock.lap("plan")
            written = write_rank(targets, self.step_dir, todo, save_id=assignment.save_id,
                                 step=self.req.step, rank=rank, config=config,
                                 nfiles=opts.files_per_rank, threads=opts.io_threads,
                                 encoders=opts.encode_threads, nice=opts.nice, base=base)
            if opts.incremental:  # the next save's base table (engine/incremental.py)
                remember_written(assignment.save_id, rank, self.req.step, base, written)
            report = WriteReport(None, tuple(
                FileEntry(w.record.name, w.record.nbytes, w.record.header_offset,
                          w.record.header_xxh3, tuple(w.stored_at)) for w in written),
                {i: m for w in written for i, m in w.failures.items()},
                tuple((s, f, n) for w in written
                      for (s, f), n in referenced_bytes(w.pieces).items()))
        except Exception as exc:
            self.error = exc
            report = WriteReport(describe(exc))
        self.clock.lap("write")
        return report

    def commit(self, assignment: Assignment, report: WriteReport) -> Outcome:
        """Phase 3: gather the reports; rank 0 commits where every file is, if enough are."""
        gathered = self.comm.gather_json(report.to_json(), "save: gather reports")
        if self.comm.rank != 0:
            return Outcome(False)
        assert gathered is not None
        reports = [WriteReport.from_json(r) for r in gathered]
        failures = {r: rep.error for r, rep in enumerate(reports) if rep.error}
        good = [i for i in assignment.prepared
                if all(i in f.stored_at for rep in reports for f in rep.files)]
        for rep in reports:
            self.loc_failures.update(rep.loc_failures)
        storage = rival = False
        if not failures and len(good) < self.min_replicas:
            failures = {0: f"only {len(good)} of {len(self.locations)} locations stored every "
                           f"file (min_replicas={self.min_replicas}): " + "; ".join(
                               f"{self.locations[i].display}: {m}"
                               for i, m in self.loc_failures.items())}
            storage = True
        if not failures:
            try:
                manifest = finish_manifest(build_manifest(
                    self.req, assignment.save_id, self.comm.world_size,
                    self.trees, self.tensors, reports),
                    self.base, (r for rep in reports for r in rep.refs))
                committed, commit_failures, manifest, data = commit_all(
                    self.locations, good, self.step_dir, manifest, self.min_replicas,
                    self.leases, check_files=self.opts.shared_location)
                self.counts["manifest_bytes"] = len(data)
                self.loc_failures.update(commit_failures)
                if committed:
                    self.manifest = manifest
                    if self.opts.incremental:  # the next save's base, not parsed again
                        remember_manifest([self.locations[i] for i in committed], manifest,
                                          data)
                else:
                    storage = True
                    failures = {0: f"commit succeeded at fewer than {self.min_replicas} "
                                   "locations: " + "; ".join(commit_failures.values())}
            except Exception as exc:
                self.error = exc
                rival = isinstance(exc, ConcurrentWriterError)
                failures = {0: "commit: " + describe(exc)}
        self._clean_up(bool(failures))
        return Outcome(not failures, failures, storage, rival)

    def _clean_up(self, failed: bool) -> None:
        """Rank 0: remove the directories of a failed save, and the copies that missed it."""
        for i, loc in enumerate(self.locations):
            if i in self.loc_failures and not loc.is_local:
                # Don't wait on a failing remote's retries: its partial, uncommitted directory
                # is invisible, and prune reaps it after its grace period.
                if i in self.leases:
                    self.leases[i].abandon()
                continue
            if failed or i in self.loc_failures:
                self._remove_step_dir(i)
        for i, m in self.loc_failures.items():
            if not failed:
                warn_user(f"step {self.req.step}: location {self.locations[i].display} "
                          f"missed this checkpoint (degraded): {m}")

    def decide(self, outcome: Outcome) -> SaveResult:
        """Phase 4: every rank learns the outcome; the same error everywhere on failure."""
        self.clock.lap("commit")  # rank 0: merge the reports, build, check and commit
        outcome = Outcome.from_json(self.comm.broadcast_json(outcome.to_json(),
                                                             "save: commit decision"))
        self.clock.lap("decision")
        if not outcome.ok:
            self.agreed = True
            if outcome.rival:
                self._raise_cause(True, "save failed", dict(outcome.failures))
            if outcome.storage:
                raise StorageError("save failed: " + "; ".join(outcome.failures.values())) \
                    from self.error
            raise_failures("save failed during write/commit", outcome.failures, self.error,
                           self.comm.world_size)
        return SaveResult(self.manifest, {**self.clock.laps, **self.counts})
