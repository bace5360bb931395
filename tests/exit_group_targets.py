"""Rank functions of tests/test_exit_groups.py (imported by the forked ranks)."""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist

import shardckpt
from shardckpt import exit_wait


def group_lifetime(rank: int, world_size: int, root: str, how: str) -> dict[str, Any]:
    """A manager saves step 1 asynchronously, then the job ends ``how``: ``close`` (then the
    teardown), ``destroy`` (``destroy_process_group()``, no ``close()``), ``destroy_ours``
    (``destroy_process_group(the manager's group)``) or ``exit`` (neither: the exit hook, as at
    interpreter exit). Reports whether the manager's private gloo group object is still alive
    right after that: without a garbage collection, so alive means it would be freed only by
    a finalizing interpreter."""
    dist.init_process_group("gloo")
    mgr = shardckpt.CheckpointManager(root)
    group = weakref.ref(mgr._comm.group)
    state = {"w": torch.arange(1000, dtype=torch.float32) + rank, "step": 1}
    mgr.save(1, state)  # in flight when the job ends
    if how == "close":
        mgr.close()
    elif how == "destroy":
        dist.destroy_process_group()
    elif how == "destroy_ours":
        dist.destroy_process_group(mgr._comm.group)
    else:
        exit_wait._at_exit()
    alive = group() is not None
    steps = mgr.steps()
    mgr.close()  # a no-op after the exit hook; after a teardown, nothing left to wait for
    if how != "destroy":
        dist.destroy_process_group()
    return {"alive": alive, "steps": steps}
