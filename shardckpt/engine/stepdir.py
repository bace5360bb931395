"""Rank 0's side of a save at each location: prepare the step directory, build the manifest,
commit it (written last, by an exclusive create), or undo. The writer lease of each location is
a :class:`~shardckpt.storage.lease.StepLease` the caller holds for the whole save. Two writers
on one step: see :mod:`shardckpt.storage.writers` (at most one of them commits)."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from ..catalog import aside_dirname, read_manifest
from ..errors import ConcurrentWriterError, CorruptCheckpointError, ShardckptError
from ..format import manifest as M
from ..format.refs import references
from ..format.shard import TRAILER, TRAILER_SIZE, FileRecord, Piece
from ..planning import tree as T
from ..planning.assign import LeafSpec, WritePlan
from ..retired import retired_name
from ..storage import Location, step_dirname
from ..storage.lease import StepLease
from ..storage.marker import check_marker
from ..storage.probe import Unreachable, reachable_all
from ..storage.writers import (
    check_no_rival,
    clear_claim,
    committed_by,
    warn_other_jobs,
    writer_identity,
)
from . import pools
from .failures import describe
from .messages import WriteReport
from .rootmarks import expected_markers, markers_extra, note_committed


@dataclass(frozen=True)
class SaveRequest:
    step: int
    metrics: Mapping[str, float]
    tags: tuple[str, ...]
    extra: Mapping[str, Any]


def prepare_step_dir(location: Location, step_dir: str) -> None:
    """Before anyone writes (the caller holds the writer lease): refuse a committed step, move
    a step whose manifest is corrupt aside (kept, never deleted), clear a stale partial one."""
    step = int(step_dir.removeprefix("step-"))
    if location.size(f"{step_dir}/{M.MANIFEST_NAME}") is not None:
        try:
            found = read_manifest(location, step)
        except CorruptCheckpointError as exc:  # not committed, but kept: moved out of the way
            refuse_referenced(location, step, f"its manifest is corrupt ({exc})")
            aside = aside_dirname(step, time.time())
            location.move_tree(step_dir, aside)
            warnings.warn(f"{location.display}/{step_dir}: manifest corrupt ({exc}); moved "
                          f"aside to {aside} and saving step {step} afresh", stacklevel=2)
        else:
            refuse_committed(location, step_dir, found)
    if location.is_local:  # a dead writer's commit claim (claims are local disks' only)
        clear_claim(location, f"{step_dir}/{M.MANIFEST_NAME}")
    if location.listdir(step_dir):  # a dead writer's leftovers (no live lease: checked)
        refuse_referenced(location, step, "it has no manifest")
        location.remove_tree(step_dir)
    location.makedirs(step_dir)


def refuse_referenced(location: Location, step: int, why: str) -> None:
    """A step directory about to be cleared or moved aside for a new save of ``step``: refuse
    (``ValueError``) if committed later steps reference its files (incremental saves): its
    bytes are theirs, and a new step N would not be the files they name."""
    later = [s for s in location.list_step_dirs() if s > step]
    users = []
    for s in later:
        try:
            m = read_manifest(location, s)
        except ShardckptError:
            continue
        if any(r.step == step for r in references(m.extra, m.step)):
            users.append(s)
    if users:
        raise ValueError(f"{location.display}/{step_dirname(step)}: {why}, but steps "
                         f"{', '.join(map(str, users))} reference its files; it is neither "
                         f"cleared nor moved aside for a new save of step {step}: restore its "
                         f"manifest (`shardckpt repair` from a replica) or save under a new "
                         f"step number")


def refuse_committed(location: Location, step_dir: str, found: M.Manifest) -> None:
    """A save of a step committed there: ``ConcurrentWriterError`` naming its writer if another
    process committed it (``writer`` in its manifest), else ``ValueError``."""
    text = (f"step directory {location.display}/{step_dir} is already committed; a committed "
            f"checkpoint is never overwritten")
    if location.size(retired_name(found.step)) is not None:
        raise ValueError(f"{text}: step {found.step} is retired (pruned by retention, hidden "
                         f"from ls and steps(), its files kept because later steps reference "
                         f"them); a retired step's number is never reused: save under a new "
                         f"step number")
    who, me = found.extra.get("writer"), writer_identity()
    if isinstance(who, dict) and (who.get("host"), who.get("pid")) != (me["host"], me["pid"]):
        holder = f"host {who.get('host')}, pid {who.get('pid')}, job {who.get('job') or '?'}"
        raise ConcurrentWriterError(f"{text}: another writer committed it ({holder})", holder)
    raise ValueError(text)


def prepare_all(locations: Sequence[Location], step_dir: str,
                leases: dict[int, StepLease], stack: contextlib.ExitStack
                ) -> tuple[list[int], dict[int, str]]:
    """Rank 0: probe every location (a dead replica costs seconds, not minutes), refuse a step
    committed anywhere (before any directory is touched), then lease and prepare the step
    directory at each. Returns the prepared locations and why the others failed. Another
    writer's live lease on the step at any location fails the whole save
    (:class:`ConcurrentWriterError`), touching nothing there."""
    ok: list[int] = []
    failed: dict[int, str] = {}
    for i, loc in enumerate(reachable_all(locations)):
        if isinstance(loc, Unreachable):
            failed[i] = f"{loc.display}: unreachable: {loc.why}"
    live = [i for i in range(len(locations)) if i not in failed]
    step = int(step_dir.removeprefix("step-"))
    for i in live:
        try:
            found = read_manifest(locations[i], step)
        except ShardckptError:
            continue
        refuse_committed(locations[i], step_dir, found)
    expected: dict[int, tuple[str, int]] = {}  # a first save: what the manifests recorded
    if any(loc.marker_id is None for loc in locations):
        expected = expected_markers(locations, live)
    for i in failed:  # unreachable now: what is expected there once it is back
        if locations[i].marker_id is None and i in expected:
            locations[i].marker_id, locations[i].marker_step = expected[i]
    for i in live:
        try:  # a vanished root is a failed location, never recreated nor adopted
            check_marker(locations[i], expected.get(i))
            warn_other_jobs(locations[i])
            leases[i] = stack.enter_context(StepLease(locations[i], step_dir))
        except ShardckptError as exc:
            failed[i] = describe(exc)
    for i in list(leases):  # every lease written before any is looked for: nothing touched
        try:
            check_no_rival(locations[i], step_dir, leases[i].token,
                           "found before anything was written")
        except ConcurrentWriterError:
            raise
        except ShardckptError as exc:
            failed[i] = describe(exc)
    for i in leases:
        if i in failed:
            continue
        try:
            prepare_step_dir(locations[i], step_dir)
            ok.append(i)
        except ShardckptError as exc:
            failed[i] = describe(exc)
    return ok, failed


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
        elif kind == "per_rank":  # None: a rank that does not hold this key (rank-local)
            tensors[key] = M.TensorEntry(per_rank=tuple(
                M.TensorMeta(spec_of[r][key].dtype, spec_of[r][key].shape, (), ((r, r + 1),))
                if key in spec_of[r] else None for r in range(len(specs))))
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
                   reports: Sequence[WriteReport]) -> M.Manifest:
    files = {f.name: FileRecord(f.name, f.nbytes, f.header_offset, f.header_xxh3, rank)
             for rank, rep in enumerate(reports) for f in rep.files}
    now = time.time()
    return M.Manifest(
        step=req.step, save_id=save_id,
        time=datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds"),
        unix_time=now, world_size=world, files=files, tensors=tensors,
        tree=T.merge_ranks(trees), metrics=dict(req.metrics), tags=req.tags, extra=req.extra)


def files_intact(location: Location, step_dir: str, files: Mapping[str, FileRecord]) -> None:
    """Under the lease, before the commit: every file this save wrote is still there, with its
    size and the header trailer it was written with (another writer's file would differ:
    its header holds another save id). ``ConcurrentWriterError`` otherwise. One listing and
    one 32-byte read per file (16 at a time on an object store)."""
    present = set(location.listdir(step_dir))

    def problem(item: tuple[str, FileRecord]) -> str | None:
        name, rec = item
        if name not in present:
            return f"{name} is gone"
        tail = location.read_range(f"{step_dir}/{name}", rec.nbytes - TRAILER_SIZE,
                                   TRAILER_SIZE)
        if len(tail) != TRAILER_SIZE:
            return f"{name} is shorter than written"
        offset, _, digest, _ = TRAILER.unpack(tail)
        if (offset, f"{digest:016x}") != (rec.header_offset, rec.header_xxh3):
            return f"{name} was replaced"
        return None

    items = list(files.items())
    if location.is_local or len(items) < 2:
        found = [problem(item) for item in items]
    else:
        with ThreadPoolExecutor(max_workers=min(16, len(items)),
                                thread_name_prefix="shardckpt-commit-check") as pool:
            found = list(pool.map(problem, items))
    bad = [p for p in found if p]
    if bad:
        raise ConcurrentWriterError(
            f"{location.display}/{step_dir}: written by this save, {bad[0]} before the commit "
            f"({len(bad)} file(s) in all): another writer (or a prune) changed this step "
            f"directory; not committed")


def commit(location: Location, step_dir: str, data: bytes, lease: StepLease | None,
           files: Mapping[str, FileRecord] | None = None,
           checked: Callable[[], object] | None = None) -> None:
    """Make the step durable at one location: data entries first, then the manifest, last,
    by an exclusive create (see :mod:`shardckpt.storage.writers`). ``checked`` (raising if
    ``data`` is not a valid manifest) is called just before the manifest is written."""
    location.fsync_dir(step_dir)
    if lease is not None:  # stalled renewals: a prune may have judged this save dead
        lease.check()
        check_no_rival(location, step_dir, lease.token, "found just before the commit")
    if files is not None:
        files_intact(location, step_dir, files)
    if checked is not None:
        checked()
    rel = f"{step_dir}/{M.MANIFEST_NAME}"
    try:
        location.write_exclusive(rel, data)
        location.fsync_dir("")
    except FileExistsError:
        if _is_ours(location, rel, data):
            return  # ours after all: a retried PUT whose first try had gone through
        raise committed_by(location, step_dir, M.MANIFEST_NAME) from None
    except BaseException:
        if _is_ours(location, rel, data):  # in place but not durable: taken back (only ours)
            with contextlib.suppress(ShardckptError, OSError):
                location.remove(rel)
        raise


def _is_ours(location: Location, rel: str, data: bytes) -> bool:
    try:
        return location.read_file(rel, len(data)) == data
    except (FileNotFoundError, ShardckptError, OSError):
        return False


def commit_all(locations: Sequence[Location], good: list[int], step_dir: str,
               manifest: M.Manifest, min_replicas: int, leases: Mapping[int, StepLease],
               check_files: bool = True) -> tuple[list[int], dict[int, str], M.Manifest, bytes]:
    """Rank 0: commit at every good location; undo them all if fewer than ``min_replicas``.
    Returns the committed locations, the failed ones, the manifest and its bytes."""
    extra = dict(manifest.extra)
    extra["locations"] = [locations[i].display for i in good]
    extra["degraded"] = len(good) < len(locations)
    extra["writer"] = writer_identity()  # who committed: a writer losing the race names it
    extra["markers"] = markers_extra(locations, good, manifest.step)  # checked on a restart
    manifest = replace(manifest, extra=extra)
    data = M.serialize(manifest)
    committed, failed = [], {}
    rival: ConcurrentWriterError | None = None
    with pools.pool("commit-check", 1) as pool:
        # never commit what we could not read back: parsed while the first location's
        # directory is synced and its files checked, waited for before any manifest is written
        readback = pool.submit(M.parse, data, "new manifest")
        try:
            for i in good:
                try:
                    commit(locations[i], step_dir, data, leases.get(i),
                           manifest.files if check_files else None, readback.result)
                    committed.append(i)
                except ConcurrentWriterError as exc:  # the whole save fails: never both
                    rival = exc
                    break
                except ShardckptError as exc:
                    failed[i] = describe(exc)
        finally:
            if not readback.cancel():  # started: a manifest that does not read back fails
                readback.result()  # the save, as it always did
    if rival is not None or len(committed) < min_replicas:
        for i in committed:  # no location may be left showing a save that failed
            with contextlib.suppress(ShardckptError):
                locations[i].remove(f"{step_dir}/{M.MANIFEST_NAME}")
                locations[i].fsync_dir(step_dir)
        committed = []
    if rival is not None:
        raise rival
    note_committed(locations, committed, manifest.step)
    return committed, failed, manifest, data
