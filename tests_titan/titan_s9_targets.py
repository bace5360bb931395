"""Rank bodies of tests_titan/test_titan_s9_agree.py (session 9): a finished run (its last step
model-only) relaunched on 2 gloo ranks, with one rank's view of the folder made to differ from
the other's in the ways storage can (a listing that lags behind a commit, a manifest read that
is stale or fails once, a node-local tier that cannot be read), injected on rank 1 (on rank 0
where the name says so). Every rank must raise the same refusal, and none may be left waiting
in a collective."""

from __future__ import annotations

import dataclasses
from typing import Any

import titan_targets as T

from shardckpt.errors import StorageError


def _lagging(manager: Any) -> None:
    """This rank lists the steps without the newest one (a listing behind a commit)."""
    steps = manager.steps

    def lagging(tier: str | None = None) -> list[int]:
        return [s for s in steps(tier) if tier is not None or s != T.TOTAL]

    manager.steps = lagging


def _stale(manager: Any) -> None:
    """This rank reads the newest step's manifest without its tags (a stale or other copy)."""
    info = manager.info

    def stale(step: int) -> Any:
        got = info(step)
        return got if step != T.TOTAL else dataclasses.replace(got, tags=())

    manager.info = stale


def _failing_read(manager: Any) -> None:
    """This rank's manifest read fails once (a transient storage error)."""

    def failing(step: int) -> Any:
        raise StorageError(f"{manager.location.display}/step-{step}: read failed: timed out")

    manager.info = failing


INJECT = {"none": None, "lagging": _lagging, "stale": _stale, "failing": _failing_read,
          "failing-rank0": _failing_read}


def _attempt(rank: int, world: int, base: str, inject: str, load_step: int) -> dict[str, Any]:
    """One relaunch of the finished run: what its load raised on this rank."""
    job = T.Job(rank, world, f"{base}/fin", ckpt={**T.FINISHED, "load_step": load_step})
    fault = INJECT[inject]
    if fault is not None and rank == (0 if inject.endswith("rank0") else 1):
        fault(job.checkpointer.manager)
    try:
        job.checkpointer.load(step=load_step)
        return {"type": None, "msg": "", "step": job.train_state.step}
    except Exception as exc:  # any error: the test compares them across ranks
        return {"type": type(exc).__name__, "msg": str(exc), "step": job.train_state.step}
    finally:
        job.checkpointer.close()


def agree_runs(rank: int, world: int, base: str) -> dict[str, Any]:
    """The finished run, then its relaunch with an explicit load_step of its model-only last
    step (and without load_step: the automatic resume), each with each fault on rank 1."""
    T.Job(rank, world, f"{base}/fin", ckpt=T.FINISHED).train()
    out: dict[str, Any] = {}
    for inject in INJECT:
        out[f"explicit-{inject}"] = _attempt(rank, world, base, inject, T.TOTAL)
    for inject in ("lagging", "stale"):
        out[f"auto-{inject}"] = _attempt(rank, world, base, inject, -1)
    out["older"] = _older(rank, world, base)
    return out


def _older(rank: int, world: int, base: str) -> dict[str, Any]:
    """Resumed from step 6 (load_step) in the folder that holds steps up to 10, rank 1 listing
    only up to 6 (a lagging listing): the save of step 9 is refused on both ranks alike."""
    job = T.Job(rank, world, f"{base}/fin", ckpt={**T.FINISHED, "load_step": 6})
    if rank == 1:
        steps = job.checkpointer.manager.steps
        job.checkpointer.manager.steps = lambda tier=None: [s for s in steps(tier) if s <= 6]
    try:
        job.train()
        return {"type": None, "msg": "", "step": job.train_state.step}
    except Exception as exc:
        return {"type": type(exc).__name__, "msg": str(exc), "step": job.train_state.step}
    finally:
        job.checkpointer.close()


def local_runs(rank: int, world: int, base: str) -> dict[str, Any]:
    """The automatic resume of a job with a node-local tier whose local steps rank 1 cannot
    list (its local disk fails): the same error on both ranks, not one rank waiting."""
    ckpt = {"interval": 5, "keep_latest_k": 0, "local_path": f"{base}/local/{{node}}",
            "local_every": 2, "local_node": str(rank), "async_mode": "disabled"}
    job = T.Job(rank, world, f"{base}/loc", ckpt=ckpt)
    if rank == 1:
        steps = job.checkpointer.manager.steps

        def failing(tier: str | None = None) -> list[int]:
            if tier == "local":
                raise OSError(f"{base}/local/1: Input/output error")
            return steps(tier)

        job.checkpointer.manager.steps = failing
    try:
        job.checkpointer.load()
        return {"type": None, "msg": ""}
    except Exception as exc:
        return {"type": type(exc).__name__, "msg": str(exc)}
    finally:
        job.checkpointer.close()


def dcp_folder_runs(rank: int, world: int, base: str) -> dict[str, Any]:
    """checkpoint.folder holds a torchtitan DCP step as rank 1 sees it, not as rank 0 does (a
    node-local folder, or a DCP job writing there meanwhile): building the backend is refused
    on both ranks alike, and neither is left creating a group the other never joins."""
    from shardckpt.integrations import torchtitan_guard as guard

    if rank == 1:
        found = [(3, f"{base}/dump/checkpoint/step-3")]
        guard.dcp_steps = lambda folder: found if folder.endswith("checkpoint") else []
    try:
        T.Job(rank, world, f"{base}/dump").checkpointer.close()
        return {"type": None, "msg": ""}
    except Exception as exc:
        return {"type": type(exc).__name__, "msg": str(exc)}
