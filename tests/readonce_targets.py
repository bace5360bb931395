"""Rank functions for tests/test_read_once.py (imported by the spawned ranks)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import shardckpt
from shardckpt.format.shard import read_header

TENSORS, COLS = 16, 8


def replicated(seed: int = 0, zero: bool = False) -> dict[str, Any]:
    """A DDP-like replicated state of about 2.9 MB in 16 tensors of different sizes."""
    g = torch.Generator().manual_seed(seed)
    model = {f"w{i:02d}": torch.randn(2000 + 500 * i, COLS, generator=g) for i in range(TENSORS)}
    if zero:
        for t in model.values():
            t.zero_()
    return {"model": model}


def read_chars() -> int:
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


def _equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def _load(mgr: Any, dest: dict[str, Any], step: int | None = 1) -> dict[str, Any]:
    dist.barrier()
    before, t0 = read_chars(), time.perf_counter()
    loaded = mgr.load(dest, step=step)
    seconds, after = time.perf_counter() - t0, read_chars()
    prof = mgr.last_load_profile
    return {"step": loaded, "seconds": seconds, "read_chars": after - before,
            "bytes_read": prof["bytes_read"], "bytes_received": prof["bytes_received"]}


def ddp_load(rank: int, world: int, root: str, storage_options: dict | None = None,
             modes: tuple[str, ...] = ("",)) -> dict[str, Any]:
    """Save a replicated state, then load it once per ``SHARDCKPT_READ_ONCE`` mode ("": the
    default); report each load's byte counts and whether every value came back."""
    import os

    state = replicated()
    with shardckpt.CheckpointManager(root, async_save=False, capture_rng=False,
                                     storage_options=storage_options) as mgr:
        mgr.save(1, state)
        size = mgr.manifest(1).nbytes
        loads = {}
        for mode in modes:
            os.environ["SHARDCKPT_READ_ONCE"] = mode  # "": the default (auto)
            dest = replicated(zero=True)
            loads[mode] = {**_load(mgr, dest), "exact": _equal(state, dest)}
    return {"size": size, "loads": loads}


def hsdp_load(rank: int, world: int, root: str) -> dict[str, Any]:
    """A 2 x 2 mesh (2 replica groups x 2 shards): save, then load into zeroed DTensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    shard = mesh.get_local_rank("shard")

    def build(zero: bool) -> dict[str, Any]:
        out = {}
        for i in range(8):
            full = torch.arange(4096 * COLS, dtype=torch.float32).reshape(4096, COLS) + i
            local = full[shard * 2048:(shard + 1) * 2048].clone()
            if zero:
                local.zero_()
            out[f"w{i}"] = DTensor.from_local(local, mesh, [Replicate(), Shard(0)],
                                              run_check=False, shape=full.shape,
                                              stride=full.stride())
        return {"model": out}

    state = build(False)
    with shardckpt.CheckpointManager(root, async_save=False, capture_rng=False) as mgr:
        mgr.save(1, state)
        size = mgr.manifest(1).nbytes
        dest = build(True)
        got = _load(mgr, dest)
    exact = all(torch.equal(state["model"][k].to_local(), dest["model"][k].to_local())
                for k in state["model"])
    return {"size": size, **got, "exact": exact}


def corrupt_shared(rank: int, world: int, root: str) -> dict[str, Any]:
    """Save steps 1 and 2, corrupt a chunk of step 2 (read by one rank for all), then load
    step 2 explicitly (must fail on every rank) and the newest good step (step 1 everywhere)."""
    with shardckpt.CheckpointManager(root, async_save=False, capture_rng=False) as mgr:
        mgr.save(1, replicated(1))
        mgr.save(2, replicated(2))
        if rank == 0:
            step_dir = Path(root, "step-0000000002")
            name = sorted(p.name for p in step_dir.glob("*.shard"))[0]
            path = step_dir / name
            data = bytearray(path.read_bytes())
            header = read_header(lambda o, n: bytes(data[o:o + n]), len(data), name)
            offset = header.pieces[0].chunks[0].offset
            data[offset] ^= 0xFF
            path.write_bytes(bytes(data))
        dist.barrier()
        try:
            mgr.load(replicated(zero=True), step=2)
            explicit = "loaded"
        except Exception as exc:
            explicit = f"{type(exc).__name__}: {exc}"
        dest = replicated(zero=True)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step = mgr.load(dest)
    return {"explicit": explicit, "fallback_step": step,
            "fallback_exact": _equal(replicated(1), dest),
            "file": name if rank == 0 else None}
