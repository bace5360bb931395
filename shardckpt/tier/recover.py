"""Restoring from the newest step recoverable from either tier, agreed by all ranks.

:func:`recover` (every rank of the tier's group, together):

1. every rank reports its node's holdings; all ranks compute the same
   :class:`~shardckpt.tier.choice.RecoveryPlan` from the reports
   (:func:`~shardckpt.tier.choice.plan_recovery`);
2. the candidates are tried best first. For a local step: every rank works out which ranks'
   files it reads (:mod:`.needs`); each node receives those it does not hold valid from the
   node the plan names, over the tier's process group (checked on arrival,
   :mod:`shardckpt.engine.peer`), into its own path; then every rank loads from its own node's
   path only. For a persistent step: the caller's loader;
3. any failure on any rank makes every rank move on to the next candidate together (every key
   is filled again by the next one; steps are never mixed). Once a step is restored, the local
   steps newer than it are deleted on every node: they belong to a timeline the job abandons,
   and must never be restored after the steps it saves next;
4. one warning (rank 0) says which tier and step were chosen and why the newer ones were not.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .. import knobs
from ..engine.failures import describe, gather_failures
from ..engine.load import load_step
from ..engine.peer import Transfer, run_transfers
from ..engine.reader import CheckpointReader
from ..errors import IncompleteCheckpointError, ShardckptError
from ..extras import RNG_KEY, has_key
from ..format import manifest as M
from ..golden import GOLDEN_KEY
from ..planning.statedict import collect
from ..repro import restore_rng_state
from ..storage import Location, step_dirname
from .choice import LOCAL, PERSISTENT, Candidate, NodeReport, plan_recovery
from .fetchplan import planned_ranks, providers, read_pieces
from .goldencheck import check_golden, with_golden
from .local import PEER_CHUNK, LocalTierStore
from .needs import needed_ranks
from .persistentlist import KnownSteps, PersistentSteps
from .secondcopy import bad_copies, without


class _CountingLocation:
    """A location whose reads are counted (``bytes_read`` of the load profile)."""

    def __init__(self, inner: Location) -> None:
        self._inner, self.bytes_read = inner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def read_range(self, relpath: str, offset: int, length: int) -> bytes:
        data = self._inner.read_range(relpath, offset, length)
        self.bytes_read += len(data)
        return data

    def read_into(self, relpath: str, offset: int, out: memoryview) -> int:
        n = self._inner.read_into(relpath, offset, out)
        self.bytes_read += n
        return n


def recover(store: LocalTierStore, state: dict[str, Any], strict: bool, *,
            persistent_steps: Sequence[int] | PersistentSteps = (),
            load_persistent: Callable[[int], Mapping[str, float]] | None = None,
            restore_rng: bool = False, verify_golden: bool = False
            ) -> tuple[Candidate, dict[str, Any]]:
    """Collective (see the module): fill ``state`` from the best candidate that restores on
    every rank. ``persistent_steps`` (the same on every rank) are the persistent tier's valid
    steps, or a :class:`~shardckpt.tier.persistentlist.PersistentSteps` that lists them when
    needed; ``load_persistent(step)`` loads one of them (collectively) and returns its profile.
    Returns the candidate used and this rank's profile (``tier``, ``step``, ``bytes_read``,
    ``bytes_received`` and each phase's seconds). ``restore_rng``: a local step saved at this
    world size restores each rank's RNG streams too. ``verify_golden``: a local step must also
    reproduce its golden outputs (:mod:`.goldencheck`; ``load_persistent`` checks its own)."""
    comm = store.comm
    t0 = time.perf_counter()
    try:
        mine = store.report()
    except Exception as exc:  # this node then holds nothing usable; the others still answer
        warnings.warn(f"local tier {store.location.display}: cannot list its steps: "
                      f"{describe(exc)}", stacklevel=2)
        mine = NodeReport(store.node)
    t_report = time.perf_counter()
    reports = [NodeReport.from_json(r) for r in comm.all_gather_json(
        mine.to_json(), "load: gather the nodes' holdings")]
    t_gathered = time.perf_counter()
    persistent = KnownSteps(()) if load_persistent is None else persistent_steps \
        if isinstance(persistent_steps, PersistentSteps) else KnownSteps(persistent_steps)
    # only a persistent step newer than the best local one can come first: the others are
    # listed when a fallback needs them (:mod:`.persistentlist`), the order is the same
    best = next((c.step for c in plan_recovery(reports, store.node_map).candidates), -1)
    plan = plan_recovery(reports, store.node_map, persistent.newer_than(best))
    listed_all = best < 0
    survey_s = time.perf_counter() - t0
    phases = {"holdings_s": t_report - t0, "gather_s": t_gathered - t_report,
              "persistent_s": t0 + survey_s - t_gathered}
    failed: list[str] = []
    queue, retried = list(plan.candidates), False
    while queue:
        cand = queue.pop(0)
        error: BaseException | None = None
        profile: dict[str, Any] = {}
        try:
            if cand.tier == LOCAL:
                profile = _restore_local(store, cand, reports, state, strict, restore_rng,
                                         verify_golden)
            else:
                assert load_persistent is not None
                profile = {**load_persistent(cand.step), "bytes_received": 0}
        except Exception as exc:
            error = exc
        if error is None and store.is_leader:
            store.drop_newer(cand.step)
        failures = gather_failures(comm, error, f"load: outcome of {cand.tier} step "
                                                f"{cand.step}")
        if failures:
            failed.append(f"{cand.tier} step {cand.step}: " + "; ".join(
                f"rank {r}: {m}" for r, m in sorted(failures.items())))
            if not listed_all:  # the older persistent steps join the queue, in plan order
                listed_all = True
                queue += [Candidate(PERSISTENT, s) for s in persistent.all() if s <= best]
                queue.sort(key=lambda c: (-c.step, c.tier != LOCAL))
            if cand.tier == LOCAL and not retried:  # a bad copy: is there another one?
                retry = _other_copies(store, cand, reports)
                if retry is not None:
                    reports, again = retry
                    queue.insert(0, again)
                    retried = True
                    failed[-1] += " (restored from the other copies of the bad files)"
            continue
        why = plan.why_not_newer(cand) + failed
        if not why and cand.tier != LOCAL and best < 0:
            why = ["the local tier holds no recoverable step"]
        if why and comm.rank == 0:
            warnings.warn(f"restored {cand.tier} step {cand.step}; newer candidates were "
                          f"skipped: " + " | ".join(why), stacklevel=3)
        return cand, {**profile, "tier": cand.tier, "step": cand.step, "survey_s": survey_s,
                      **phases, "total_s": time.perf_counter() - t0}
    raise IncompleteCheckpointError(
        "no step can be restored from either tier: " + (
            " | ".join(plan.why_not_newer(Candidate(LOCAL, -1)) + failed) or "nothing saved"))


def _other_copies(store: LocalTierStore, cand: Candidate, reports: list[NodeReport]
                  ) -> tuple[list[NodeReport], Candidate] | None:
    """Collective, after ``cand`` failed: the reports without the copies it used that are bad
    (:mod:`.secondcopy`) and the same step from the other copies, if every rank still has a
    valid one somewhere; else None."""
    bad = bad_copies(store, cand)
    if not bad:
        return None
    reports = without(reports, cand.step, bad)
    again = next((c for c in plan_recovery(reports, store.node_map).candidates
                  if c.step == cand.step), None)
    return (reports, again) if again is not None else None


def _reads(store: LocalTierStore, cand: Candidate, manifest: M.Manifest,
           target: dict[str, Any], strict: bool) -> list[int]:
    """Collective: the ranks whose files this rank's load reads (:mod:`.fetchplan`; on any
    failure, every writer of every key it asks for, else every rank)."""
    comm, step_dir = store.comm, step_dirname(cand.step)
    prov = providers(store.node_map, cand.sources)
    doc: dict[str, Any] = {"rows": {}, "error": None}
    try:
        doc["rows"] = read_pieces(store.location, step_dir, manifest,
                                  [r for r, p in enumerate(prov) if p == comm.rank])
    except Exception as exc:
        doc["error"] = describe(exc)
    docs = comm.all_gather_json(doc, "load: the pieces of the files to read")
    try:
        if any(d["error"] for d in docs):
            raise ShardckptError("; ".join(d["error"] for d in docs if d["error"]))
        rows = {name: pieces for d in docs for name, pieces in d["rows"].items()}
        return sorted(planned_ranks(manifest, rows, target, strict, comm.rank, comm.world_size,
                                    store.location.display, step_dir))
    except Exception:
        pass
    try:
        keys = [leaf.key for leaf in collect(target).leaves]
        # an empty dict asks for whatever the checkpoint holds under its key (the RNG streams)
        keys += [k for k in manifest.tensors if k.split("/")[0] in
                 {str(t) for t, v in target.items() if isinstance(v, dict) and not v}]
        return sorted(needed_ranks(manifest, keys, comm.rank, comm.world_size))
    except Exception:  # the load below reports it; fetch everything meanwhile
        return list(range(manifest.world_size))


def _restore_local(store: LocalTierStore, cand: Candidate, reports: Sequence[NodeReport],
                   state: dict[str, Any], strict: bool, restore_rng: bool,
                   verify_golden: bool = False) -> dict[str, Any]:
    comm, node_map = store.comm, store.node_map
    step_dir = step_dirname(cand.step)
    t0 = time.perf_counter()
    # the manifest, from the first node that holds the step whole enough to be chosen
    src = node_map.leader(cand.sources[0])
    shared: dict[str, str | None] = {"text": None, "error": None}
    if comm.rank == src:  # a failure here travels with the broadcast: no rank is left waiting
        try:
            shared["text"] = store.location.read_file(f"{step_dir}/{M.MANIFEST_NAME}",
                                                      1 << 30).decode()
        except Exception as exc:
            shared["error"] = describe(exc)
    shared = comm.broadcast_json(shared, "load: share the manifest", src=src)
    if shared["error"] or shared["text"] is None:
        raise ShardckptError(f"rank {src} could not read the manifest: {shared['error']}")
    manifest = M.parse(shared["text"].encode(),
                       f"local step {cand.step} manifest from rank {src}")
    with_rng = restore_rng and manifest.world_size == comm.world_size and \
        has_key(manifest, RNG_KEY)
    target = {**state, RNG_KEY: {}} if with_rng else dict(state)  # a failed try leaves state
    target = with_golden(target, manifest, verify_golden)
    needs = comm.all_gather_json(_reads(store, cand, manifest, target, strict),
                                 "load: which files each rank reads")
    valid: dict[str, set[int]] = {}
    for rep in reports:
        for s in rep.steps:
            if s.step == cand.step:
                valid.setdefault(rep.node, set(s.valid))
                valid[rep.node] &= set(s.valid)
    transfers = []
    for node in node_map.order:
        wanted = {r for rank in node_map.ranks_of(node) for r in needs[rank]}
        for r in sorted(wanted - valid.get(node, set())):
            names = tuple(sorted(n for n, f in manifest.files.items() if f.rank == r))
            if names:
                sender = node_map.receiver(r, cand.sources[r]) if \
                    node_map.nodes[r] != cand.sources[r] else r
                there = node_map.ranks_of(node)
                transfers.append(Transfer(sender, there[r % len(there)], names))
    t1 = time.perf_counter()
    report = run_transfers(getattr(comm, "group", None), comm.rank, transfers, step_dir,
                           store.location, store.location, PEER_CHUNK)
    t2 = time.perf_counter()
    error = ShardckptError("; ".join(report.errors)) if report.errors else None
    failures = gather_failures(comm, error, "load: peer transfers")
    if failures:
        raise ShardckptError("receiving the files from their holders failed: " + "; ".join(
            f"rank {r}: {m}" for r, m in sorted(failures.items())))
    counting = _CountingLocation(store.location)
    reader = CheckpointReader([counting], step_dir, manifest)  # type: ignore[list-item]
    profile = load_step(comm, reader, target, strict, knobs.IO_THREADS.get())
    rng, golden = target.pop(RNG_KEY, None), target.pop(GOLDEN_KEY, None)
    state.update(target)
    if rng is not None:
        missing = restore_rng_state(rng)
        if missing:
            warnings.warn(f"local step {cand.step}: RNG state not restored for {missing}",
                          stacklevel=4)
    if verify_golden:
        check_golden(comm, state, manifest, golden, f"local step {cand.step}")
    return {**profile, "manifest_s": t1 - t0, "receive_s": t2 - t1,
            "read_s": time.perf_counter() - t2, "bytes_read": counting.bytes_read,
            "bytes_received": report.bytes_received, "world_size": manifest.world_size,
            "warnings": list(reader.warnings)}
