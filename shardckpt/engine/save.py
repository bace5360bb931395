"""The collective save protocol. Every rank of the comm calls :func:`save_step` in step.

1. every rank flattens its state (tree + tensor leaves) and sends rank 0 what it holds;
2. rank 0 computes the write plan and tells each rank which of its leaves it writes;
3. every rank writes its pieces to its own shard files (their headers hold the piece index);
4. rank 0 gathers the file records, builds and validates the manifest, and commits it
   (written last);
5. rank 0 broadcasts the outcome; if any rank failed at any point, nobody commits and every rank
   raises the same :class:`CollectiveError` naming the failing ranks and their causes.
"""

from __future__ import annotations

import contextlib
import time
import traceback
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from .. import knobs
from ..catalog import aside_dirname, read_manifest
from ..errors import CollectiveError, CorruptCheckpointError, ShardckptError, StorageError
from ..format import manifest as M
from ..format.shard import Codec, FileRecord, Piece, checksum
from ..planning import tree as T
from ..planning.assign import LeafSpec, WritePlan, assign
from ..planning.plancache import PlanCache
from ..planning.statedict import Collected, TensorLeaf, collect
from ..storage import Location, step_dirname
from ..storage.lease import (
    abandon_writer_lease,
    hold_writer_lease,
    releases_writer_leases,
    writer_lease,
)
from ..storage.probe import Unreachable, reachable_all
from .comm import GlooComm, LocalComm
from .pipeline import PipelineConfig
from .writer import PieceData, tensor_bytes, write_rank


@dataclass(frozen=True)
class SaveOptions:
    codec: Codec
    chunk_size: int
    files_per_rank: int
    io_threads: int
    encode_threads: int
    memory_budget: int
    nice: int = 0  # of the encoder and writer threads (engine/background.py)

    @classmethod
    def from_knobs(cls, codec: Codec) -> SaveOptions:
        return cls(codec, knobs.CHUNK_SIZE.get(), knobs.FILES_PER_RANK.get(),
                   knobs.IO_THREADS.get(), knobs.ENCODE_THREADS.get(),
                   knobs.MEMORY_BUDGET.get())


@dataclass(frozen=True)
class SaveRequest:
    step: int
    metrics: Mapping[str, float]
    tags: tuple[str, ...]
    extra: Mapping[str, Any]


last_profile: dict[str, float] = {}
"""Seconds spent in each phase of this process's last :func:`save_step` (for benchmarks)."""


class _Clock:
    """Wall seconds per phase, and ``<phase>_cpu`` seconds of this thread's CPU (which, unlike
    wall time, does not grow when many ranks share a few cores)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t, self._cpu = time.perf_counter(), time.thread_time()

    def lap(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._t
        self.laps[f"{name}_cpu"] = self.laps.get(f"{name}_cpu", 0.0) + cpu - self._cpu
        self._t, self._cpu = now, cpu


def describe(exc: BaseException) -> str:
    """One line naming an error; the traceback's last frame says where it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}"[:1000] + where


def _raise_failures(stage: str, failures: dict[int, str], local: BaseException | None,
                    world_size: int = 2) -> None:
    if world_size == 1 and local is not None:  # one process: the error itself ...
        if isinstance(local, OSError):  # ... storage failures as the contract's StorageError
            raise StorageError(describe(local)) from local
        raise local  # (a TypeError naming the key path, say)
    lines = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failures.items()))
    err = CollectiveError(f"save failed during {stage} on rank(s) {sorted(failures)}: {lines}",
                          failures)
    raise err from local


def leaf_spec(leaf: TensorLeaf, world_size: int) -> LeafSpec:
    digest = None
    if world_size > 1 and not leaf.sharded and leaf.alias_of is None:
        digest = checksum(tensor_bytes(leaf.data))
    return LeafSpec(leaf.key, leaf.dtype, leaf.shape, leaf.offsets, leaf.lengths, leaf.sharded,
                    leaf.alias_of, digest)


