"""Issue 25 item 2: tearing the process group down before ``close()`` does not lose the last save.

``dist.destroy_process_group()`` with no argument destroys every group, the manager's private
gloo group included. A 2-rank ``torchrun`` job (``tests/teardown_script.py``) calls it while its
last async save is surely still in flight, then ``mgr.close()``. Before the fix the save failed
("Group ... is not registered") and was lost while the job exited 0. Now the save commits first;
if it cannot, every rank logs the cause and the job exits non-zero.
"""

from __future__ import annotations

from pathlib import Path

import torch
from harness import run_torchrun
from teardown_script import state_for

import shardckpt

SCRIPT = Path(__file__).resolve().parent / "teardown_script.py"
ENV = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "30", "OMP_NUM_THREADS": "1"}


def loads(root: Path, step: int) -> bool:
    with shardckpt.CheckpointManager(str(root)) as mgr:
        want = state_for(step)
        got = {"model": {"w": torch.zeros(128, 32)}, "progress": {"step": -1}}
        assert mgr.load(got, step, restore_rng=False) == step
        return torch.equal(got["model"]["w"], want["model"]["w"]) and \
            got["progress"] == {"step": step}


def test_destroy_before_close_commits_the_save_in_flight(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    done = run_torchrun(SCRIPT, 2, [str(root), "commit"], env=ENV, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0: closed" in done.stdout and "rank 1: closed" in done.stdout, done.stdout
    with shardckpt.CheckpointManager(str(root)) as mgr:
        assert mgr.steps() == [1, 2]
    assert loads(root, 2)


def test_save_that_cannot_commit_at_teardown_exits_nonzero(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    done = run_torchrun(SCRIPT, 2, [str(root), "fail"], env=ENV, timeout=180)
    assert done.returncode != 0, done.stdout + done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "could not be committed" in log, log[-3000:]
    assert "injected: the disk failed during the last save" in log, log[-3000:]
    assert "closed" not in done.stdout  # the teardown raised: the script went no further
    with shardckpt.CheckpointManager(str(root)) as mgr:
        assert mgr.steps() == [1]
    assert loads(root, 1)
