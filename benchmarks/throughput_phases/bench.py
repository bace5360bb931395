"""``Bench``: the state every phase saves and loads, the manager, and one repetition."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import shardckpt
from shardckpt import knobs

from common import rawio
from common.distributed import broadcast_from_rank0, gather_floats, sync_device
from common.fsdp_state import build, fingerprint, local_tensors, nbytes, same_fingerprint, zero_
from common.output import log
from common.pagecache import PageCache
from common.phase import measure_phase
from common.rounds import rotate
from common.rss import gc_collect, rss_bytes
from throughput_phases import ASYNC_PHASES, LOAD_PHASES, SAVE_PHASES, load, save

MiB = 1 << 20
PHASES = {**save.PHASES, **load.PHASES}


class Bench:
    """Builds the state on every rank, then runs repetitions of the phases on it.

    Construct and call on every rank alike (collective). ``errors`` keeps the first error of each
    phase; ``held`` the bytes per rank the manager keeps between saves (measured across its first
    save); ``rss_reference`` this rank's RSS with the state built, before the manager existed.
    """

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.fsync = not args.no_fsync
        t0 = time.perf_counter()
        self.model, self.optim, self.shape = build(args.size_gb, args.width, device)
        self.state = {"model": self.model, "optim": self.optim}
        tensors = local_tensors(self.model, self.optim)
        self.rank_bytes = sum(nbytes(t) for _, t in tensors)
        self.all_rank_bytes = [int(x[0]) for x in gather_floats([float(self.rank_bytes)])]
        self.total_bytes = sum(self.all_rank_bytes)
        self.buffers = rawio.HostBuffers(tensors, pin=torch.cuda.is_available())
        self.buffers.copy_from(tensors)  # the raw phases write these real bytes
        self.reference = fingerprint(tensors)
        log(f"built {self.shape['layers']} x Linear({self.shape['width']}) FSDP2 + AdamW: "
            f"{self.total_bytes / 1e9:.3f} GB of state ({self.all_rank_bytes} B per rank) "
            f"in {time.perf_counter() - t0:.1f} s")
        if args.budget_mb is not None:
            os.environ[knobs.MEMORY_BUDGET.env] = f"{args.budget_mb}M"
        if args.no_fsync:
            os.environ[knobs.FSYNC.env] = "0"
        self.budget_bytes = knobs.MEMORY_BUDGET.get()
        root = None
        if self.rank == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name = f"shardckpt-bench-{stamp}-{os.getpid()}"
            root = os.path.join(os.path.abspath(args.dir), name)
            os.makedirs(root, exist_ok=False)
        self.root: str = broadcast_from_rank0(root)  # type: ignore[assignment]
        self.cache = PageCache(enabled=not args.no_drop_caches
                               and any(p in LOAD_PHASES for p in args.phases))
        gc_collect()
        dist.barrier()
        # RSS with the live state and the memcpy buffers, before any checkpointing object exists:
        # the reference for "what async save holds beyond the training process".
        self.rss_reference = rss_bytes()
        self.mgr = shardckpt.CheckpointManager(os.path.join(self.root, "shardckpt"),
                                               async_save=True, compression=args.compression)
        self.step = 0
        self.held: list[int] | None = None  # per rank: bytes the manager keeps between saves
        self.errors: dict[str, str] = {}
        self.rep_dir = ""
        self.sources: dict[str, Any] = {}

    # -------------------------------------------------------------------- helpers for phases
    def next_step(self) -> int:
        self.step += 1
        return self.step

    def step_dir(self, step: int) -> str:
        return os.path.join(self.root, "shardckpt", f"step-{step:010d}")

    def raw_path(self, tag: str) -> str:
        d = os.path.join(self.rep_dir, tag)
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, f"rank{self.rank:05d}.bin")

    def write_raw(self, path: str) -> None:
        rawio.write_raw(path, self.buffers, self.args.io_chunk_mb * MiB, self.fsync)

    def read_raw(self, path: str) -> None:
        rawio.read_raw(path, self.buffers, self.args.io_chunk_mb * MiB)

    def zero_state(self) -> None:
        zero_(self.model, self.optim)
        sync_device()

    def verify(self) -> bool:
        """Whether the live state equals the state as built, on every rank (collective)."""
        ok = same_fingerprint(fingerprint(local_tensors(self.model, self.optim)), self.reference)
        return all(r[0] == 1.0 for r in gather_floats([1.0 if ok else 0.0]))

    def restore_if_needed(self, ok: bool) -> None:
        """After a failed load, put the true values back so later saves write real state."""
        if ok:
            return
        with torch.no_grad():
            for name, t in local_tensors(self.model, self.optim):
                if name in self.buffers.views:
                    t.copy_(self.buffers.views[name])

    def timed(self, name: str, fn: Callable[[], dict[str, float]], *,
              before: Callable[[], None] | None = None) -> dict[str, Any]:
        """Run one phase on every rank between barriers (``common.phase.measure_phase``)."""
        keys = ["time_s"] + (["stall_s"] if name in ASYNC_PHASES else []) + (
            ["get_state_dict_s"] if name.startswith("dcp_") and name != "dcp_load" else [])
        m = measure_phase(name, fn, keys=keys, total_bytes=self.total_bytes,
                          rss_reference=self.rss_reference, before=before)
        out = m.result
        if name.startswith("shardckpt_") and name != "shardckpt_load" and self.held is None:
            # the first save allocates what the manager keeps between saves (staging buffers):
            # RSS after it minus RSS before it, both after malloc_trim
            self.held = [int(r[0]) for r in gather_floats([float(m.rss_after - m.rss_before)])]
            out["rss"]["first_save"] = True
        if "error" in out:
            self.errors.setdefault(name, out["error"])
        return out

    # -------------------------------------------------------------------- repetitions
    def run_rep(self, label: str, rotation: int) -> dict[str, dict[str, Any]]:
        """One repetition: the save phases, then the load phases, each group rotated by
        ``rotation``; results by phase, each with its place in the order (``order``)."""
        self.rep_dir = os.path.join(self.root, label)
        if self.rank == 0:
            os.makedirs(self.rep_dir, exist_ok=True)
        dist.barrier()
        self.sources = {}
        saves = [p for p in SAVE_PHASES if p in self.args.phases]
        loads = [p for p in LOAD_PHASES if p in self.args.phases]
        order = rotate(saves, rotation) + rotate(loads, rotation)
        results: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(order):
            res = PHASES[name](self, name)
            res["order"] = i
            results[name] = res
            extra = f" stall {res['stall_s']:.3f} s" if res.get("stall_s") is not None else ""
            log(f"{label} {name}: {res['time_s']:.3f} s ({res['gbps'] or 0:.2f} GB/s){extra}"
                f" rss +{res['rss']['peak_increase_bytes'] / 1e6:.0f} MB"
                + (f" ERROR {res['error']}" if "error" in res else ""))
        self.cleanup_rep()
        return results

    def cleanup_rep(self) -> None:
        """Delete this repetition's files, and let the kernel finish deleting them (journal
        commit; on a ``discard`` mount, the discards of GBs of blocks) before the next phase:
        otherwise that work lands in whichever phase runs first in the next repetition."""
        dist.barrier()
        if self.rank == 0 and not self.args.keep:
            shutil.rmtree(self.rep_dir, ignore_errors=True)
            for step in self.sources.get("shardckpt", []):
                shutil.rmtree(self.step_dir(step), ignore_errors=True)
            os.sync()
        dist.barrier()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.mgr.close()
        dist.barrier()
        if self.rank == 0 and not self.args.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        dist.barrier()
