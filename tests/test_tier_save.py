"""The node-local tier's save path (issue 28): each rank's files under its node's path and on
the next copies-1 nodes, sent over the tier's own gloo group; each node's copy committed by its
manifest and holdings.json; local retention. Real processes, real gloo."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import tier_targets as T
import torch
from harness import RankFailures, run_ranks

import shardckpt
from shardckpt.storage import open_location
from shardckpt.tier.holdings import read_holdings
from shardckpt.tier.retention import plan_local_retention

ENV = {"OMP_NUM_THREADS": "1", "SHARDCKPT_COLLECTIVE_TIMEOUT": "20"}


@pytest.fixture(scope="module", autouse=True)
def _fast_ranks() -> Iterator[None]:
    with T.forked_ranks():
        yield


def expected(step: int, world: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for rank in range(world):
        out.update(T.tier_state(step, rank))
    return out


def assert_node_copy_loads(root: Path, node: str, step: int, world: int) -> None:
    """A node's copy of a step is a whole checkpoint: every rank's files, the manifest."""
    got = shardckpt.consolidated_state_dict(str(root / node), step=step)
    want = expected(step, world)
    # the tensor every rank holds alike is on every rank in a local step (KEY@rankN, equal)
    copies = [got.pop(f"shared@rank{r}") for r in range(world)]
    assert all(torch.equal(c, copies[0]) for c in copies)
    got["shared"] = copies[0]
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), (node, step, key)


def test_two_nodes_two_copies_every_node_holds_every_rank(tmp_path: Path) -> None:
    nodes = ["0", "0", "1", "1"]
    out = run_ranks(T.local_saves, 4, str(tmp_path), nodes, [1, 2, 3], 2, 2, env=ENV,
                    timeout=120)
    for rank, rep in enumerate(out):
        assert rep["steps"] == [2, 3]  # keep=2: step 1 went
        assert rep["leader"] == (rank in (0, 2))
        assert rep["warnings"] == []
        assert rep["profile"]["bytes_sent"] > 0 and rep["profile"]["bytes_received"] > 0
    for node in ("0", "1"):
        assert sorted(p.name for p in (tmp_path / node).glob("step-*")) == [
            "step-0000000002", "step-0000000003"]
        holdings = read_holdings(open_location(str(tmp_path / node)), "step-0000000003")
        assert sorted(holdings.ranks) == [0, 1, 2, 3]
        assert holdings.node == node and holdings.node_map.nodes == tuple(nodes)
        for step in (2, 3):
            assert_node_copy_loads(tmp_path, node, step, 4)
    report = out[2]["report"]
    assert report["node"] == "1"
    assert [(s["step"], s["valid"]) for s in report["steps"]] == [(2, [0, 1, 2, 3]),
                                                                  (3, [0, 1, 2, 3])]


def test_three_nodes_two_copies_and_a_single_node_warns(tmp_path: Path) -> None:
    nodes = ["a", "b", "c"]
    out = run_ranks(T.local_saves, 3, str(tmp_path / "three"), nodes, [4], 2, 1, env=ENV,
                    timeout=120)
    for rank, node in enumerate(nodes):
        holdings = read_holdings(open_location(str(tmp_path / "three" / node)),
                                 "step-0000000004")
        assert sorted(holdings.ranks) == sorted([rank, (rank - 1) % 3])  # its own, the previous
        assert out[rank]["steps"] == [4]
    out = run_ranks(T.local_saves, 2, str(tmp_path / "one"), ["n", "n"], [1], 1, 1, env=ENV,
                    timeout=120)
    assert any("single node" in w for w in out[0]["warnings"])
    assert_node_copy_loads(tmp_path / "one", "n", 1, 2)


def test_more_copies_than_nodes_is_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(RankFailures) as err:
        run_ranks(T.local_saves, 2, str(tmp_path), ["0", "1"], [1], 3, 1, env=ENV, timeout=60)
    assert all("copies=3 needs at least 3 nodes" in m for m in err.value.failures.values())


def test_a_node_killed_mid_save_leaves_the_previous_step_usable(tmp_path: Path) -> None:
    nodes = ["0", "0", "1", "1"]
    with pytest.raises(RankFailures):
        run_ranks(T.local_saves, 4, str(tmp_path), nodes, [1, 2, 3], 2, 2, kill_at=3, env=ENV,
                  timeout=120)
    for node in ("0", "1"):
        loc = open_location(str(tmp_path / node))
        assert read_holdings(loc, "step-0000000002").step == 2
        assert loc.size("step-0000000003/holdings.json") is None  # never completed
        assert_node_copy_loads(tmp_path, node, 2, 4)
    # the next job's save of step 3 replaces the leftovers, and retention reaps step 1
    out = run_ranks(T.local_saves, 4, str(tmp_path), nodes, [3], 2, 2, env=ENV, timeout=120)
    assert out[0]["steps"] == [2, 3]
    assert_node_copy_loads(tmp_path, "1", 3, 4)


def test_local_retention_keeps_the_newest_complete_steps() -> None:
    assert plan_local_retention([1, 2, 3], [], 2) == [1]
    assert plan_local_retention([1, 2, 3], [0, 4], 1) == [0, 1, 2]  # 4 may be in flight
    assert plan_local_retention([1, 2, 3], [], 1, busy=[1]) == [2]
    assert plan_local_retention([], [5], 1) == []  # nothing complete: nothing is judged dead
    with pytest.raises(ValueError, match="keep"):
        plan_local_retention([1], [], 0)


def test_local_tier_config_is_checked() -> None:
    tier = shardckpt.LocalTier("/dev/shm/run/{node}", every=5)
    assert (tier.copies, tier.keep) == (2, 2)
    assert tier.path_for("3") == "/dev/shm/run/3" and tier.due(10) and not tier.due(7)
    for bad in (dict(every=0), dict(every=1, copies=0), dict(every=1, keep=True),
                dict(every=1, node="a/b")):
        with pytest.raises(ValueError):
            shardckpt.LocalTier("/x/{node}", **bad)
    with pytest.raises(ValueError, match="the only field"):
        shardckpt.LocalTier("/x/{rank}", every=1)


def test_a_node_s_listing_shows_own_and_peer_copies_and_their_health(tmp_path: Path) -> None:
    from shardckpt.tier.listing import node_steps

    run_ranks(T.local_saves, 4, str(tmp_path), ["0", "0", "1", "1"], [1, 2], 2, 2, env=ENV,
              timeout=120)
    loc = open_location(str(tmp_path / "1"))
    (one, two) = node_steps(loc)
    assert (two["step"], two["node"], two["health"]) == (2, "1", "ok")
    assert [(r["rank"], r["copy"], r["health"]) for r in two["ranks"]] == [
        (0, "peer", "ok"), (1, "peer", "ok"), (2, "own", "ok"), (3, "own", "ok")]
    assert two["nbytes"] == sum(r["nbytes"] for r in two["ranks"]) > 0
    holdings = read_holdings(loc, "step-0000000002")
    victim = sorted(holdings.ranks[0])[0]
    (tmp_path / "1" / "step-0000000002" / victim).unlink()
    (tmp_path / "1" / "step-0000000001" / "holdings.json").unlink()
    (one, two) = node_steps(loc)
    assert one["health"] == "incomplete"
    assert two["health"] == "damaged" and victim in two["detail"]
    assert two["ranks"][0]["health"].endswith(f"{victim}: missing")
    assert [r["health"] for r in two["ranks"][1:]] == ["ok"] * 3
