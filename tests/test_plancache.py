"""Plan caching (``planning/plancache.py``): a rank sends its leaves only when their structure
changed, rank 0 reuses the plan while every structure and digest is unchanged, and whatever
changes (a new tensor, a replicated tensor that starts to differ between ranks) is planned
afresh, with every checkpoint loading exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from harness import run_ranks

import shardckpt
from shardckpt.planning.assign import LeafSpec
from shardckpt.planning.plancache import PlanCache, structure_hash


def spec(key: str, digest: str | None = None) -> LeafSpec:
    return LeafSpec(key, "float32", (4,), (0,), (4,), False, None, digest)


def test_structure_hash_ignores_digests_only() -> None:
    assert structure_hash([spec("a", "1" * 16)]) == structure_hash([spec("a", "2" * 16)])
    assert structure_hash([spec("a")]) != structure_hash([spec("b")])


def test_a_rank_resends_after_rank_0_forgot() -> None:
    rank0, other = PlanCache(), PlanCache()
    first = [rank0.outgoing([spec("a")]), other.outgoing([spec("a", "f" * 16)])]
    assert all(p["leaves"] is not None for p in first)
    got = rank0.resolve(first)
    assert got[1][0].digest == "f" * 16
    known = rank0.known(2)
    rank0.ack(known, 0)
    other.ack(known, 1)
    again = [rank0.outgoing([spec("a")]), other.outgoing([spec("a", "e" * 16)])]
    assert [p["leaves"] for p in again] == [None, None]
    assert rank0.resolve(again)[1][0].digest == "e" * 16  # this save's digest, cached structure
    rank0.specs.clear()  # rank 0 lost its cache: the save fails, and nobody is acked
    with pytest.raises(ValueError, match="rank 0 sent no leaves"):
        rank0.resolve(again)
    other.ack(None, 1)
    assert other.outgoing([spec("a")])["leaves"] is not None


def saves(rank: int, world: int, root: str) -> dict[str, Any]:
    torch.manual_seed(0)
    shared = torch.randn(8)
    state: dict[str, Any] = {"w": shared.clone(), "mine": torch.full((3,), float(rank)),
                             "meta": {"rank": rank}}
    seen = []
    with shardckpt.CheckpointManager(root, async_save=False, capture_rng=False) as mgr:
        for step in (1, 2, 3, 4):
            if step == 3:
                state["extra"] = torch.arange(5.0)  # the structure changes
            if step == 4:
                state["w"] = shared + rank  # a replicated tensor now differs between ranks
            mgr.save(step, state)
            seen.append(dict(mgr.last_save_profile))
        loaded = {}
        for step in (1, 2, 3, 4):
            dest = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else None)
                    for k, v in state.items()}
            mgr.load(dest, step=step, strict=False)
            loaded[step] = {k: v.tolist() if isinstance(v, torch.Tensor) else v
                            for k, v in dest.items() if k in ("w", "mine", "extra")}
    return {"sent": [p["leaves_sent"] for p in seen],
            "reused": [p.get("plan_reused") for p in seen], "loaded": loaded,
            "shared": shared.tolist()}


def test_plan_is_reused_until_structure_or_digests_change(tmp_path: Any) -> None:
    results = run_ranks(saves, 2, str(tmp_path / "ckpt"), timeout=180)
    for rank, r in enumerate(results):
        assert r["sent"] == [1.0, 0.0, 1.0, 0.0], rank  # leaves again only when structure changed
        shared = torch.tensor(r["shared"])
        for step in ("1", "2", "3", "4"):
            got = r["loaded"][step]
            want_w = shared + rank if step == "4" else shared
            assert torch.equal(torch.tensor(got["w"]), want_w), (rank, step)
            assert got["mine"] == [float(rank)] * 3
        assert r["loaded"]["3"]["extra"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    # rank 0: planned, reused, replanned for the new tensor, replanned for the new digests
    assert results[0]["reused"] == [0.0, 1.0, 0.0, 0.0]
