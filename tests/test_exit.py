"""Issue 15 item 6: a script that saves and ends without ``close()`` loses nothing.

The scripts are real processes (plain ``python``, and a 2-rank ``torchrun`` job) running
``tests/exit_script.py``, whose last save is surely still in flight when the interpreter begins to
exit (see that file). Before the exit hook, that save failed with "cannot schedule new futures
after interpreter shutdown" and the script still exited 0.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import torch
from exit_script import state_for
from harness import run_torchrun

import shardckpt

SCRIPT = Path(__file__).resolve().parent / "exit_script.py"


def run_script(root: Path, mode: str, wait_s: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHARDCKPT_EXIT_WAIT_S": str(wait_s)}
    return subprocess.run([sys.executable, str(SCRIPT), str(root), mode], capture_output=True,
                          text=True, timeout=120, env=env)


def zeros_like(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: zeros_like(v) for k, v in state.items()}
    return 0


def assert_loads(root: Path, steps: list[int]) -> None:
    with shardckpt.CheckpointManager(str(root)) as mgr:
        assert mgr.steps() == steps
        for step in steps:
            want = state_for(step)
            got = zeros_like(want)
            assert mgr.load(got, step) == step
            for key in ("w", "b"):
                assert torch.equal(got["model"][key], want["model"][key]), key
            assert got["progress"] == {"step": step}


def test_last_async_save_is_committed_at_exit(tmp_path: Path) -> None:
    done = run_script(tmp_path / "ck", "commit")
    assert done.returncode == 0, done.stderr
    assert "script ends without close()" in done.stdout
    assert "cannot schedule new futures" not in done.stderr, done.stderr
    assert "was not closed: waiting up to 600 s (SHARDCKPT_EXIT_WAIT_S) at exit for the save " \
           "of step 2" in done.stderr, done.stderr
    assert "the save of step 2 at " in done.stderr and "committed at exit" in done.stderr
    # retention (keep_last=1) ran during the exit too: step 1 was pruned
    assert_loads(tmp_path / "ck", [2])


def test_last_async_save_of_a_two_rank_job_is_committed_at_exit(tmp_path: Path) -> None:
    done = run_torchrun(SCRIPT, 2, [str(tmp_path / "ck"), "commit"], timeout=180,
                        env={"SHARDCKPT_EXIT_WAIT_S": "600"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("script ends without close()") == 2, done.stdout
    assert "cannot schedule new futures" not in done.stderr, done.stderr
    assert done.stderr.count("committed at exit") == 2, done.stderr
    assert_loads(tmp_path / "ck", [2])
    with shardckpt.CheckpointManager(str(tmp_path / "ck")) as mgr:
        assert mgr.info(2).world_size == 2


def test_a_save_that_failed_unseen_is_logged_at_exit(tmp_path: Path) -> None:
    done = run_script(tmp_path / "ck", "fail")
    assert done.returncode == 0, done.stderr
    assert "the save of step 2 at " in done.stderr
    assert "failed (found at exit, the manager was not closed): OSError: [Errno 5] injected: " \
           "the disk went away during the last save" in done.stderr, done.stderr
    assert_loads(tmp_path / "ck", [1])  # the earlier checkpoint is untouched


def test_an_exit_wait_that_runs_out_is_logged(tmp_path: Path) -> None:
    done = run_script(tmp_path / "ck", "timeout", wait_s=0)
    assert done.returncode == 0, done.stderr
    assert "the save of step 2 at " in done.stderr
    assert "is still in flight after waiting 0 s (SHARDCKPT_EXIT_WAIT_S) at exit: it may never " \
           "be committed" in done.stderr, done.stderr
    assert 1 in shardckpt.CheckpointManager(str(tmp_path / "ck")).steps()


def test_an_unclosed_manager_can_still_be_garbage_collected(tmp_path: Path) -> None:
    mgr = shardckpt.CheckpointManager(str(tmp_path / "ck"))
    mgr.save(1, state_for(1)).wait()
    ref = weakref.ref(mgr)
    del mgr
    gc.collect()
    assert ref() is None


def test_a_closed_manager_is_not_waited_for_at_exit(tmp_path: Path) -> None:
    from shardckpt import exit_wait

    mgr = shardckpt.CheckpointManager(str(tmp_path / "ck"))
    assert mgr in set(exit_wait._tracked)
    mgr.close()
    assert mgr not in set(exit_wait._tracked)


CLOSED_SCRIPT = """
import sys
import shardckpt
from exit_script import state_for
mgr = shardckpt.CheckpointManager(sys.argv[1])
mgr.save(1, state_for(1))
mgr.close()
print("closed", flush=True)
"""


def test_a_script_that_closes_its_manager_exits_quietly(tmp_path: Path) -> None:
    """What the user sees of the above: nothing is waited for or logged at exit, and the save
    is there."""
    done = subprocess.run([sys.executable, "-c", CLOSED_SCRIPT, str(tmp_path / "ck")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              filter(None, [str(SCRIPT.parent), os.environ.get("PYTHONPATH")]))})
    assert done.returncode == 0 and done.stdout == "closed\n", done.stderr
    assert "at exit" not in done.stderr and "not closed" not in done.stderr, done.stderr
    assert_loads(tmp_path / "ck", [1])
