"""Rank functions for tests/test_load_checks.py and tests/test_corrupt_newest.py (issue 25
items 4 and 7), run at 2 ranks by ``harness.run_ranks`` (from the fork server of
``crash_targets.forked_ranks``). The saved state is ``crash_targets.rank_state``: DTensors
sharded by rows over the ranks, so each rank writes a shard file of its own, plus replicated
tensors."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from crash_targets import _mesh, blank_state, rank_state, state_problems

import shardckpt
from shardckpt.engine.reader import CheckpointReader
from shardckpt.storage import open_location

EXPANDED_ROWS = 6


def expanded(step: int) -> torch.Tensor:
    """A stride-0 (``expand()``ed) tensor: 6 rows of 4 equal values."""
    return torch.arange(EXPANDED_ROWS, dtype=torch.float32).add(step).reshape(-1, 1).expand(-1, 4)


def _untouched(state: dict[str, Any]) -> list[str]:
    """What of a ``blank_state`` (all zeros, step -1) a failed load changed; [] if nothing."""
    changed = [] if state["step"] == -1 else [f"step field is {state['step']}"]
    for key, t in state["model"].items():
        local = t.to_local() if hasattr(t, "to_local") else t
        if bool(local.ne(0).any()):
            changed.append(f"model/{key}")
    return changed


def _error(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc),
            "corrupt": isinstance(exc, shardckpt.CorruptCheckpointError),
            "collective": isinstance(exc, shardckpt.errors.CollectiveError)}


def destination_checks(rank: int, world: int, root: str) -> dict[str, Any]:
    """Save step 1 (with an expanded tensor), then load it three times: rank 1 passes an
    expanded destination, then a wrong shape (rank 0's state is right both times), then every
    rank passes a right state, with a plain tensor for the expanded one."""
    mesh = _mesh(world)
    out: dict[str, Any] = {}
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        state = rank_state(1, mesh)
        state["extra"] = {"exp": expanded(1)}
        mgr.save(1, state)
        for case in ("expand", "shape"):
            blank = blank_state(mesh)
            if rank == 1 and case == "expand":
                blank["model"]["bias"] = torch.zeros(1, dtype=torch.float64).expand(300)
            if rank == 1 and case == "shape":
                blank["model"]["ids"] = torch.zeros(128, dtype=torch.int64)
            try:
                mgr.load(blank, 1)
            except Exception as exc:
                out[case] = {**_error(exc), "changed": _untouched(blank)}
            else:
                out[case] = None
        blank = blank_state(mesh)
        blank["extra"] = {"exp": torch.zeros(EXPANDED_ROWS, 4)}
        out["loaded"] = mgr.load(blank, 1)
        out["problems"] = state_problems(blank, 1, mesh)
        exp = blank["extra"]["exp"]
        out["exp_equal"] = bool(torch.equal(exp, expanded(1)))
        out["exp_strides"] = list(exp.stride())
    return out


def meta_save(rank: int, world: int, root: str) -> dict[str, Any]:
    """A blocking save whose state holds a meta tensor at ``opt/buf`` on rank 1 only."""
    state: dict[str, Any] = {"model": {"w": torch.ones(4)}, "opt": {"buf": torch.zeros(3)}}
    if rank == 1:
        state["opt"]["buf"] = torch.empty(3, device="meta")
    with shardckpt.CheckpointManager(root) as mgr:
        try:
            mgr.save(1, state, blocking=True)
        except Exception as exc:
            return {**_error(exc), "steps": mgr.steps()}
        return {"type": None, "steps": mgr.steps()}


def damage(root: str, manifest: Any, victim_rank: int, how: str) -> str:
    """Damage the shard file that ``victim_rank`` wrote at the step of ``manifest``: flip a
    byte inside its first data chunk (``chunk``) or cut the file in half (``truncate``).
    Returns its path."""
    step = manifest.step
    name = next(n for n, rec in sorted(manifest.files.items()) if rec.rank == victim_rank)
    step_dir = f"step-{step:010d}"
    path = os.path.join(root, step_dir, name)
    if how == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
        return path
    header = CheckpointReader(open_location(root), step_dir, manifest).check_file(name)
    chunk = header.pieces[0].chunks[0]
    with open(path, "r+b") as f:
        f.seek(chunk.offset + chunk.stored // 2)
        byte = f.read(1)
        f.seek(chunk.offset + chunk.stored // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    return path


def corrupt_newest(rank: int, world: int, root: str, how: str) -> dict[str, Any]:
    """Save steps 1 and 2; rank 0 damages rank 1's shard of step 2 (``how``); then
    ``load(step=2)``, ``load()`` (falls back to step 1), a new save of step 2 and ``load()``."""
    mesh = _mesh(world)
    out: dict[str, Any] = {}
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        for step in (1, 2):
            mgr.save(step, rank_state(step, mesh))
        dist.barrier()
        if rank == 0:
            out["damaged"] = os.path.basename(damage(root, mgr.manifest(2), 1, how))
        dist.barrier()
        blank = blank_state(mesh)
        try:
            mgr.load(blank, 2)
        except Exception as exc:
            out["explicit"] = {**_error(exc), "changed": _untouched(blank)}
        else:
            out["explicit"] = None
        blank = blank_state(mesh)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["fallback_step"] = mgr.load(blank)
        out["warnings"] = [str(w.message) for w in caught]
        out["fallback_problems"] = state_problems(blank, out["fallback_step"], mesh)
        dist.barrier()  # rank 0 has moved the bad step aside before returning from load()
        out["steps_after"] = mgr.steps()
        out["listing"] = sorted(os.listdir(root))
        mgr.save(2, rank_state(2, mesh))
        blank = blank_state(mesh)
        out["resumed_step"] = mgr.load(blank)
        out["resumed_problems"] = state_problems(blank, 2, mesh)
    return out
