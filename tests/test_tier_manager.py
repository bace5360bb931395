"""``CheckpointManager(local=shardckpt.LocalTier(...))`` (issue 28), the save side:
``should_save`` is true when either tier is due, ``save`` writes the due tiers (``tier=``
overrides), a local save never waits for a persistent one and is skipped (warned, counted) when
the previous local save is still running. ``steps(tier="local")`` lists this node's steps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import tier_targets as T
import torch
from harness import run_ranks

import shardckpt

ENV = {"OMP_NUM_THREADS": "1", "SHARDCKPT_COLLECTIVE_TIMEOUT": "60"}


@pytest.fixture(scope="module", autouse=True)
def _fast_ranks() -> Iterator[None]:
    with T.forked_ranks():
        yield


def test_a_job_saves_both_tiers_as_they_fall_due(tmp_path: Path) -> None:
    out = run_ranks(T.manager_loop, 4, str(tmp_path), ["0", "0", "1", "1"], env=ENV,
                    timeout=150)
    for rep in out:
        assert rep["due"] == [1, 2, 3, 4, 5, 6, 7]
        assert rep["persistent"] == [5]
        assert rep["local"] == [6, 7]
        assert rep["second"] and rep["skipped"] == [9]
        (msg,) = rep["warnings"]
        assert "local save of step 9 skipped" in msg and "1 skipped so far" in msg
        assert rep["persistent_waited"] is False
        assert rep["after"] == [5, 10, 11]
        assert rep["local_after"] == [8, 10]
    for node in ("0", "1"):  # a local step holds a small replicated tensor on every rank
        tensors = shardckpt.consolidated_state_dict(str(tmp_path / node), step=10)
        assert [tensors[f"w@rank{r}"].tolist() for r in range(4)] == [[1.0, 1.0, 1.0]] * 4


def test_one_process_local_tier(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="single node"):
        mgr = shardckpt.CheckpointManager(
            str(tmp_path / "p"), save_every=4, async_save=False, capture_rng=False,
            local=shardckpt.LocalTier(str(tmp_path / "{node}"), every=2, copies=1, keep=1,
                                      node="solo"))
    with mgr:
        assert [s for s in range(1, 9) if mgr.should_save(s)] == [2, 4, 6, 8]
        for step in (2, 4, 6):
            mgr.save(step, {"w": torch.full((4,), float(step))})
        assert mgr.steps() == [4]  # save_every=4
        assert mgr.steps(tier="local") == [6]  # keep=1
        mgr.save(7, {"w": torch.zeros(4)})  # nothing due: the persistent tier, as before
        assert mgr.steps() == [4, 7]
        with pytest.raises(ValueError, match="tier must be"):
            mgr.save(9, {"w": torch.zeros(4)}, tier="fast")
    assert shardckpt.consolidated_state_dict(str(tmp_path / "solo"), step=6)["w"].tolist() \
        == [6.0] * 4


def test_tier_arguments_need_a_local_tier(tmp_path: Path) -> None:
    with shardckpt.CheckpointManager(str(tmp_path), async_save=False) as mgr:
        assert not mgr.should_save(3)
        with pytest.raises(ValueError, match="needs a local tier"):
            mgr.save(1, {"w": torch.ones(2)}, tier="local")
        with pytest.raises(ValueError, match="needs a local tier"):
            mgr.steps(tier="local")
        mgr.save(1, {"w": torch.ones(2)}, tier="persistent")
        assert mgr.steps(tier="persistent") == [1]
    with pytest.raises(TypeError, match="LocalTier"):
        shardckpt.CheckpointManager(str(tmp_path), local="/dev/shm/x")  # type: ignore[arg-type]


def test_a_job_resumes_from_the_local_tier_after_losing_a_node(tmp_path: Path) -> None:
    """Local every step, persistent every 5: after step 7, node 1's path is deleted; the
    resumed job starts at step 7 (not 5), node 1's ranks receiving their files from node 0,
    with every rank's RNG streams as they were at the save."""
    import shutil

    nodes = ["0", "0", "1", "1"]
    run_ranks(T.manager_train, 4, str(tmp_path), nodes, list(range(1, 8)), env=ENV, timeout=150)
    shutil.rmtree(tmp_path / "1")
    out = run_ranks(T.manager_resume, 4, str(tmp_path), nodes, env=ENV, timeout=150)
    for rank, rep in enumerate(out):
        assert (rep["step"], rep["tier"], rep["exact"], rep["rng"]) == (7, "local", True, True), \
            rep["warnings"]
        assert (rep["bytes_received"] > 0) == (rank >= 2)
    from shardckpt.audit import read_trail
    from shardckpt.storage import open_location

    records, _ = read_trail(open_location(str(tmp_path / "persistent")), 7)
    restores = [r for r in records if r["event"] == "restore_local"]
    assert restores[-1]["detail"]["bytes_received"] == sum(r["bytes_received"] for r in out)
    shutil.rmtree(tmp_path / "0")
    shutil.rmtree(tmp_path / "1")
    out = run_ranks(T.manager_resume, 4, str(tmp_path), nodes, env=ENV, timeout=150)
    assert [(r["step"], r["tier"], r["exact"], r["rng"]) for r in out] == \
        [(5, "persistent", True, True)] * 4
    assert [w for w in out[0]["warnings"] if w.startswith("restored")] == [
        "restored persistent step 5; newer candidates were skipped: the local tier holds no "
        "recoverable step"]
