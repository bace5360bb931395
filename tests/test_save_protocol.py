"""The save protocol's phases and messages, driven at 2-3 ranks by threads in one process
(``ThreadComm``): no process group, no spawn (issue 16)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

import shardckpt
from shardckpt.engine.comm import ThreadComm
from shardckpt.engine.messages import Assignment, FileEntry, Outcome, RankPlan, WriteReport
from shardckpt.engine.save import SaveOptions, SaveRequest, save_step
from shardckpt.errors import CollectiveError
from shardckpt.format.shard import Codec
from shardckpt.storage import open_location


def run_threads(world: int, fn: Any) -> list[Any]:
    """``fn(comm)`` on ``world`` threads, one rank each; results (or exceptions) by rank."""
    comms = ThreadComm.group(world, timeout_s=60)

    def call(comm: ThreadComm) -> Any:
        try:
            return fn(comm)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(max_workers=world) as pool:
        return list(pool.map(call, comms))


def save_at(root: Path, world: int, state_of: Any, step: int = 1) -> list[Any]:
    req = SaveRequest(step, {"loss": 1.0}, ("t",), {})
    opts = SaveOptions.from_knobs(Codec(None))
    loc = open_location(str(root))
    return run_threads(world, lambda c: save_step(c, [loc], state_of(c.rank), req, opts))


def test_messages_round_trip_through_json() -> None:
    import json

    msgs = [RankPlan("boom", ["d", {}], {"hash": "h", "digests": {}, "leaves": None}),
            Assignment({1: "x"}, "id", (0, 2), (((0, 3),), ()), ["a", None]),
            WriteReport(None, (FileEntry("f.shard", 10, 4, "ab", (0, 1)),), {1: "down"}),
            Outcome(False, {0: "why"}, True)]
    for m in msgs:
        assert type(m).from_json(json.loads(json.dumps(m.to_json()))) == m


def test_three_ranks_save_in_threads_and_load_in_one_process(tmp_path: Path) -> None:
    shared = torch.arange(6.0)
    results = save_at(tmp_path, 3, lambda r: {"w": shared.clone(), "mine": torch.full((2,), r),
                                             "meta": {"step": 1}})
    assert all(not isinstance(r, Exception) for r in results), results
    manifest = results[0].manifest
    assert manifest is not None and manifest.world_size == 3
    assert [r.manifest for r in results[1:]] == [None, None]
    assert all("write" in r.profile and "decision" in r.profile for r in results)
    assert results[0].profile["leaves_sent"] == 1.0
    got = {"w": torch.zeros(6), "meta": None}
    with shardckpt.CheckpointManager(str(tmp_path)) as mgr:
        assert mgr.load(got, strict=False) == 1
    assert torch.equal(got["w"], shared) and got["meta"] == {"step": 1}


def test_a_failure_on_one_rank_fails_every_rank_and_commits_nothing(tmp_path: Path) -> None:
    def state_of(rank: int) -> dict[str, Any]:
        return {"w": torch.ones(3), "bad": object() if rank == 1 else 1}

    results = save_at(tmp_path, 2, state_of)
    assert all(isinstance(r, CollectiveError) for r in results), results
    assert all(set(r.failures) == {1} and "bad" in r.failures[1] for r in results)
    assert "state collection" in str(results[0])
    assert not (tmp_path / "step-0000000001" / "manifest.json").exists()


def test_ranks_saving_different_steps_fail_every_rank_and_leave_nothing(tmp_path: Path) -> None:
    """Ranks out of step (one caught an error the others did not see, say) must never mix two
    steps in one checkpoint: every rank fails, and no step directory is even prepared."""
    opts = SaveOptions.from_knobs(Codec(None))
    loc = open_location(str(tmp_path))
    results = run_threads(2, lambda c: save_step(
        c, [loc], {"w": torch.ones(3)}, SaveRequest(2 + c.rank, {}, (), {}), opts))
    assert all(isinstance(r, CollectiveError) for r in results), results
    assert all(set(r.failures) == {1} for r in results)
    assert "saves step 3 while rank 0 saves step 2" in str(results[0])
    assert list(tmp_path.iterdir()) == []


def test_a_failure_on_one_rank_prepares_no_step_directory(tmp_path: Path) -> None:
    results = save_at(tmp_path, 2, lambda r: {"w": torch.ones(3), "bad": object() if r else 1})
    assert all(isinstance(r, CollectiveError) for r in results), results
    assert "nothing was written" in str(results[1])
    assert list(tmp_path.iterdir()) == []


def test_a_rank_that_never_arrives_breaks_the_collective() -> None:
    comms = ThreadComm.group(2, timeout_s=0.5)
    with pytest.raises(CollectiveError, match="never arrived"):
        comms[0].all_gather_json({"x": 1}, "lonely")
