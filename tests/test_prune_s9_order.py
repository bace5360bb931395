"""Session 9 trial (issue 30): a prune of an incremental root stopped at any deletion leaves
every step still listed loadable: the dropped steps go newest first (a step references only
earlier ones), so no listed step loses a byte it references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.prune import prune_location
from shardckpt.storage import local as local_mod
from shardckpt.storage import open_location

A1, A3 = torch.full((20_000,), 1.0), torch.full((20_000,), 3.0)
B1, B2 = torch.full((20_000,), 10.0), torch.full((20_000,), 20.0)
STATES = {1: {"a": A1, "b": B1}, 2: {"a": A1, "b": B2}, 3: {"a": A3, "b": B2},
          4: {"a": A3, "b": B2}}  # 2 uses 1's a; 4 uses 3's a and 2's b; nothing kept uses 1


class Killed(BaseException):
    """The prune's process dying there: nothing after it runs (but `finally` blocks)."""


def build(root: Path) -> None:
    with shardckpt.CheckpointManager(str(root), async_save=False, incremental=True,
                                     capture_rng=False) as mgr:
        for step, state in STATES.items():
            mgr.save(step, {k: v.clone() for k, v in state.items()})


def listed_steps_load(root: Path) -> list[int]:
    with shardckpt.CheckpointManager(str(root), async_save=False, capture_rng=False) as mgr:
        steps = mgr.steps()
        for step in steps:
            out = {"a": torch.zeros(20_000), "b": torch.zeros(20_000)}
            assert mgr.load(out, step=step) == step
            assert all(torch.equal(out[k], STATES[step][k]) for k in out), step
    return steps


@pytest.mark.parametrize("stop_at", [1, 2, 3, 4, 5, 6])
def test_a_prune_stopped_at_any_deletion_leaves_listed_steps_loadable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_at: int) -> None:
    monkeypatch.setenv("SHARDCKPT_CHUNK_SIZE", str(64 * 1024))
    root = tmp_path / "run"
    build(root)
    calls = [0]
    real_remove, real_tree = local_mod.LocalLocation.remove, local_mod.LocalLocation.remove_tree

    def counted(real):  # type: ignore[no-untyped-def]
        def op(self, rel):  # type: ignore[no-untyped-def]
            if rel.startswith("step-"):
                calls[0] += 1
                if calls[0] == stop_at:
                    raise Killed(rel)
            return real(self, rel)
        return op
    with monkeypatch.context() as mp:
        mp.setattr(local_mod.LocalLocation, "remove", counted(real_remove))
        mp.setattr(local_mod.LocalLocation, "remove_tree", counted(real_tree))
        try:
            prune_location(open_location(str(root)), shardckpt.RetentionPolicy(keep_last=1),
                           grace=0)
        except Killed:
            pass
    assert listed_steps_load(root)[-1] == 4
    prune_location(open_location(str(root)), shardckpt.RetentionPolicy(keep_last=1), grace=0)
    assert listed_steps_load(root) == [4]
