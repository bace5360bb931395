"""Functions run on every rank by tests/test_harness.py (children import this module by name)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def all_reduce_sum(rank: int, world_size: int, base: int) -> dict[str, Any]:
    """All-reduce ``base + rank`` across the group; report what this rank saw."""
    t = torch.tensor([float(base + rank)])
    dist.all_reduce(t)
    return {
        "rank": rank,
        "dist_rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "env_rank": os.environ["RANK"],
        "extra": os.environ.get("HARNESS_EXTRA"),
        "sum": t.item(),
    }


def raise_on_rank_1(rank: int, world_size: int) -> str:
    if rank == 1:
        raise ValueError("boom from rank 1")
    return "ok"


def hang_on_rank_1(rank: int, world_size: int, pid_dir: str) -> None:
    """Rank 0 waits in a barrier rank 1 never joins; rank 1 starts two sleepers and blocks."""
    if rank == 1:
        sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
        same_group = subprocess.Popen(sleep)
        own_session = subprocess.Popen(sleep, start_new_session=True)
        Path(pid_dir, "pids").write_text(f"{same_group.pid} {own_session.pid}")
        threading.Event().wait()
    dist.barrier()


def exit_3_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        os._exit(3)
    return rank


def not_json(rank: int, world_size: int) -> object:
    return object()
