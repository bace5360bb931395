"""torchrun and torch.distributed helpers for the benchmarks.

Collectives here must be called by every rank of the default process group, in the same order.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def under_torchrun(script: str) -> bool:
    """Whether this process was started by torchrun; if not, says how to run ``script`` on
    stderr."""
    if "RANK" in os.environ:
        return True
    print(f"run under torchrun, e.g. torchrun --standalone --nproc-per-node 2 {script} ...",
          file=sys.stderr)
    return False


def init_process_group() -> tuple[torch.device, str]:
    """Join the default process group torchrun set up; returns this rank's device and the backend.

    With CUDA: ``cpu:gloo,cuda:nccl`` and the GPU ``LOCAL_RANK`` (made current); without:
    ``gloo`` on the CPU.
    """
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend, device_id=device)
    else:
        device = torch.device("cpu")
        backend = "gloo"
        dist.init_process_group(backend)
    return device, backend


def gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's ``values`` (same length everywhere), as rows per rank. Collective."""
    t = torch.tensor(values, dtype=torch.float64)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [row.tolist() for row in out]


def broadcast_from_rank0(value: T) -> T:
    """Rank 0's ``value`` on every rank (any picklable value of the benchmark's own). Collective."""
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_device() -> None:
    """Wait for queued GPU work, so a timer read after it includes that work (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torchrun_command(script: str, nproc: int, args: Sequence[str]) -> list[str]:
    """The command that runs ``script args...`` as ``nproc`` local ranks under
    ``torchrun --standalone``, with this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", script, *args]


def run_torchrun(script: str, nproc: int, args: Sequence[str], *, timeout: float | None = None,
                 threads: int = 1) -> None:
    """Run ``torchrun_command(script, nproc, args)`` to the end, each rank with ``threads``
    intra-op threads (``OMP_NUM_THREADS``); raises ``CalledProcessError`` if the job fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(torchrun_command(script, nproc, args), check=True, env=env, timeout=timeout)