def prepare_step_dir(location: Location, step_dir: str) -> None:
    """Rank 0, before anyone writes: take the writer lease (so that no prune deletes or reaps
    the directory while the save runs; it lasts until :func:`save_step` returns or raises),
    refuse a committed step, clear a stale partial one."""
    hold_writer_lease(location, step_dir)
    if location.size(f"{step_dir}/{M.MANIFEST_NAME}") is not None:
        step = int(step_dir.removeprefix("step-"))
        try:
            read_manifest(location, step)
        except CorruptCheckpointError as exc:  # not committed, but kept: moved out of the way
            aside = aside_dirname(step, time.time())
            location.move_tree(step_dir, aside)
            warnings.warn(f"{location.display}/{step_dir}: manifest corrupt ({exc}); moved "
                          f"aside to {aside} and saving step {step} afresh", stacklevel=2)
        else:
            raise ValueError(f"step directory {location.display}/{step_dir} is already "
                             f"committed; a committed checkpoint is never overwritten")
    if location.listdir(step_dir):
        location.remove_tree(step_dir)
    location.makedirs(step_dir)


def writers_of(plan: WritePlan) -> dict[str, list[int]]:
    """The ranks writing each key, ascending."""
    out: dict[str, list[int]] = {}
    for rank in sorted(plan.writes):
        for key in plan.writes[rank]:
            out.setdefault(key, []).append(rank)
    return out


def directory(specs: list[list[LeafSpec]], plan: WritePlan) -> dict[str, M.TensorEntry]:
    """The manifest's tensor entries: dtype, shape and writing ranks (no pieces: those are in
    the writers' shard headers). Checks that the boxes the plan writes tile every tensor."""
    spec_of = [{s.key: s for s in rank_specs} for rank_specs in specs]
    writers = writers_of(plan)
    tensors: dict[str, M.TensorEntry] = {}
    for key, kind in sorted(plan.kind.items()):
        if kind == "alias":
            tensors[key] = M.TensorEntry(alias_of=plan.alias_of[key])
        elif kind == "per_rank":
            tensors[key] = M.TensorEntry(per_rank=tuple(
                M.TensorMeta(spec_of[r][key].dtype, spec_of[r][key].shape, (), ((r, r + 1),))
                for r in range(len(specs))))
        else:
            ranks = writers[key]
            boxes = tuple(Piece(key, spec_of[r][key].dtype, spec_of[r][key].offsets,
                                spec_of[r][key].lengths, ()) for r in ranks)
            spec = spec_of[ranks[0]][key]
            M.check_coverage(M.TensorMeta(spec.dtype, spec.shape, boxes), f"write plan: {key!r}")
            tensors[key] = M.TensorEntry(meta=M.TensorMeta(spec.dtype, spec.shape, (),
                                                           M.to_ranges(ranks)))
    return tensors


def build_manifest(req: SaveRequest, save_id: str, world: int, trees: list[Any],
                   tensors: dict[str, M.TensorEntry],
                   reports: list[dict[str, Any]]) -> M.Manifest:
    files = {f[0]: FileRecord(f[0], f[1], f[2], f[3], rank)
             for rank, rep in enumerate(reports) for f in rep["files"]}
    now = time.time()
    return M.Manifest(
        step=req.step, save_id=save_id,
        time=datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds"),
        unix_time=now, world_size=world, files=files, tensors=tensors,
        tree=T.merge_ranks(trees), metrics=dict(req.metrics), tags=req.tags, extra=req.extra)


def commit(location: Location, step_dir: str, data: bytes) -> None:
    """Make the step durable at one location: data entries first, then the manifest, last."""
    location.fsync_dir(step_dir)
    lease = writer_lease(location, step_dir)
    if lease is not None:  # stalled renewals: a prune may have judged this save dead
        lease.check(margin=lease.ttl / 2)
    location.write_atomic(f"{step_dir}/{M.MANIFEST_NAME}", data)
    location.fsync_dir("")


def _prepare(locations: Sequence[Location], step_dir: str) -> tuple[list[int], dict[int, str]]:
    """Rank 0: prepare the step directory at every location; a committed step is an error."""
    ok, failed = [], {}
    for i, loc in enumerate(reachable_all(locations)):  # a dead replica: seconds, not minutes
        if isinstance(loc, Unreachable):
            failed[i] = f"{loc.display}: unreachable: {loc.why}"
    live = [i for i in range(len(locations)) if i not in failed]
    step = int(step_dir.removeprefix("step-"))
    for i in live:  # committed anywhere: refused everywhere, before any directory is touched
        with contextlib.suppress(ShardckptError):
            read_manifest(locations[i], step)
            raise ValueError(f"step directory {locations[i].display}/{step_dir} is already "
                             f"committed; a committed checkpoint is never overwritten")
    for i in live:
        try:
            prepare_step_dir(locations[i], step_dir)
            ok.append(i)
        except ShardckptError as exc:
            failed[i] = describe(exc)
    return ok, failed


