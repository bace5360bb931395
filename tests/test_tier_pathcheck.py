"""A local tier's paths are checked when the manager is built (issue 28, found in a user
trial): a local path that is, or is inside, a persistent location would have its persistent
checkpoints deleted by local retention; two nodes sharing one local path would damage every
local step. Both are refused on every rank, naming the path."""

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


@pytest.mark.parametrize("local", ["run", "run/local", "."])
def test_a_local_path_overlapping_the_persistent_root_is_refused(tmp_path: Path,
                                                                  local: str) -> None:
    root = tmp_path / "run"
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        for step in (5, 10):
            mgr.save(step, {"w": torch.full((4,), float(step))})
    with pytest.warns(UserWarning, match="single node"), \
            pytest.raises(ValueError, match="overlaps the persistent location"):
        shardckpt.CheckpointManager(str(root), local=shardckpt.LocalTier(
            str(tmp_path / local), every=1, copies=1, keep=2))
    with shardckpt.CheckpointManager(str(root)) as mgr:
        assert mgr.steps() == [5, 10]  # nothing deleted


def test_two_nodes_sharing_one_local_path_are_refused_on_every_rank(tmp_path: Path) -> None:
    out = run_ranks(T.path_check, 4, str(tmp_path), "{root}/local", ["0", "0", "1", "1"],
                    env=ENV, timeout=120)
    assert all("is shared with node(s)" in o for o in out), out


def test_each_node_with_its_own_path_is_accepted(tmp_path: Path) -> None:
    out = run_ranks(T.path_check, 4, str(tmp_path), "{root}/{node}", ["0", "0", "1", "1"],
                    env=ENV, timeout=120)
    assert out == ["ok"] * 4
