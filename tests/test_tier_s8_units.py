"""Session 8 of issue 28, the pure parts: (1) a local tier's plan writes small replicated plain
tensors (RNG streams first) on every rank that holds them, while the ordinary plan keeps one
writer, on both planners (``fastplan`` and ``assign``); (2) the persistent tier's steps are
listed by name only, validated only when a name is newer than the best local step or when a
fallback asks for all of them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shardckpt.engine.comm import LocalComm
from shardckpt.errors import ShardckptError, StorageError
from shardckpt.extras import RNG_KEY
from shardckpt.planning.assign import LeafSpec, assign
from shardckpt.planning.fastplan import uniform_plan
from shardckpt.planning.localcopies import SelfSufficientPlanCache, copied_keys
from shardckpt.planning.plancache import PlanCache
from shardckpt.storage import open_location
from shardckpt.tier.persistentlist import KnownSteps, PersistentSteps, step_names, warm_up

WORLD = 4
RNG = f"{RNG_KEY}/torch"


def plain(key: str, n: int, digest: str, dtype: str = "float32") -> LeafSpec:
    return LeafSpec(key, dtype, (n,), (0,), (n,), False, None, digest)


def rank_specs(rank: int, extra: bool = False) -> list[LeafSpec]:
    specs = [
        LeafSpec("w", "float32", (8, 4), (2 * rank, 0), (2, 4), True),  # an FSDP shard
        plain(RNG, 5056, "rng", "uint8"),  # equal on every rank
        plain("optim/step", 1, "step"),  # equal on every rank, 4 bytes
        plain("big", 300_000, "big"),  # equal on every rank, 1.2 MB: over the budget
        plain("own", 10, f"own{rank}"),  # per-rank state
    ]
    if extra and rank == WORLD - 1:  # another skeleton on one rank: the general planner
        specs.append(plain("only3", 5, "x"))
    return specs


def resolved(cache: PlanCache, extra: bool = False) -> Any:
    parts = [PlanCache().outgoing(rank_specs(r, extra)) for r in range(WORLD)]
    return cache.resolve_compact(parts)


def kinds_fast(cache: PlanCache) -> dict[str, Any]:
    entries, _ = uniform_plan(resolved(cache), WORLD)
    return {k: ("per_rank" if e.per_rank is not None else e.meta.writers) for k, e in
            entries.items()}


def test_the_local_plan_writes_small_replicated_tensors_on_every_rank() -> None:
    ordinary, local = kinds_fast(PlanCache()), kinds_fast(SelfSufficientPlanCache(always=(
        RNG_KEY,)))
    for key in (RNG, "optim/step", "big"):  # written once, by one rank
        assert ordinary[key] != "per_rank" and len(ordinary[key]) == 1, key
    assert local[RNG] == local["optim/step"] == "per_rank"
    assert local["big"] == ordinary["big"]  # over the budget: still one writer
    assert local["own"] == ordinary["own"] == "per_rank"
    assert local["w"] == ordinary["w"]  # shards are untouched


def test_the_general_planner_makes_the_same_choice() -> None:
    for cache, want in ((PlanCache(), "shared"), (SelfSufficientPlanCache(always=(RNG_KEY,)),
                                                  "per_rank")):
        res = resolved(cache, extra=True)
        assert res.uniform() is None
        plan = assign(res.specs())
        assert plan.kind[RNG] == plan.kind["optim/step"] == want
        assert plan.kind["big"] == plan.kind["only3"] == "shared"  # budget; one holder
        writers = [r for r, keys in plan.writes.items() if RNG in keys]
        assert writers == ([0, 1, 2, 3] if want == "per_rank" else writers[:1])


def test_the_budget_counts_the_rng_streams_first() -> None:
    res = resolved(PlanCache())
    assert copied_keys(res, 1 << 20, (RNG_KEY,)) == {RNG, "optim/step"}
    assert copied_keys(res, 5056, (RNG_KEY,)) == {RNG}  # the RNG always; nothing else fits
    assert copied_keys(res, 4, ()) == {"optim/step"}
    assert copied_keys(res, 2 << 20, ()) == {RNG, "optim/step", "big"}


def test_the_plan_key_and_cache_are_the_ranks_own() -> None:
    cache = SelfSufficientPlanCache(always=(RNG_KEY,))
    parts = [PlanCache().outgoing(rank_specs(r)) for r in range(WORLD)]
    res = cache.resolve_compact(parts)
    assert all(str(1) not in d for d in res.digests)  # the RNG leaf: no digest in the plan
    assert all(p["digests"]["1"] == "rng" for p in parts)  # the messages are untouched


# ------------------------------------------------------------------- the persistent listing
class CountingManager:
    """What :class:`PersistentSteps` asks of a manager: its locations and ``steps()``."""

    def __init__(self, root: Path, valid: list[int]) -> None:
        self.locations = [open_location(str(root))]
        self.valid, self.full = valid, 0

    def steps(self) -> list[int]:
        self.full += 1
        return list(self.valid)


def make_steps(root: Path, steps: list[int]) -> None:
    for s in steps:
        (root / f"step-{s:010d}").mkdir(parents=True)


def test_no_manifest_is_read_when_no_persistent_step_is_newer(tmp_path: Path) -> None:
    make_steps(tmp_path, [5, 10])
    mgr = CountingManager(tmp_path, [5, 10])
    steps = PersistentSteps(mgr, LocalComm())
    try:
        assert steps.newer_than(18) == [] and mgr.full == 0  # names only
        assert steps.all() == [5, 10] and steps.all() == [5, 10] and mgr.full == 1  # once
    finally:
        steps.close()


def test_a_newer_name_lists_and_validates_in_full(tmp_path: Path) -> None:
    make_steps(tmp_path, [5, 10, 20])  # step 20: a directory without a valid manifest
    mgr = CountingManager(tmp_path, [5, 10])
    steps = PersistentSteps(mgr, LocalComm())
    try:
        assert steps.newer_than(8) == [10] and mgr.full == 1
        assert steps.newer_than(18) == [] and steps.all() == [5, 10] and mgr.full == 1
    finally:
        steps.close()


def test_an_unlistable_location_falls_back_to_the_full_listing(tmp_path: Path) -> None:
    def fail() -> dict[int, str]:
        raise StorageError("listing failed")

    broken = SimpleNamespace(is_local=True, display="broken", list_step_dirs=fail)
    with pytest.raises(ShardckptError, match="listing failed"):
        step_names([broken])  # type: ignore[list-item]
    mgr = CountingManager(tmp_path, [3])
    mgr.locations = [broken]  # type: ignore[list-item]
    steps = PersistentSteps(mgr, LocalComm())
    try:
        assert steps.newer_than(100) == [] and mgr.full == 1  # listed in full: nothing newer
    finally:
        steps.close()


def test_a_failing_full_listing_raises(tmp_path: Path) -> None:
    mgr = CountingManager(tmp_path, [])

    def down() -> list[int]:
        raise StorageError("no location is reachable")

    mgr.steps = down  # type: ignore[method-assign]
    make_steps(tmp_path, [4])
    steps = PersistentSteps(mgr, LocalComm())
    try:
        with pytest.raises(ShardckptError, match="listing the persistent tier failed on rank 0"):
            steps.newer_than(1)
    finally:
        steps.close()


def test_known_steps_are_a_plain_list() -> None:
    known = KnownSteps([10, 5, 5])
    assert known.newer_than(5) == [10] and known.all() == [5, 10]


def test_the_remote_store_is_warmed_up_once_at_construction(tmp_path: Path) -> None:
    assert warm_up([open_location(str(tmp_path))]) is None  # a local disk: nothing to make
    remote = open_location(f"memory://s8-warm-{tmp_path.name}")
    remote.makedirs("step-0000000003")
    remote.write_atomic("step-0000000003/x", b"x")
    thread = warm_up([remote])
    assert thread is not None and thread.daemon
    mgr = CountingManager(tmp_path, [3])
    mgr.locations = [remote]
    steps = PersistentSteps(mgr, LocalComm(), after=thread)  # lists once the warm-up is done
    try:
        assert steps.newer_than(2) == [3] and mgr.full == 1
        assert not thread.is_alive()
    finally:
        steps.close()