def _commit_all(locations: Sequence[Location], good: list[int], step_dir: str,
                manifest: M.Manifest,
                min_replicas: int) -> tuple[list[int], dict[int, str], M.Manifest]:
    """Rank 0: commit at every good location; undo them all if fewer than ``min_replicas``."""
    extra = dict(manifest.extra)
    extra["locations"] = [locations[i].display for i in good]
    extra["degraded"] = len(good) < len(locations)
    manifest = replace(manifest, extra=extra)
    data = M.serialize(manifest)
    last_profile["manifest_bytes"] = len(data)
    M.parse(data, "new manifest")  # never commit what we could not read back
    committed, failed = [], {}
    for i in good:
        try:
            commit(locations[i], step_dir, data)
            committed.append(i)
        except ShardckptError as exc:
            failed[i] = describe(exc)
    if len(committed) < min_replicas:
        for i in committed:  # no location may be left showing a save that failed
            with contextlib.suppress(ShardckptError):
                locations[i].remove(f"{step_dir}/{M.MANIFEST_NAME}")
                locations[i].fsync_dir(step_dir)
        committed = []
    return committed, failed, manifest


@releases_writer_leases
def save_step(comm: LocalComm | GlooComm, locations: Sequence[Location], state: dict[str, Any],
              req: SaveRequest, opts: SaveOptions,
              collected: Collected | BaseException | None = None,
              min_replicas: int = 1, plan_cache: PlanCache | None = None) -> M.Manifest | None:
    """Run the protocol on this rank. Returns the manifest on rank 0, None elsewhere.

    ``collected`` is the state already flattened and snapshotted (async saves), or the exception
    that doing so raised: it is reported to every rank instead of leaving them waiting. Every
    rank writes its files to every location; rank 0 commits at each location that holds every
    file of every rank, and the save fails (``StorageError``) where fewer than ``min_replicas``
    locations could commit.
    """
    rank, world = comm.rank, comm.world_size
    clock = _Clock()
    last_profile.clear()
    step_dir = step_dirname(req.step)
    error: BaseException | None = None
    specs: list[LeafSpec] = []
    prepared: list[int] = list(range(len(locations)))
    loc_failures: dict[int, str] = {}
    try:
        if isinstance(collected, BaseException):
            error, collected = collected, None
            raise error
        if rank == 0:
            prepared, loc_failures = _prepare(locations, step_dir)
            if len(prepared) < min_replicas:
                raise StorageError(f"step {req.step}: only {len(prepared)} of {len(locations)} "
                                   f"locations are writable: {loc_failures}")
        if collected is None:
            collected = collect(state)
        specs = [leaf_spec(leaf, world) for leaf in collected.leaves]
    except Exception as exc:
        error = exc
    cache = plan_cache if plan_cache is not None else PlanCache()
    mine = {"error": describe(error) if error else None,
            "tree": collected.tree if collected else None, **cache.outgoing(specs)}
    last_profile["leaves_sent"] = float(mine["leaves"] is not None)
    # Rank 0 alone sees every rank's leaves (only when their structure changed: plancache.py),
    # plans, and sends each rank its writes as runs of indexes into its own leaf list: what a
    # rank receives does not grow with the world.
    clock.lap("collect")
    plans = comm.gather_json(mine, "save: gather plans")
    msg: dict[str, Any] = {}
    tensors: dict[str, M.TensorEntry] = {}
    if rank == 0:
        assert plans is not None
        failures = {r: p["error"] for r, p in enumerate(plans) if p["error"]}
        writes: list[M.Ranges] = []
        if not failures:
            try:
                all_specs = cache.resolve(plans)
                key = cache.plan_key(plans)
                last_profile["plan_reused"] = float(key == cache.key)
                if key == cache.key:  # same structure and digests everywhere: same plan
                    tensors, writes = cache.plan
                else:
                    plan = assign(all_specs)
                    tensors = directory(all_specs, plan)
                    for r, rank_specs in enumerate(all_specs):
                        index_of = {spec.key: i for i, spec in enumerate(rank_specs)}
                        writes.append(M.to_ranges(index_of[k] for k in plan.writes[r]))
                    cache.key, cache.plan = key, (tensors, writes)
            except Exception as exc:
                error = exc
                failures = {0: "planning: " + describe(exc)}
                cache.specs.clear()
                cache.key = cache.plan = None
        msg = {"failures": {str(r): m for r, m in failures.items()},
               "save_id": uuid.uuid4().hex, "prepared": prepared,
               "writes": [[list(run) for run in w] for w in writes],
               "known": None if failures else cache.known(world)}
    msg = comm.broadcast_json(msg, "save: write plan")
    cache.ack(msg["known"], rank)
    if msg["failures"]:
        _raise_failures("state collection", {int(r): m for r, m in msg["failures"].items()},
                        error, world)
    assert collected is not None
    save_id = msg["save_id"]
    targets = [(i, locations[i]) for i in msg["prepared"]]
    report: dict[str, Any] = {"error": None, "files": [], "loc_failures": {}}
    try:
        mine_runs = tuple((a, b) for a, b in msg["writes"][rank])
        todo = [PieceData(leaf.key, leaf.dtype, leaf.offsets, leaf.lengths, leaf.data)
                for leaf in (collected.leaves[i] for i in M.expand(mine_runs))]
        if rank != 0:
            for _, loc in targets:
                loc.makedirs(step_dir)
        config = PipelineConfig.plan(opts.codec, opts.chunk_size, opts.memory_budget,
                                     opts.files_per_rank)
        clock.lap("plan")
        written = write_rank(targets, step_dir, todo, save_id=save_id, step=req.step,
                             rank=rank, config=config, nfiles=opts.files_per_rank,
                             threads=opts.io_threads, encoders=opts.encode_threads,
                             nice=opts.nice)
        report["files"] = [[w.record.name, w.record.nbytes, w.record.header_offset,
                            w.record.header_xxh3, w.stored_at] for w in written]
        report["loc_failures"] = {str(i): m for w in written for i, m in w.failures.items()}
    except Exception as exc:
        error = exc
        report["error"] = describe(exc)
    clock.lap("write")
    reports = comm.gather_json(report, "save: gather reports")
    decision: dict[str, Any] = {"ok": False, "failures": {}, "storage": False}
    manifest = None
    if rank == 0:
        assert reports is not None
        failures = {r: rep["error"] for r, rep in enumerate(reports) if rep["error"]}
        good = [i for i, _ in targets
                if all(i in f[4] for rep in reports for f in rep["files"])]
        for rep in reports:
            loc_failures.update({int(i): m for i, m in rep["loc_failures"].items()})
        if not failures and len(good) < min_replicas:
            failures = {0: f"only {len(good)} of {len(locations)} locations stored every file "
                           f"(min_replicas={min_replicas}): " + "; ".join(
                               f"{locations[i].display}: {m}" for i, m in loc_failures.items())}
            decision["storage"] = True
        if not failures:
            try:
                assert plans is not None
                manifest = build_manifest(req, save_id, world, [p["tree"] for p in plans],
                                          tensors, reports)
                committed, commit_failures, manifest = _commit_all(
                    locations, good, step_dir, manifest, min_replicas)
                loc_failures.update(commit_failures)
                if not committed:
                    decision["storage"] = True
                    failures = {0: f"commit succeeded at fewer than {min_replicas} locations: "
                                   + "; ".join(commit_failures.values())}
            except Exception as exc:
                error = exc
                failures = {0: "commit: " + describe(exc)}
        decision.update(ok=not failures, failures={str(r): m for r, m in failures.items()})
        for i, loc in enumerate(locations):
            if i in loc_failures and not loc.is_local:
                # Don't wait on a failing remote's retries: its partial, uncommitted directory
                # is invisible, and prune reaps it after its grace period.
                abandon_writer_lease(loc, step_dir)
                continue
            if failures or i in loc_failures:
                with contextlib.suppress(ShardckptError):
                    loc.remove_tree(step_dir)
        for i, m in loc_failures.items():
            if not failures:
                warnings.warn(f"step {req.step}: location {locations[i].display} missed this "
                              f"checkpoint (degraded): {m}", stacklevel=2)
    clock.lap("commit")  # rank 0: merge the reports, build, check and commit the manifest
    decision = comm.broadcast_json(decision, "save: commit decision")
    clock.lap("decision")
    last_profile.update(clock.laps)
    if not decision["ok"]:
        found = {int(r): m for r, m in decision["failures"].items()}
        if decision["storage"]:
            raise StorageError("save failed: " + "; ".join(found.values())) from error
        _raise_failures("write/commit", found, error, world)
    return manifest
