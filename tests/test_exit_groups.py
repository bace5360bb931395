"""The manager's private gloo group is destroyed before the interpreter's teardown, on every way
a job can end (the flaky SIGABRT at exit of a 2-rank job: tests/test_resume.py[2-lazy]).

A manager sits in reference cycles, so a group it still held was freed only by the garbage
collection of a finalizing interpreter. The C++ destructor then releases the GIL and joins the
group's worker threads; a worker still holding the tensor of a finished collective whose Python
wrapper had died takes the GIL to free it, and a finalizing Python ends that thread with
``pthread_exit``, whose unwinding through a ``noexcept`` frame aborts the process ("terminate
called without an active exception"). Checked here without a garbage collection: the group
object must be gone right after ``close()``, ``destroy_process_group()`` or the exit hook.
"""

from __future__ import annotations

import os
from pathlib import Path

import exit_group_targets as T
import pytest
from harness import run_ranks

import shardckpt
from shardckpt import exit_wait

ENV = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("how", ["close", "destroy", "destroy_ours", "exit"])
def test_private_group_is_freed_before_interpreter_teardown(tmp_path: Path, how: str) -> None:
    out = run_ranks(T.group_lifetime, 2, str(tmp_path / "ck"), how, env=ENV, init_pg=False,
                    timeout=120)
    for rank, rep in enumerate(out):
        assert rep["alive"] is False, (rank, how)  # freed now, its worker threads joined
        assert rep["steps"] == [1], (rank, how)  # the save in flight committed first


def test_a_forked_child_forgets_its_parent_s_managers(tmp_path: Path) -> None:
    """A DataLoader worker is a fork that runs the exit hooks when it ends: it must not finish
    (or free the groups of) managers that are its parent's, whose threads it does not have."""
    mgr = shardckpt.CheckpointManager(str(tmp_path))
    pid = os.fork()
    if pid == 0:  # the child: nothing tracked, so its exit hook touches nothing
        os._exit(0 if len(exit_wait._tracked) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert mgr in exit_wait._tracked  # the parent's own tracking is untouched
    mgr.close()
