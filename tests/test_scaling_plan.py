"""Issue 31: rank 0's plan at scale (planning/fastplan.py, planning/plancache.py).

The vectorized planner must make every check the general one makes (coverage, digests of
replicated tensors) and give the same plan wherever no rank has a choice; anything it does not
cover is left to the general planner. And the plan messages stay compact: a skeleton decoded
once, boxes as packed integers, trees decoded once per distinct tree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from shardckpt.engine.comm import encode_json
from shardckpt.engine.stepdir import directory
from shardckpt.errors import CorruptCheckpointError, IncompleteCheckpointError
from shardckpt.format import manifest as M
from shardckpt.planning.assign import LeafSpec, assign
from shardckpt.planning.fastplan import runs, uniform_plan
from shardckpt.planning.plancache import PlanCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import planning_sim


def general(specs: list[list[LeafSpec]]) -> tuple[dict[str, M.TensorEntry], list[M.Ranges]]:
    plan = assign(specs)
    tensors = directory(specs, plan)
    writes = []
    for r, rank_specs in enumerate(specs):
        index_of = {s.key: i for i, s in enumerate(rank_specs)}
        writes.append(M.to_ranges(index_of[k] for k in plan.writes[r]))
    return tensors, writes


def fast(specs: list[list[LeafSpec]], trees: Any = None) -> Any:
    cache = PlanCache()
    parts = [json.loads(json.dumps(PlanCache().outgoing(s, trees))) for s in specs]
    return uniform_plan(cache.resolve_compact(parts), len(specs))


def fsdp(world: int, rows: list[int], cols: int = 3) -> list[list[LeafSpec]]:
    """Shard(0) leaves, rows[i] rows of tensor i split as FSDP does (uneven: empty tails)."""
    out = []
    for r in range(world):
        leaves = []
        for i, n in enumerate(rows):
            per = -(-n // world)
            lo, hi = min(n, r * per), min(n, (r + 1) * per)
            leaves.append(LeafSpec(f"t{i}", "float32", (n, cols), (lo, 0), (hi - lo, cols),
                                   True))
        leaves.append(LeafSpec("z", "bfloat16", (0, 4), (0, 0), (0, 4), True))
        out.append(leaves)
    return out


def test_fsdp_plan_is_the_general_plan() -> None:
    specs = fsdp(8, [16, 5, 1, 9, 64])
    got = fast(specs)
    assert got is not None
    assert got == general(specs)


def test_ddp_plan_with_aliases_and_per_rank_tensors_is_the_general_plan() -> None:
    def rank(r: int) -> list[LeafSpec]:
        return [LeafSpec(f"w{i}", "float32", (10 * (i + 1), 2), (0, 0), (10 * (i + 1), 2),
                         False, None, f"{i:016x}") for i in range(6)] + [
            LeafSpec("tied", "float32", (10, 2), (0, 0), (10, 2), False, "w0", None),
            LeafSpec("bn", "float32", (7,), (0,), (7,), False, None, f"{r:016x}"),
            LeafSpec("step", "int64", (), (), (), False, None, "0" * 16)]
    specs = [rank(r) for r in range(4)]
    got = fast(specs)
    assert got is not None
    assert got == general(specs)
    assert got[0]["bn"].per_rank is not None and got[0]["tied"].alias_of == "w0"


def test_hsdp_replicas_are_written_once_each_by_a_holder() -> None:
    world, shards = 8, 4  # 2 replica groups of 4 shards
    specs = [[LeafSpec(f"t{i}", "float32", (8 * shards, 2), ((r % shards) * 8, 0), (8, 2), True)
              for i in range(5)] for r in range(world)]
    got = fast(specs)
    assert got is not None
    tensors, writes = got
    for i in range(5):
        writers = M.expand(tensors[f"t{i}"].meta.ranks)
        assert sorted(r % shards for r in writers) == list(range(shards))  # each box once
        for r in writers:
            assert i in M.expand(writes[r])
    loads = [len(M.expand(w)) for w in writes]
    assert max(loads) - min(loads) <= 1  # spread over the replicas


@pytest.mark.parametrize("bad, error", [((4, 6), CorruptCheckpointError),  # overlap
                                        ((8, 4), IncompleteCheckpointError)])  # gap
def test_bad_boxes_go_to_the_general_check(bad: tuple[int, int],
                                           error: type[Exception]) -> None:
    specs = [[LeafSpec("t", "float32", (16,), (8 * r,), (8,), True)] for r in range(2)]
    specs[1][0] = LeafSpec("t", "float32", (16,), (bad[0],), (bad[1],), True)
    assert fast(specs) is None
    with pytest.raises(error):
        general(specs)


def test_2d_sharding_goes_to_the_general_planner() -> None:
    specs = [[LeafSpec("t", "float32", (4, 4), (2 * (r // 2), 2 * (r % 2)), (2, 2), True)]
             for r in range(4)]
    assert fast(specs) is None
    tensors, _ = general(specs)
    assert M.expand(tensors["t"].meta.ranks) == [0, 1, 2, 3]


def test_runs_of_rows() -> None:
    import torch

    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert runs(mask) == [((0, 2), (3, 4)), (), ((0, 4),)]


def test_plan_messages_are_compact_and_trees_decoded_once() -> None:
    specs = fsdp(64, [64] * 50)
    tree = ["d", {f"t{i}": ["T", f"t{i}"] for i in range(50)}]
    parts = [PlanCache().outgoing(s, tree) for s in specs]
    old_style = len(encode_json({"leaves": [x.to_json() for x in specs[1]], "tree": tree}))
    assert len(encode_json(parts[1])) < old_style
    cache = PlanCache()
    res = cache.resolve_compact(parts)
    assert len(cache.skeletons) == 1 and res.uniform() is not None
    trees = cache.trees_of(parts)
    assert all(t is trees[0] for t in trees) and trees[0] == tree
    assert res.specs() == [[s for s in rank] for rank in specs]


def test_simulated_planning_at_256_ranks(tmp_path: Path) -> None:
    """The benchmark's simulation (benchmarks/planning_sim.py) at a size a test affords."""
    got = planning_sim.simulate(256, 200, 2, 4, str(tmp_path / "sim"))
    assert got["rank0_first"]["plan_reused"] == 0.0
    assert got["rank0_cached"]["plan_reused"] == 1.0
    assert got["rank1_cached"]["leaves_sent"] == 0.0
    assert got["rank0_first"]["planning_cpu_s"] < 20


def test_a_tree_is_sent_until_rank_0_acknowledged_it() -> None:
    rank0, other = PlanCache(), PlanCache()
    tree = ["d", {"a": ["i", 1]}]
    parts = [rank0.outgoing([], tree), other.outgoing([], tree)]
    assert all("tree_z" in p for p in parts)
    rank0.resolve_compact(parts)
    assert rank0.trees_of(parts) == [tree, tree]
    known = rank0.known(2)
    rank0.ack(known, 0)
    other.ack(known, 1)
    again = [rank0.outgoing([], tree), other.outgoing([], tree)]
    assert all("tree_z" not in p for p in again) and all(p["leaves"] is None for p in again)
    assert rank0.trees_of(again) == [tree, tree]
    assert "tree_z" in other.outgoing([], ["d", {"a": ["i", 2]}])  # a changed tree is sent
    rank0.trees = {}  # rank 0 lost its trees: the save fails, nobody is acked, all resend
    with pytest.raises(ValueError, match="sent no tree"):
        rank0.trees_of(again)
    other.ack(None, 1)
    assert "tree_z" in other.outgoing([], tree)
