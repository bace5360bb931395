"""Rank functions for tests/test_two_writers.py: two jobs (each its own 2-rank gloo group) that
save the same steps to one root at the same time, and the state each of them saves.

The state a job saves at a step depends only on the job's seed and the step
(:func:`job_tensors`), so the parent can tell whose values a committed step holds.
"""

from __future__ import annotations

import os
from typing import Any

import torch

import shardckpt
from shardckpt.errors import ShardckptError


def job_tensors(seed: int, step: int) -> dict[str, torch.Tensor]:
    """The full (unsharded) tensors job ``seed`` saves at ``step``."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    return {"w": torch.randn(64, 48, generator=g),
            "bias": torch.randn(300, generator=g, dtype=torch.float64)}


def job_state(seed: int, step: int, rank: int, world: int) -> dict[str, Any]:
    """Rank ``rank``'s part: its rows of ``w`` under a key of its own (rank-local state:
    every rank writes data of its own), ``bias`` replicated, and the seed."""
    full = job_tensors(seed, step)
    rows = full["w"].shape[0] // world
    return {"model": {f"w{rank}": full["w"][rank * rows:(rank + 1) * rows].clone(),
                      "bias": full["bias"]}, "seed": seed, "step": step}


def expected(seed: int, step: int, world: int) -> dict[str, torch.Tensor]:
    """What a single process loading job ``seed``'s step must find."""
    full = job_tensors(seed, step)
    rows = full["w"].shape[0] // world
    out = {f"w{r}": full["w"][r * rows:(r + 1) * rows] for r in range(world)}
    out["bias"] = full["bias"]
    return out


def save_every_step(rank: int, world: int, root: str, seed: int, steps: int,
                    storage_options: dict[str, Any] | None = None,
                    arm: str | None = None, log_path: str | None = None) -> dict[str, Any]:
    """Save steps ``0 .. steps-1`` to ``root`` (async saves, each waited for at once); report
    the steps whose save was acknowledged (its handle returned without error) and the errors
    of the others. Rank 0 also appends each acknowledged step to ``log_path`` (a job that is
    killed reports nothing else). ``arm``: a phase of :func:`crash_targets.arm_kill` at which
    the whole job is SIGKILLed during the save of the last step (the crash-suite variant)."""
    mgr = shardckpt.CheckpointManager(root, storage_options=storage_options)
    log = open(log_path, "a", buffering=1) if log_path and rank == 0 else None
    acked: list[int] = []
    errors: dict[int, str] = {}
    for step in range(steps):
        if arm is not None and step == steps - 1:
            import crash_targets

            crash_targets.arm_kill(arm, crash_targets._job_pids(world), step)
        try:
            info = mgr.save(step, job_state(seed, step, rank, world)).wait()
        except ShardckptError as exc:
            errors[step] = f"{type(exc).__name__}: {exc}"
            continue
        assert info is None or info.step == step
        acked.append(step)
        if log is not None:
            log.write(f"{step}\n")
    mgr.close()
    return {"acked": acked, "errors": errors, "job": os.environ.get("SHARDCKPT_JOB_ID")}


def load_full(root: str, step: int, world: int,
              storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Step ``step`` of ``root`` as one process sees it: every rank's keys, and the seed."""
    model = {f"w{r}": torch.zeros(64 // world, 48) for r in range(world)}
    model["bias"] = torch.zeros(300, dtype=torch.float64)
    state: dict[str, Any] = {"model": model, "seed": -1, "step": -1}
    with shardckpt.CheckpointManager(root, async_save=False,
                                     storage_options=storage_options) as mgr:
        mgr.load(state, step=step, restore_rng=False)
    return state


def holds(state: dict[str, Any], seed: int, step: int, world: int) -> bool:
    """Whether a loaded ``state`` is job ``seed``'s step ``step``, bit for bit."""
    want = expected(seed, step, world)
    return state["seed"] == seed and state["step"] == step and all(
        torch.equal(state["model"][k], v) for k, v in want.items())
