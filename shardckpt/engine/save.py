"""The collective save protocol. Every rank of the comm calls :func:`save_step` in step.

1. every rank flattens its state (tree + tensor leaves) and says what it holds;
2. all ranks exchange that (``all_gather``) and compute the same write plan;
3. every rank writes the pieces it was assigned to its own shard files;
4. rank 0 gathers the reports, builds and validates the manifest, and commits it (written last);
5. rank 0 broadcasts the outcome; if any rank failed at any point, nobody commits and every rank
   raises the same :class:`CollectiveError` naming the failing ranks and their causes.
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .. import knobs
from ..errors import CollectiveError, ShardckptError
from ..format import manifest as M
from ..format.shard import Codec, FileRecord, Piece, checksum
from ..planning import tree as T
from ..planning.assign import LeafSpec, WritePlan, assign
from ..planning.statedict import Collected, TensorLeaf, collect
from ..storage import Location, step_dirname
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


def describe(exc: BaseException) -> str:
    """One line naming an error; the traceback's last frame says where it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}"[:1000] + where


def _raise_failures(stage: str, failures: dict[int, str], local: BaseException | None) -> None:
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
    """Rank 0, before anyone writes: refuse a committed step, clear a stale partial one."""
    if location.size(f"{step_dir}/{M.MANIFEST_NAME}") is not None:
        raise ValueError(f"step directory {location.display}/{step_dir} is already committed; "
                         f"a committed checkpoint is never overwritten")
    if location.listdir(step_dir):
        location.remove_tree(step_dir)
    location.makedirs(step_dir)


def build_manifest(req: SaveRequest, save_id: str, world: int, trees: list[Any],
                   specs: list[list[LeafSpec]], plan: WritePlan,
                   reports: list[dict[str, Any]]) -> M.Manifest:
    files: dict[str, FileRecord] = {}
    pieces: dict[str, dict[int, list[Piece]]] = {}
    for rank, rep in enumerate(reports):
        for f in rep["files"]:
            files[f[0]] = FileRecord(f[0], f[1], f[2], f[3], rank)
        for key, file, offsets, lengths, chunks in rep["pieces"]:
            p = M.parse_piece({"file": file, "offsets": offsets, "lengths": lengths,
                               "chunks": chunks}, key, with_key=False)
            pieces.setdefault(key, {}).setdefault(rank, []).append(p)
    spec_of = [{s.key: s for s in rank_specs} for rank_specs in specs]
    tensors: dict[str, M.TensorEntry] = {}
    for key, kind in sorted(plan.kind.items()):
        if kind == "alias":
            tensors[key] = M.TensorEntry(alias_of=plan.alias_of[key])
        elif kind == "per_rank":
            tensors[key] = M.TensorEntry(per_rank=tuple(
                M.TensorMeta(spec_of[r][key].dtype, spec_of[r][key].shape,
                             tuple(pieces.get(key, {}).get(r, ()))) for r in range(world)))
        else:
            spec = next(s[key] for s in spec_of if key in s)
            got = tuple(p for r in sorted(pieces.get(key, {})) for p in pieces[key][r])
            tensors[key] = M.TensorEntry(meta=M.TensorMeta(spec.dtype, spec.shape, got))
    now = time.time()
    return M.Manifest(
        step=req.step, save_id=save_id,
        time=datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds"),
        unix_time=now, world_size=world, files=files, tensors=tensors,
        tree=T.merge_ranks(trees), metrics=dict(req.metrics), tags=req.tags, extra=req.extra)


def commit(location: Location, step_dir: str, data: bytes) -> None:
    """Make the step durable: data entries first, then the manifest, last, atomically."""
    location.fsync_dir(step_dir)
    location.write_atomic(f"{step_dir}/{M.MANIFEST_NAME}", data)
    location.fsync_dir("")


def save_step(comm: LocalComm | GlooComm, location: Location, state: dict[str, Any],
              req: SaveRequest, opts: SaveOptions,
              collected: Collected | BaseException | None = None) -> M.Manifest | None:
    """Run the protocol on this rank. Returns the manifest on rank 0, None elsewhere.

    ``collected`` is the state already flattened and snapshotted (async saves), or the exception
    that doing so raised: it is reported to every rank instead of leaving them waiting.
    """
    rank, world = comm.rank, comm.world_size
    step_dir = step_dirname(req.step)
    error: BaseException | None = None
    specs: list[LeafSpec] = []
    try:
        if isinstance(collected, BaseException):
            error, collected = collected, None
            raise error
        if rank == 0:
            prepare_step_dir(location, step_dir)
        if collected is None:
            collected = collect(state)
        specs = [leaf_spec(leaf, world) for leaf in collected.leaves]
    except Exception as exc:
        error = exc
    mine = {"error": describe(error) if error else None, "save_id": uuid.uuid4().hex,
            "tree": collected.tree if collected else None,
            "leaves": [s.to_json() for s in specs]}
    plans = comm.all_gather_json(mine, "save: exchange plans")
    failures = {r: p["error"] for r, p in enumerate(plans) if p["error"]}
    if failures:
        _raise_failures("state collection", failures, error)
    assert collected is not None
    save_id = plans[0]["save_id"]
    all_specs = [[LeafSpec.from_json(v) for v in p["leaves"]] for p in plans]
    report: dict[str, Any] = {"error": None, "files": [], "pieces": []}
    try:
        plan = assign(all_specs)
        by_key = {leaf.key: leaf for leaf in collected.leaves}
        todo = [PieceData(k, by_key[k].dtype, by_key[k].offsets, by_key[k].lengths,
                          by_key[k].data) for k in plan.writes[rank]]
        if rank != 0:
            location.makedirs(step_dir)
        config = PipelineConfig.plan(opts.codec, opts.chunk_size, opts.memory_budget,
                                     opts.files_per_rank)
        files, pieces = write_rank(location, step_dir, todo, save_id=save_id, step=req.step,
                                   rank=rank, config=config, nfiles=opts.files_per_rank,
                                   threads=opts.io_threads, encoders=opts.encode_threads)
        report["files"] = [[f.name, f.nbytes, f.header_offset, f.header_xxh3] for f in files]
        report["pieces"] = [[p.key, p.file, list(p.offsets), list(p.lengths),
                             [c.to_json() for c in p.chunks]] for p in pieces]
    except Exception as exc:
        error = exc
        report["error"] = describe(exc)
    reports = comm.gather_json(report, "save: gather reports")
    decision: dict[str, Any] = {"ok": False, "failures": {}}
    manifest = None
    if rank == 0:
        assert reports is not None
        failures = {r: rep["error"] for r, rep in enumerate(reports) if rep["error"]}
        if not failures:
            try:
                manifest = build_manifest(req, save_id, world, [p["tree"] for p in plans],
                                          all_specs, plan, reports)
                data = M.serialize(manifest)
                M.parse(data, "new manifest")  # never commit what we could not read back
                commit(location, step_dir, data)
            except Exception as exc:
                error = exc
                failures = {0: "commit: " + describe(exc)}
        decision = {"ok": not failures, "failures": {str(r): m for r, m in failures.items()}}
        if failures:
            try:
                location.remove_tree(step_dir)
            except ShardckptError:
                pass  # an uncommitted directory is invisible; prune's grace period reaps it
    decision = comm.broadcast_json(decision, "save: commit decision")
    if not decision["ok"]:
        _raise_failures("write/commit", {int(r): m for r, m in decision["failures"].items()},
                        error)
    return manifest


