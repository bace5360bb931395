"""Rank functions for tests/test_ranklocal.py (imported by the children of ``harness.run_ranks``
and by the tests themselves for the state helpers).

The rank-local state saved at a step is a function of (step, rank) alone, so the parent can check
what a surviving checkpoint holds, at any world size, without a word from the dead children:

* ``w/rank{R}``: a tensor under a key only rank R has (``{"w": {f"rank{rank}": tensor}}``);
* ``loader/dp_rank_{R}``: non-tensor state under a key only rank R has (torchtitan's data loader);
* ``stats``: a plain tensor every rank has, with different values on each (per-rank state);
* ``model``: the DTensors and replicated tensors of ``crash_targets.rank_state``.
"""

from __future__ import annotations

import os
import random
import threading
import warnings
from typing import Any

import crash_targets as C
import torch
import torch.distributed as dist
import torch.nn as nn

import shardckpt

# ------------------------------------------------------------------------------ rank-local state


def w_of(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(9000 + 97 * step + rank)
    return torch.randn(33, 5, generator=g)


def loader_of(step: int, rank: int) -> dict[str, Any]:
    return {"pos": step * 1000 + rank, "epoch": step % 7, "files": [f"part-{rank}", step]}


def stats_of(step: int, rank: int) -> torch.Tensor:
    return torch.full((5,), step + rank / 8, dtype=torch.float64)


def ranklocal_state(step: int, rank: int, mesh: Any = None) -> dict[str, Any]:
    state = C.rank_state(step, mesh)
    state["w"] = {f"rank{rank}": w_of(step, rank)}
    state["loader"] = {f"dp_rank_{rank}": loader_of(step, rank)}
    state["stats"] = stats_of(step, rank)
    return state


def blank_for(ranks: list[int], mesh: Any = None) -> dict[str, Any]:
    """Zeros shaped like the state, asking for the rank-local keys of ``ranks``."""
    state = C.blank_state(mesh)
    state["w"] = {f"rank{r}": torch.zeros(33, 5) for r in ranks}
    state["loader"] = {f"dp_rank_{r}": {} for r in ranks}
    state["stats"] = torch.zeros(5, dtype=torch.float64)
    return state


def ranklocal_problems(got: dict[str, Any], step: int, ranks: list[int], stats_rank: int,
                       mesh: Any = None) -> list[str]:
    """How ``got`` differs from what ranks ``ranks`` saved at ``step`` ([] if bit-identical);
    ``stats`` must hold rank ``stats_rank``'s copy."""
    problems = C.state_problems(got, step, mesh)
    for r in ranks:
        if not torch.equal(got["w"][f"rank{r}"], w_of(step, r)):
            problems.append(f"w/rank{r} differs from step {step}")
        if got["loader"][f"dp_rank_{r}"] != loader_of(step, r):
            problems.append(f"loader/dp_rank_{r} = {got['loader'][f'dp_rank_{r}']}")
    if not torch.equal(got["stats"], stats_of(step, stats_rank)):
        problems.append(f"stats = {got['stats'].tolist()}, not rank {stats_rank}'s")
    return problems


def kill_ranklocal_at_random(rank: int, world: int, root: str, seed: int, log_path: str,
                             max_delay: float) -> None:
    """Save rank-local state every step (async, keep-last-3 retention) until rank 0 SIGKILLs
    the whole job after a delay drawn from ``random.Random(seed)``. Rank 0 appends to
    ``log_path`` each step whose save it saw succeed."""
    mesh = C._mesh(world)
    pids = C._job_pids(world)
    mgr = shardckpt.CheckpointManager(root, retention=shardckpt.RetentionPolicy(keep_last=3))
    mgr.save(1, ranklocal_state(1, rank, mesh)).wait()
    log = open(log_path, "a", buffering=1) if rank == 0 else None
    if log is not None:
        log.write("1\n")
        killer = threading.Timer(random.Random(seed).uniform(0.0, max_delay), C._die,
                                 args=(pids,))
        killer.daemon = True
        killer.start()
    prev = None
    for step in range(2, 100_000):
        handle = mgr.save(step, ranklocal_state(step, rank, mesh))  # waits for the previous
        if prev is not None and log is not None:
            prev.wait()
            log.write(f"{prev.step}\n")
        prev = handle
    raise AssertionError("the job was never killed")


def ranklocal_recover(rank: int, world: int, roots: list[str]) -> list[dict[str, Any]]:
    """The next job on each crashed root, at the saving world size: each rank loads its own
    keys of the latest checkpoint (its own ``stats``), rank 1 also the key rank 0 wrote, then
    the job saves the step after it."""
    mesh = C._mesh(world)
    out = []
    for root in roots:
        with shardckpt.CheckpointManager(root) as mgr:
            asked = [rank] if rank == 0 else [0, rank]
            state = blank_for(asked, mesh)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                latest = mgr.load(state)
            problems = ranklocal_problems(state, latest, asked, rank, mesh)
            info = mgr.save(latest + 1, ranklocal_state(latest + 1, rank, mesh)).wait()
            out.append({"latest": latest, "problems": problems,
                        "warnings": [str(w.message) for w in caught],
                        "saved": info.step if info is not None else None})
    return out


# ------------------------------------------------------------------------------ BatchNorm buffers


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def bn_buffers(model: nn.Module) -> dict[str, list[str]]:
    """The BatchNorm buffers, as exact hex floats."""
    bn = model[1]
    return {"running_mean": [x.hex() for x in bn.running_mean.tolist()],
            "running_var": [x.hex() for x in bn.running_var.tolist()],
            "num_batches_tracked": [str(int(bn.num_batches_tracked))]}


def _fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0])
    fully_shard(model)
    return model


