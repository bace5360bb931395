"""Where an eager async save's stall goes: ``mgr.save()`` against one memcpy and ``dcp.async_save``.

Run under torchrun (see docs/benchmarks.md, "Eager stall, session 8"):

    torchrun --standalone --nproc-per-node 2 benchmarks/throughput_stall.py --size-gb 0.4 --reps 5

The state is the throughput benchmark's (an FSDP2 stack of Linear layers plus AdamW). Each
repetition runs, in an order rotated by one per repetition and between barriers: ``memcpy`` (the
throughput benchmark's: ``copy_`` into one pre-faulted buffer), the default eager async save with
its large copies streamed (``stream``) and with them by ``memmove`` (``memmove``,
``SHARDCKPT_STREAM_COPY=0``), and ``dcp.async_save`` (with ``get_state_dict``). Every save is
waited for before the next phase. Inside ``save()`` the time of each part is taken (wall and this
thread's CPU): collecting the state (``collect``), the reserved extras (``extras``), the copy
(``stage``), the hand-off to the save thread (``submit``), and the rest. Times are the maximum
over the ranks; one JSON document goes to stdout (rank 0) and to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch.distributed as dist

import shardckpt
import shardckpt.manager as manager_module
from shardckpt.engine import snapshot as snapshot_module
from shardckpt.engine import streamcopy

from common import dcp_modes, rawio
from common.distributed import gather_floats, init_process_group, under_torchrun
from common.fsdp_state import build, local_tensors
from common.output import capture_stdout, log, write_outputs

PARTS = ("collect", "extras", "stage", "submit")


class PartClock:
    """Wall and CPU seconds spent in a few functions ``save()`` calls (patched in place)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def wrap(self, owner: Any, attr: str, part: str) -> None:
        inner = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t, c = time.perf_counter(), time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.wall[part] = self.wall.get(part, 0.0) + time.perf_counter() - t
                self.cpu[part] = self.cpu.get(part, 0.0) + time.thread_time() - c
        setattr(owner, attr, timed)

    def reset(self) -> None:
        self.wall, self.cpu = {}, {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=0.4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "shardckpt-stall"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    capture_stdout()
    if not under_torchrun("benchmarks/throughput_stall.py"):
        return 64
    device, _ = init_process_group()
    rank = dist.get_rank()
    model, optim, shape = build(args.size_gb, None, device)
    state = {"model": model, "optim": optim}
    buffers = rawio.HostBuffers(local_tensors(model, optim), pin=False)
    root = gathered_path(os.path.join(args.dir, f"run-{time.time_ns()}"))
    # keep_last=1: every repetition writes the whole state, and the disk must not fill up
    mgr = shardckpt.CheckpointManager(os.path.join(root, "shardckpt"), async_save=True,
                                      retention=shardckpt.RetentionPolicy(keep_last=1))
    clock = PartClock()
    clock.wrap(manager_module, "collect", "collect")
    clock.wrap(manager_module, "with_extras", "extras")
    clock.wrap(snapshot_module.StagingPool, "stage", "stage")
    clock.wrap(mgr._pool, "submit", "submit")
    step = 0

    def eager(stream: bool) -> dict[str, float]:
        nonlocal step
        step += 1
        os.environ["SHARDCKPT_STREAM_COPY"] = "1" if stream else "0"
        clock.reset()
        t, c = time.perf_counter(), time.thread_time()
        handle = mgr.save(step, state)
        out = {"stall_s": time.perf_counter() - t, "stall_cpu_s": time.thread_time() - c}
        handle.wait()
        os.environ.pop("SHARDCKPT_STREAM_COPY")
        for part in PARTS:
            out[f"{part}_s"] = clock.wall.get(part, 0.0)
            out[f"{part}_cpu_s"] = clock.cpu.get(part, 0.0)
        out["rest_s"] = out["stall_s"] - sum(out[f"{part}_s"] for part in PARTS)
        return out

    def memcpy() -> dict[str, float]:
        t, c = time.perf_counter(), time.thread_time()
        buffers.copy_from(local_tensors(model, optim))
        return {"stall_s": time.perf_counter() - t, "stall_cpu_s": time.thread_time() - c}

    def dcp() -> dict[str, float]:
        path = gathered_path(os.path.join(root, f"dcp-{time.monotonic_ns()}"))
        t = time.perf_counter()
        pending = dcp_modes.start_async_save(dcp_modes.state_dict(model, optim), path,
                                             process=False, fsync=True)
        out = {"stall_s": time.perf_counter() - t}
        pending.wait()
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        return out

    phases = {"memcpy": memcpy, "stream": lambda: eager(True), "memmove": lambda: eager(False),
              "dcp_async_save": dcp}
    names = list(phases)
    for name in names:  # warm-up: first-save allocations, DCP's first plan
        dist.barrier()
        phases[name]()
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(args.reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            dist.barrier()
            row = phases[name]()
            keys = sorted(row)
            worst = [max(v) for v in zip(*gather_floats([row[k] for k in keys]))]
            results[name].append(dict(zip(keys, worst)))
        if rank == 0:
            log(f"rep {r + 1}: " + ", ".join(
                f"{n} {results[n][-1]['stall_s'] * 1e3:.1f} ms" for n in names))
    mgr.close()
    if rank == 0:
        write_outputs(summary(args, shape, results), out=args.out)
        shutil.rmtree(root, ignore_errors=True)
    dist.destroy_process_group()
    return 0


def gathered_path(path: str) -> str:
    """Rank 0's ``path`` on every rank (DCP writes one directory)."""
    box = [path]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def summary(args: argparse.Namespace, shape: dict[str, Any],
            results: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Medians per phase and part (ms), and per-repetition ratios of the stalls."""
    def med(name: str, key: str) -> float | None:
        vals = [r[key] for r in results[name] if key in r]
        return round(statistics.median(vals) * 1e3, 2) if vals else None

    def ratios(a: str, b: str) -> list[float]:
        return [round(x["stall_s"] / y["stall_s"], 3) for x, y in zip(results[a], results[b])]

    keys = sorted({k for rows in results.values() for row in rows for k in row})
    return {
        "benchmark": "eager stall breakdown (benchmarks/throughput_stall.py)",
        "command": " ".join(["torchrun", "--nproc-per-node",
                             os.environ.get("LOCAL_WORLD_SIZE", "?"), *sys.argv]),
        "world_size": dist.get_world_size(), "size_gb": args.size_gb, "shape": shape,
        "stream_copy": streamcopy.why_not or "available",
        "median_ms": {n: {k: med(n, k) for k in keys if med(n, k) is not None}
                      for n in results},
        "ratios_per_rep": {
            "stream/memcpy": ratios("stream", "memcpy"),
            "memmove/memcpy": ratios("memmove", "memcpy"),
            "stream/dcp_async_save": ratios("stream", "dcp_async_save"),
            "memmove/dcp_async_save": ratios("memmove", "dcp_async_save"),
        },
        "results": results,
    }


if __name__ == "__main__":
    sys.exit(main())
