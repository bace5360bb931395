"""Pure pieces of the node-local tier (issue 28): node ids, placement of copies, the holdings
record, and the choice of the step to restore across tiers, tested with plain records."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shardckpt.errors import CorruptCheckpointError
from shardckpt.storage import open_location
from shardckpt.tier.choice import (
    LOCAL,
    PERSISTENT,
    Candidate,
    NodeReport,
    StepReport,
    plan_recovery,
)
from shardckpt.tier.holdings import (
    HeldFile,
    Holdings,
    check_holdings,
    parse_holdings,
    read_holdings,
)
from shardckpt.tier.placement import NodeMap, node_id, placement_warnings

# ------------------------------------------------------------------------------------ node ids


def test_node_id_sources_in_order() -> None:
    env = {"GROUP_RANK": "3", "SLURM_NODEID": "7"}
    assert node_id("n9", env) == "n9"
    assert node_id(2, env) == "2"
    assert node_id(None, env) == "3"
    assert node_id(None, {"SLURM_NODEID": "7"}) == "7"
    assert node_id(None, {}) != ""  # the host name


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 200, True, 1.5])
def test_node_id_must_be_path_safe(bad: object) -> None:
    with pytest.raises(ValueError, match="node id"):
        node_id(bad, {})
    with pytest.raises(ValueError, match="node id"):
        node_id(None, {"GROUP_RANK": "a/b"})


# ----------------------------------------------------------------------------------- placement
TWO_BY_TWO = NodeMap(("0", "0", "1", "1"))


def test_copies_go_to_the_next_distinct_nodes() -> None:
    assert TWO_BY_TWO.order == ("0", "1")
    assert TWO_BY_TWO.holders(0, 2) == ("0", "1")
    assert TWO_BY_TWO.holders(3, 2) == ("1", "0")
    assert TWO_BY_TWO.held_by("0", 2) == (0, 1, 2, 3)
    assert TWO_BY_TWO.held_by("1", 1) == (2, 3)
    # the copies spread over the peer node's ranks
    assert TWO_BY_TWO.pushes(2) == ((0, 2), (1, 3), (2, 0), (3, 1))
    assert TWO_BY_TWO.leader("1") == 2


def test_placement_whatever_the_ranks_per_node() -> None:
    # interleaved ranks, uneven nodes: nodes ordered by their lowest rank
    m = NodeMap(("b", "a", "b", "c", "a", "b"))
    assert m.order == ("b", "a", "c")
    assert m.holders(3, 2) == ("c", "b")
    assert m.holders(1, 3) == ("a", "c", "b")
    for r in range(m.world_size):
        hs = m.holders(r, 3)
        assert len(set(hs)) == 3 and hs[0] == m.nodes[r]
    assert m.receiver(3, "a") == 1  # c's only rank -> a's first rank
    assert m.receiver(5, "c") == 3  # b's third rank -> c has one rank
    assert sorted(m.held_by("c", 2)) == [1, 3, 4]


def test_more_copies_than_nodes_is_refused() -> None:
    with pytest.raises(ValueError, match=r"copies=3 needs at least 3 nodes.*runs on 2"):
        placement_warnings(TWO_BY_TWO, 3)
    with pytest.raises(ValueError, match="positive int"):
        placement_warnings(TWO_BY_TWO, 0)


def test_a_single_node_warns() -> None:
    (msg,) = placement_warnings(NodeMap(("0", "0")), 1)
    assert "single node" in msg and "not the loss of the node" in msg
    assert placement_warnings(TWO_BY_TWO, 2) == []


# ------------------------------------------------------------------------------------ holdings
def holdings(step: int = 7, node: str = "1") -> Holdings:
    return Holdings(step, node, 2, TWO_BY_TWO,
                    {2: {"rank00002-000.shard": HeldFile(100, "00112233aabbccdd")}, 3: {}})


def test_holdings_round_trip() -> None:
    h = holdings()
    assert parse_holdings(h.to_bytes()) == h
    assert h.nbytes == 100


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.replace(b'"version": 1', b'"version": 2'), "version-1"),
    (lambda d: d.replace(b'"2": {', b'"9": {'), "rank '9'"),
    (lambda d: d.replace(b"rank00002-000.shard", b"../x.shard"), "not a shard file name"),
    (lambda d: d.replace(b"00112233aabbccdd", b"xyz"), "header_xxh3"),
    (lambda d: d.replace(b'"nodes": [', b'"nodes": ["a/b", '), "node id"),
    (lambda d: d[:-5], "holdings.json"),
])
def test_malformed_holdings_are_refused_naming_the_file(edit, match: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=match):
        parse_holdings(edit(holdings().to_bytes()), "n1/holdings.json")


def test_holdings_check_finds_missing_truncated_and_replaced_files(tmp_path: Path) -> None:
    import torch

    import shardckpt

    with shardckpt.CheckpointManager(str(tmp_path), async_save=False) as mgr:
        mgr.save(7, {"w": torch.arange(1000.0)})
        manifest = mgr.manifest(7)
    name, rec = max(manifest.files.items(), key=lambda kv: kv[1].nbytes)
    loc = open_location(str(tmp_path))
    step_dir = "step-0000000007"
    good = Holdings(7, "0", 1, NodeMap(("0",)), {0: {name: HeldFile(rec.nbytes,
                                                                    rec.header_xxh3)}})
    loc.write_atomic(f"{step_dir}/holdings.json", good.to_bytes())
    assert read_holdings(loc, step_dir) == good
    assert check_holdings(loc, good) == {0: None}
    replaced = Holdings(7, "0", 1, NodeMap(("0",)), {0: {name: HeldFile(rec.nbytes,
                                                                        "0" * 16)}})
    assert "the file was replaced" in str(check_holdings(loc, replaced)[0])
    path = tmp_path / step_dir / name
    path.write_bytes(path.read_bytes()[:-1])
    assert f"{name}: {rec.nbytes - 1} bytes, {rec.nbytes} recorded" in str(
        check_holdings(loc, good)[0])
    path.unlink()
    assert check_holdings(loc, good)[0].endswith(f"{name}: missing")
    with pytest.raises(CorruptCheckpointError, match="lies in step-0000000008"):
        loc.makedirs("step-0000000008")
        loc.write_atomic("step-0000000008/holdings.json", good.to_bytes())
        read_holdings(loc, "step-0000000008")


# --------------------------------------------------------------------------------- the choice
def report(node: str, *steps: tuple[int, set[int]], node_map: NodeMap = TWO_BY_TWO,
           problems: dict[int, str] | None = None) -> NodeReport:
    return NodeReport(node, tuple(StepReport(s, node_map, frozenset(v), problems or {})
                                  for s, v in steps))


def test_newest_step_with_every_rank_somewhere_wins() -> None:
    reports = [report("0", (7, {0, 1, 2, 3}), (6, {0, 1, 2, 3})),
               report("1", (6, {0, 1, 2, 3}))]  # node 1 lost step 7 (a replaced machine)
    plan = plan_recovery(reports, TWO_BY_TWO, [5])
    first = plan.candidates[0]
    assert (first.tier, first.step) == (LOCAL, 7)
    assert first.sources == ("0", "0", "0", "0")  # node 1's ranks receive from node 0
    assert first.receivers(TWO_BY_TWO) == (2, 3)
    assert [(c.tier, c.step) for c in plan.candidates] == [(LOCAL, 7), (LOCAL, 6),
                                                           (PERSISTENT, 5)]
    assert plan.candidates[1].sources == ("0", "0", "1", "1")  # each from its own node


def test_no_node_is_assumed_to_hold_its_own_ranks() -> None:
    # node 1 reports step 7 but its own ranks' files did not verify; node 0 has only its own
    reports = [report("0", (7, {0, 1})),
               report("1", (7, {0, 1}), problems={2: "n1/rank00002-000.shard: missing"})]
    plan = plan_recovery(reports, TWO_BY_TWO, [5])
    assert [(c.tier, c.step) for c in plan.candidates] == [(PERSISTENT, 5)]
    assert plan.skipped[7] == ("rank 2's files are on no live node "
                               "(node 1: n1/rank00002-000.shard: missing)")
    assert plan.why_not_newer(plan.candidates[0])[0].startswith("local step 7: rank 2")


def test_holders_share_the_transfers() -> None:
    m = NodeMap(("a", "a", "b", "c"))
    reports = [report("b", (3, {0, 1, 2}), node_map=m),
               report("c", (3, {0, 1, 3}), node_map=m)]  # node a was replaced
    (cand,) = plan_recovery(reports, m).candidates
    assert cand.sources == ("b", "c", "b", "c")  # node a's ranks: one from each holder


def test_same_step_prefers_local_and_newer_persistent_wins() -> None:
    reports = [report("0", (5, {0, 1, 2, 3}))]
    assert [(c.tier, c.step) for c in plan_recovery(reports, TWO_BY_TWO, [5, 3]).candidates] \
        == [(LOCAL, 5), (PERSISTENT, 5), (PERSISTENT, 3)]
    assert plan_recovery(reports, TWO_BY_TWO, [8]).candidates[0] == Candidate(PERSISTENT, 8)


def test_another_world_size_or_node_map_skips_the_local_tier() -> None:
    old = NodeMap(("0", "0", "1", "1", "2", "2"))
    plan = plan_recovery([report("0", (7, {0, 1, 2, 3, 4, 5}), node_map=old)], TWO_BY_TWO, [5])
    assert plan.skipped == {7: "saved at world size 6, this job has 4"}
    moved = NodeMap(("0", "1", "0", "1"))
    plan = plan_recovery([report("0", (7, {0, 1, 2, 3}), node_map=moved)], TWO_BY_TWO, [5])
    assert "another node->ranks map" in plan.skipped[7]
    assert [c.step for c in plan.candidates] == [5]


def test_ranks_of_one_node_must_agree() -> None:
    reports = [report("0", (7, {0, 1, 2, 3})), report("0", (7, {0, 1, 2})),
               NodeReport("1", (), {8: "holdings.json: corrupt"})]
    plan = plan_recovery(reports, TWO_BY_TWO)
    assert plan.candidates == ()
    assert plan.skipped[7].startswith("rank 3's files are on no live node")
    assert plan.skipped[8] == "rank 0's files are on no live node (node 1: holdings.json: corrupt)"


def test_reports_round_trip_as_json() -> None:
    rep = report("1", (7, {2, 3}), problems={0: "missing"})
    assert NodeReport.from_json(rep.to_json()) == rep
    cand = Candidate(LOCAL, 7, ("0", "1"))
    assert Candidate.from_json(cand.to_json()) == cand


def test_the_tier_package_never_imports_torch() -> None:
    code = ("import sys, shardckpt.tier, shardckpt.tier.listing, shardckpt.tier.config, "
            "shardckpt.tier.retention, shardckpt.tier.needs; "
            "print(','.join(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == ""