def _full_weight(model: nn.Module) -> list[str]:
    w = model[0].weight
    w = w.full_tensor() if hasattr(w, "full_tensor") else w
    return [x.hex() for x in w.detach().reshape(-1).tolist()]


def ranklocal_save(rank: int, world: int, root: str) -> dict[str, Any]:
    """An FSDP2 model with BatchNorm trained on different data per rank (so its running stats
    differ), saved at step 1 with rank-local state. Returns this rank's buffers and weights."""
    mesh = C._mesh(world)
    model = _fsdp(bn_model())
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(3):
        g = torch.Generator().manual_seed(100 * rank + i)
        x = torch.randn(16, 6, generator=g) * (1 + rank)
        model(x).sum().backward()
        optim.step()
        optim.zero_grad()
    state = ranklocal_state(1, rank, mesh)
    state["bn"] = model
    with shardckpt.CheckpointManager(root) as mgr:
        mgr.save(1, state).wait()
    return {"buffers": bn_buffers(model), "weight": _full_weight(model)}


def ranklocal_load_elsewhere(rank: int, world: int, root: str) -> dict[str, Any]:
    """At another world size (every rank of it calls this): a fresh FSDP2 model loads strictly
    (its BatchNorm buffers get rank 0's copy), each rank asks for rank-local keys saved on
    other ranks, and then rank 2 asks, strictly, for a key that no rank saved."""
    mesh = C._mesh(world)
    torch.manual_seed(123)
    model = _fsdp(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)))
    state = blank_for([0, 1], mesh)  # keys saved by rank 0 and by rank 1, asked for by all
    state["bn"] = model
    with shardckpt.CheckpointManager(root) as mgr:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mgr.load(state, strict=True)
        problems = ranklocal_problems(state, 1, [0, 1], 0, mesh)
        result = {"buffers": bn_buffers(model), "weight": _full_weight(model),
                  "problems": problems, "warnings": [str(w.message) for w in caught]}
        ask = blank_for([rank] if rank < 2 else [2], mesh)
        try:
            mgr.load(ask, strict=True)
            result["missing_error"] = None
        except Exception as exc:
            result["missing_error"] = f"{type(exc).__name__}: {exc}"
    return result


# ------------------------------------------------------------------------------ item 7: refusals


class NotCheckpointable:
    """A value of a type the state may not hold."""


def plain_state(step: int, rank: int, mesh: Any) -> dict[str, Any]:
    """The same keys on every rank (DTensors, replicated and per-rank tensors)."""
    state = C.rank_state(step, mesh)
    state["stats"] = stats_of(step, rank)
    return state


def refused_saves(rank: int, world: int, root: str, blocking: bool) -> list[dict[str, Any]]:
    """Step 1 saves. Then step 2 is saved with a bad state on one rank only: a value of an
    unsupported type on rank 1, a reserved key on rank 0. It must raise on every rank (the
    other rank's state is fine): from ``save()`` itself when blocking, from the save's handle on
    every rank alike when async (an async save never waits for the other ranks in ``save``; the
    rank at fault warns at once); nothing is written; the same step saved with a good state
    works next."""
    mesh = C._mesh(world)
    out = []
    with shardckpt.CheckpointManager(root, async_save=not blocking) as mgr:
        mgr.save(1, plain_state(1, rank, mesh)).wait()
        bad_states = [("unsupported-value", 1, {"extra": {"arr": NotCheckpointable()}}),
                      ("reserved-key", 0, {"__shardckpt_mine__": 1})]
        for case, bad_rank, extra in bad_states:
            state = plain_state(2, rank, mesh)
            if rank == bad_rank:
                state.update(extra)
            rec: dict[str, Any] = {"case": case}
            rec["from"] = "save"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    handle = mgr.save(2, state)  # blocking: the error comes from save() itself
                    rec["from"] = "handle"  # async: every rank's handle raises it
                    handle.wait()
                    rec["error"] = None
                except Exception as exc:
                    rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["warned"] = any("will fail on every rank" in str(w.message) for w in caught)
            rec["dir_exists"] = os.path.exists(os.path.join(root, "step-0000000002"))
            rec["steps"] = mgr.steps()
            out.append(rec)
        mgr.save(2, plain_state(2, rank, mesh)).wait()  # the next save works
        got = C.blank_state(mesh)
        got["stats"] = torch.zeros(5, dtype=torch.float64)
        loaded = mgr.load(got)
        problems = C.state_problems(got, 2, mesh)
        if not torch.equal(got["stats"], stats_of(2, rank)):
            problems.append("stats differ")
        out.append({"steps": mgr.steps(), "loaded": loaded, "problems": problems})
    dist.barrier()
    return out
