"""Rank functions of the recovery tests (issue 15): a job that loses its S3 replica mid-run."""

from __future__ import annotations

import os
import signal
import time
import warnings
from typing import Any

import dist_targets as T
import torch.distributed as dist

import shardckpt


def train_losing_replica(rank: int, world: int, root: str, replica: str,
                         storage_options: dict, server_pid: int, kill_after: int,
                         steps: int) -> dict[str, Any]:
    """FSDP2 training saving every step to a local root and an S3 replica (min_replicas=1);
    rank 0 SIGKILLs the S3 server after the save of ``kill_after`` commits. Returns where
    each step was committed and the full state after the last step."""
    model, optim, sched = T.build(sharded=True)
    state = {"model": model, "optim": optim, "sched": sched, "progress": {"step": 0}}
    where: dict[int, list[str]] = {}
    with warnings.catch_warnings(record=True) as caught, \
            shardckpt.CheckpointManager(root, replicas=[replica], min_replicas=1,
                                        storage_options=storage_options) as mgr:
        warnings.simplefilter("always")
        for step in range(1, steps + 1):
            T.train_step(model, optim, sched, step, rank)
            state["progress"]["step"] = step
            info = mgr.save(step, state).wait()
            if info is not None:
                where[step] = list(info.replicas)
            if step == kill_after and rank == 0:
                os.kill(server_pid, signal.SIGKILL)
                _wait_dead(server_pid)
            dist.barrier()
    ref = T.full_state(model, optim)
    return {"where": where, "ref": {k: v.tolist() for k, v in ref.items()},
            "warnings": [str(w.message) for w in caught]}


def resume_without_replica(rank: int, world: int, root: str, replica: str,
                           storage_options: dict) -> dict[str, Any]:
    """A new job with the same configuration, while the replica is down: resume and compare."""
    model, optim, sched = T.build(sharded=True, seed=7)
    state = {"model": model, "optim": optim, "sched": sched, "progress": {"step": 0}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.monotonic()
        with shardckpt.CheckpointManager(root, replicas=[replica], min_replicas=1,
                                         storage_options=storage_options) as mgr:
            latest = mgr.latest_step()
            loaded = mgr.load(state)
            seconds = time.monotonic() - t0
    got = T.full_state(model, optim)
    return {"latest": latest, "loaded": loaded, "progress": state["progress"]["step"],
            "seconds": seconds, "state": {k: v.tolist() for k, v in got.items()},
            "warnings": [str(w.message) for w in caught]}


def _wait_dead(pid: int) -> None:
    """Until ``pid`` (a child of the test process, not ours) is gone or a zombie."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return
        except (FileNotFoundError, IndexError):
            return
        time.sleep(0.05)
