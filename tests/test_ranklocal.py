"""State that real training jobs hold, and states that cannot be saved (issue 15, items 4, 5, 7).

* **Rank-local keys** (``{"w": {f"rank{rank}": t}}``, torchtitan's ``{f"dp_rank_{rank}": ...}``):
  the checkpoint holds the union of every rank's keys; a loading rank gets the keys it asks for,
  at any world size, wherever they were saved; a strict load of a key no rank saved raises
  ``KeyError`` naming the key and the asking rank; ``shardckpt show`` says which ranks wrote each
  key; a job SIGKILLed at random moments leaves only checkpoints that load right.
* **Per-rank buffers** (BatchNorm running stats trained on different data per rank): at another
  world size a rank with a slot for one gets rank 0's copy, with one warning naming the keys,
  and a strict load never leaves a module tensor silently unrestored.
* **A state that cannot be saved** (a value of an unsupported type, a reserved key) raises from
  ``save()`` itself, on every rank, before anything is written, and the next save works.
* A strict load into a model that does not match names both missing and unexpected keys.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crash_targets as C
import numpy as np
import pytest
import ranklocal_targets as R
import torch
import torch.nn as nn
from harness import RankFailures, run_ranks

import shardckpt
from shardckpt.cli.main import main as cli_main
from shardckpt.engine import stepdir as save_mod
from shardckpt.format import manifest as M
from shardckpt.planning import tree as T
from shardckpt.planning.assign import LeafSpec, assign
from shardckpt.planning.restore import LoadContext, fill
from shardckpt.planning.statedict import MISSING, collect

ENV = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "30", "OMP_NUM_THREADS": "1",
       "SHARDCKPT_CHUNK_SIZE": "4K", "SHARDCKPT_LOCK_SETTLE_MS": "10"}
KILLED = "ProcessDied: killed by signal SIGKILL without reporting a result"


@pytest.fixture(scope="module", autouse=True)
def _fast_ranks() -> Iterator[None]:
    with C.forked_ranks():
        yield


@pytest.fixture(scope="module")
def saved_at_2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ranklocal") / "ckpt"
    results = run_ranks(R.ranklocal_save, 2, str(root), timeout=120, env=ENV)
    assert results[0]["buffers"] != results[1]["buffers"]  # the running stats did diverge
    return {"root": root, "ranks": results}


def manifest_of(root: Path, step: int) -> dict[str, Any]:
    return json.loads((root / f"step-{step:010d}" / "manifest.json").read_text())


# ------------------------------------------------------------------------------ item 4


def test_union_of_rank_local_keys_is_saved(saved_at_2: dict[str, Any]) -> None:
    doc = manifest_of(saved_at_2["root"], 1)
    tensors = doc["tensors"]
    assert tensors["w/rank0"]["ranks"] == [[0, 1]] and tensors["w/rank1"]["ranks"] == [[1, 2]]
    assert len(tensors["stats"]["per_rank"]) == 2  # on every rank, different bytes
    loader = doc["tree"][1]["loader"]
    assert loader == ["d", {f"dp_rank_{r}": ["P", [[[[r, r + 1]], T.encode(
        R.loader_of(1, r), "", lambda v, p: None)]]] for r in (0, 1)}]


def test_one_process_gets_every_key_it_asks_for(saved_at_2: dict[str, Any]) -> None:
    """In one process, a 2-rank checkpoint gives both ranks' keys to whoever asks for them;
    the per-rank ``stats`` and BatchNorm buffers come from rank 0, with one warning naming
    them; a key no rank saved is a ``KeyError`` naming it and the asking rank."""
    state = R.blank_for([0, 1])
    model = R.bn_model()
    state["bn"] = model
    torch.nn.init.zeros_(model[0].weight)
    with shardckpt.CheckpointManager(str(saved_at_2["root"])) as mgr:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert mgr.load(state, strict=True) == 1
        assert R.ranklocal_problems(state, 1, [0, 1], 0) == []
        rank0 = saved_at_2["ranks"][0]
        assert R.bn_buffers(model) == rank0["buffers"]
        assert R._full_weight(model) == rank0["weight"]
        borrowed = [str(w.message) for w in caught if "per-rank tensors" in str(w.message)]
        assert len(borrowed) == 1, [str(w.message) for w in caught]
        for key in ("bn/1.running_mean (rank 0)", "bn/1.running_var (rank 0)", "stats (rank 0)"):
            assert key in borrowed[0]
        assert "num_batches_tracked" not in borrowed[0]  # equal on both ranks: shared

        with pytest.raises(KeyError, match=r"rank 0 .*'w/rank5'"):
            mgr.load({"w": {"rank5": torch.zeros(33, 5)}}, strict=True)
        with pytest.raises(KeyError, match=r"rank 0 .*'loader/dp_rank_2'"):
            mgr.load({"loader": {"dp_rank_2": {}}}, strict=True)
        relaxed = {"w": {"rank1": torch.zeros(33, 5), "rank5": torch.zeros(2)}}
        mgr.load(relaxed, strict=False, restore_rng=False)  # what exists loads, the rest stays
        assert torch.equal(relaxed["w"]["rank1"], R.w_of(1, 1))
        assert torch.equal(relaxed["w"]["rank5"], torch.zeros(2))

        # What is not asked for is not delivered: a rank-local dict gets its own keys only.
        partial = {"loader": {"dp_rank_1": {}}}
        mgr.load(partial, restore_rng=False)
        assert partial == {"loader": {"dp_rank_1": R.loader_of(1, 1)}}


def test_three_ranks_get_the_keys_they_ask_for(saved_at_2: dict[str, Any]) -> None:
    """At 3 ranks: every rank gets both saving ranks' keys and rank 0's BatchNorm buffers,
    strictly, with one warning naming the per-rank tensors; then rank 2 asks strictly for
    ``w/rank2``, which no rank saved: it raises ``KeyError`` naming the key and itself, its peers
    a ``CollectiveError`` naming rank 2."""
    results = run_ranks(R.ranklocal_load_elsewhere, 3, str(saved_at_2["root"]), timeout=180,
                        env=ENV)
    rank0 = saved_at_2["ranks"][0]
    fresh = R.bn_buffers(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8)))  # initial stats
    for rank, r in enumerate(results):
        assert r["problems"] == [], (rank, r["problems"])
        assert r["buffers"] == rank0["buffers"] != fresh
        assert r["weight"] == rank0["weight"]
        borrowed = [w for w in r["warnings"] if "per-rank tensors" in w]
        assert len(borrowed) == 1 and "bn/1.running_mean (rank 0)" in borrowed[0], r["warnings"]
    assert results[2]["missing_error"].startswith("KeyError")
    assert "'w/rank2'" in results[2]["missing_error"]
    assert "rank 2 asks for keys that no rank saved" in results[2]["missing_error"]
    for r in results[:2]:
        assert r["missing_error"].startswith("CollectiveError") and "rank 2" in \
            r["missing_error"] and "w/rank2" in r["missing_error"]


def test_show_says_which_ranks_wrote_each_key(saved_at_2: dict[str, Any],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = str(saved_at_2["root"])
    capsys.readouterr()
    assert cli_main(["show", root]) == 0
    out = capsys.readouterr().out
    table, local = out.split("rank-local state")
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.strip()}
    assert rows["w/rank0"][-3] == "0" and rows["w/rank1"][-3] == "1"  # RANKS column
    assert rows["model/w"][-3] == "0-1"  # FSDP shards: both ranks wrote pieces
    assert "stats [rank 0]" in table and "stats [rank 1]" in table
    assert re.search(r"^\s+loader/dp_rank_0\s+ranks 0$", local, re.M)
    assert re.search(r"^\s+loader/dp_rank_1\s+ranks 1$", local, re.M)
    assert cli_main(["show", root, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rank_local"]["loader/dp_rank_1"] == {"ranks": [[1, 2]], "differ": False}
    assert doc["rank_local"]["w/rank0"] == {"ranks": [[0, 1]], "differ": False}
    assert doc["tensors"]["w/rank1"]["ranks"] == [[1, 2]]


SEEDS = (101, 202, 303, 404, 505)
MAX_DELAY_S = 1.5


@pytest.mark.timeout(300)
def test_rank_local_job_sigkilled_at_random_moments(tmp_path: Path) -> None:
    """Five times: a 2-rank job saving rank-specific keys every step (async, keep-last-3) is
    SIGKILLed as a whole at a seeded random moment. Every checkpoint it left loads, in one
    process, with the values both ranks saved at that step; then a 2-rank job resumes from
    each (each rank gets its own keys and its own ``stats``) and saves the next step."""
    roots = []
    for seed in SEEDS:
        root, log = tmp_path / f"seed{seed}", tmp_path / f"seed{seed}.log"
        with pytest.raises(RankFailures) as excinfo:
            run_ranks(R.kill_ranklocal_at_random, 2, str(root), seed, str(log), MAX_DELAY_S,
                      timeout=120, env=ENV)
        assert excinfo.value.failures == {0: KILLED, 1: KILLED}, excinfo.value
        acknowledged = [int(line) for line in log.read_text().split()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the per-rank ``stats`` come from rank 0
            with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
                listed = mgr.steps()
                assert acknowledged[-1] in listed, (seed, acknowledged, listed)
                for step in listed:
                    got = R.blank_for([0, 1])
                    assert mgr.load(got, step=step, restore_rng=False) == step
                    assert R.ranklocal_problems(got, step, [0, 1], 0) == [], (seed, step)
        roots.append(root)
    results = run_ranks(R.ranklocal_recover, 2, [str(r) for r in roots], timeout=120, env=ENV)
    for per_root in zip(*results):
        assert [r["problems"] for r in per_root] == [[], []], per_root
        assert all(r["saved"] == r["latest"] + 1 for r in per_root[:1])
        assert not any("per-rank" in w for r in per_root for w in r["warnings"]), per_root


# ------------------------------------------------------------------------------ item 5 (units)


def test_strict_load_never_leaves_a_module_tensor_unrestored() -> None:
    """A module tensor under a subtree that differs between the saving ranks, at another world
    size: strict raises naming it; not strict leaves it, reported as skipped."""
    model = nn.Linear(2, 2)
    before = model.weight.detach().clone()
    node = ["M", ["d", {"weight": ["R", [["T", "m/weight"], ["l", []]]], "bias": ["T", "m/bias"]}]]

    def request(key: str, dest: torch.Tensor | None, where: str) -> Any:
        return dest

    strict = LoadContext(request, None, 2, True, caller_rank=1)
    with pytest.raises(ValueError, match=r"m/weight: .*rank 1 has no copy of its own"):
        fill(model, node, "m", strict)
    loose = LoadContext(request, None, 2, False)
    fill(model, node, "m", loose)
    assert loose.skipped == ["m/weight"] and torch.equal(model.weight, before)


def test_model_mismatch_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    with shardckpt.CheckpointManager(str(tmp_path), async_save=False) as mgr:
        mgr.save(1, {"model": nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))})
        other = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))  # 2.* -> 1.*
        with pytest.raises(KeyError) as info:
            mgr.load({"model": other})
    msg = str(info.value)
    assert "missing keys" in msg and "'2.weight'" in msg and "'2.bias'" in msg
    assert "unexpected keys" in msg and "'1.weight'" in msg and "'1.bias'" in msg


# ------------------------------------------------------------------------------ tree and plan


def test_merge_keeps_the_union_and_names_the_ranks() -> None:
    trees = [collect({"d": {f"k{r}": r, "same": 1, "most": 5 if r < 3 else None}}).tree
             for r in range(4)]
    tree = T.merge_ranks(trees)
    body = tree[1]["d"][1]
    assert body["same"] == ["i", 1]
    assert body["k2"] == ["P", [[[[2, 3]], ["i", 2]]]]
    assert body["most"] == ["R", [["i", 5], ["i", 5], ["i", 5], ["n"]]]
    sparse = T.merge_ranks([collect({"d": {"x": 1}}).tree, collect({"d": {}}).tree,
                            collect({"d": {"x": 1}}).tree, collect({"d": {"x": 2}}).tree])
    assert sparse[1]["d"][1]["x"] == ["P", [[[[0, 1], [2, 3]], ["i", 1]], [[[3, 4]], ["i", 2]]]]
    assert sorted(T.rank_local(sparse, 4)) == [("d/x", [0, 2, 3], True)]
    ints = T.merge_ranks([collect({"d": {0: 1}}).tree, collect({"d": {1: 1}}).tree])
    assert ints[1]["d"] == ["D", [[["i", 0], ["P", [[[[0, 1]], ["i", 1]]]]],
                                  [["i", 1], ["P", [[[[1, 2]], ["i", 1]]]]]]]


@pytest.mark.parametrize("bad", [["P", []], ["P", [[[[0, 3]], ["i", 1]]]],
                                 ["P", [[[[0, 1]], ["i", 1]], [[[0, 2]], ["i", 2]]]],
                                 ["P", [[[], ["i", 1]]]], ["P", [[[[1, 0]], ["i", 1]]]]])
def test_malformed_rank_local_nodes_are_corrupt(bad: list[Any]) -> None:
    ctx = LoadContext(lambda k, d, w: d, 0, 2, True)
    with pytest.raises(shardckpt.CorruptCheckpointError):
        fill({"x": 0}, ["d", {"x": bad}], "", ctx)


def test_plan_writes_rank_local_tensors_once_or_per_holder() -> None:
    def spec(key: str, digest: str) -> LeafSpec:
        return LeafSpec(key, "float32", (4,), (0,), (4,), False, None, digest)

    plan = assign([[spec("a", "1"), spec("b", "x"), spec("c", "5")],
                   [spec("b", "y")],
                   [spec("a", "1"), spec("c", "6")]])
    assert plan.kind == {"a": "shared", "b": "per_rank", "c": "per_rank"}
    writers = save_mod.writers_of(plan)
    assert len(writers["a"]) == 1 and writers["a"][0] in (0, 2)
    assert writers["b"] == [0, 1] and writers["c"] == [0, 2]
    specs = [[spec("a", "1"), spec("b", "x"), spec("c", "5")], [spec("b", "y")],
             [spec("a", "1"), spec("c", "6")]]
    entries = save_mod.directory(specs, plan)
    assert entries["c"].per_rank is not None and entries["c"].per_rank[1] is None
    doc = entries["c"].to_json()
    assert doc["per_rank"][1] is None


# ------------------------------------------------------------------------------ item 7


BAD_STATES = {
    "numpy": ({"arr": np.zeros(3)}, TypeError, "arr: cannot checkpoint"),
    "nested-object": ({"a": {"b": [0, R.NotCheckpointable()]}}, TypeError, "a/b/1:"),
    "reserved-key": ({"__shardckpt_x__": 1}, ValueError, "reserved"),
}


@pytest.mark.parametrize("blocking", [False, True], ids=["async", "blocking"])
@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_bad_state_raises_from_save_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           case: str, blocking: bool) -> None:
    bad, exc_type, text = BAD_STATES[case]
    prepared: list[str] = []
    real = save_mod.prepare_step_dir
    monkeypatch.setattr(save_mod, "prepare_step_dir",
                        lambda loc, d: (prepared.append(d), real(loc, d))[1])
    with shardckpt.CheckpointManager(str(tmp_path), async_save=not blocking) as mgr:
        mgr.save(1, {"x": torch.ones(3)}).wait()
        with pytest.raises(exc_type, match=re.escape(text)):
            mgr.save(2, {"x": torch.ones(3), **bad})  # no wait(): save() itself raises
        assert prepared == ["step-0000000001"]  # nothing of step 2 was ever written
        assert not (tmp_path / "step-0000000002").exists()
        info = mgr.save(2, {"x": torch.full((3,), 2.0)}).wait()  # the next save works
        assert info is not None and info.step == 2 and mgr.steps() == [1, 2]
        got = {"x": torch.zeros(3)}
        mgr.load(got)
        assert torch.equal(got["x"], torch.full((3,), 2.0))


@pytest.mark.parametrize("blocking", [False, True], ids=["async", "blocking"])
def test_bad_state_on_one_rank_raises_on_every_rank(tmp_path: Path, blocking: bool) -> None:
    results = run_ranks(R.refused_saves, 2, str(tmp_path / "ckpt"), blocking, timeout=120,
                        env=ENV)
    for rank, per_rank in enumerate(results):
        *cases, final = per_rank
        for case in cases:
            err = case["error"]
            assert err is not None and err.startswith("CollectiveError"), (rank, case)
            if case["case"] == "unsupported-value":
                assert "rank(s) [1]" in err and "extra/arr: cannot checkpoint" in err
            else:
                assert "rank(s) [0]" in err and "reserved" in err
            assert "nothing was written" in err
            bad_rank = 1 if case["case"] == "unsupported-value" else 0
            assert case["from"] == ("save" if blocking else "handle"), case
            assert case["warned"] == (not blocking and rank == bad_rank), case
            assert not case["dir_exists"] and case["steps"] == [1]
        assert final == {"steps": [1, 2], "loaded": 2, "problems": []}


def test_per_rank_entry_without_any_holder_is_corrupt() -> None:
    entry = {"per_rank": [None, None]}
    with pytest.raises(shardckpt.CorruptCheckpointError, match="no rank holding"):
        M._parse_tensors({"k": entry}, {}, 2, "manifest.json")


def test_missing_destination_keys_of_other_ranks_are_not_added() -> None:
    """A rank-local entry of another rank is not delivered to a rank that did not ask."""
    node = ["d", {"mine": ["P", [[[[0, 1]], ["i", 1]]]], "theirs": ["P", [[[[1, 2]], ["i", 2]]]]}]
    dest: dict[str, Any] = {}
    fill(dest, node, "", LoadContext(lambda k, d, w: d, 0, 2, False))
    assert dest == {"mine": 1}
    assert fill(MISSING, node, "", LoadContext(lambda k, d, w: d, None, 2, False)) == {}


def test_differing_rank_local_values_go_only_to_their_own_ranks() -> None:
    """Two ranks saved different values under a key a third lacks: each of them gets its own at
    the saving world size; anyone else asking is left as it was, reported as skipped."""
    node = ["d", {"x": ["P", [[[[0, 1]], ["i", 10]], [[[2, 3]], ["i", 12]]]]}]
    for rank, want in ((0, 10), (2, 12)):
        dest = {"x": -1}
        fill(dest, node, "", LoadContext(lambda k, d, w: d, rank, 3, True))
        assert dest == {"x": want}
    for rank in (1, None):  # a rank that did not save it; another world size
        ctx = LoadContext(lambda k, d, w: d, rank, 3, True)
        dest = {"x": -1}
        fill(dest, node, "", ctx)
        assert dest == {"x": -1} and ctx.skipped == ["x"]
