"""Rank functions of tests/test_incr_gaps_readonce.py (imported by the spawned ranks)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
from incremental_helpers import lora_state, zeros_like

import shardckpt
from shardckpt.engine.badfiles import is_bad
from shardckpt.format.refs import references
from shardckpt.storage import open_location, step_dirname


def corrupt_base_then_save(rank: int, world: int, root: str) -> dict[str, Any]:
    """DDP-like (every tensor replicated): save steps 1 and 2 incrementally, flip a byte of a
    chunk of step 1 that step 2 references, load step 2 with read-once on (one rank reads the
    chunk for both, and fails), then save step 3. Reports whether this rank noted the file as
    corrupt and what step 3 references."""
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True) as mgr:
        for s in (1, 2):
            mgr.save(s, lora_state(s))
        full = mgr.manifest(2, pieces=True)
        chunk = next(c for _, e in sorted(full.tensors.items()) if e.meta is not None
                     for p in e.meta.pieces for c in p.chunks if c.ref is not None)
        assert chunk.ref is not None
        rel = f"{step_dirname(chunk.ref[0])}/{chunk.ref[1]}"
        dist.barrier()
        if rank == 0:
            path = Path(root) / rel
            data = bytearray(path.read_bytes())
            data[chunk.offset + 5] ^= 0x40
            path.write_bytes(bytes(data))
        dist.barrier()
        try:
            mgr.load(zeros_like(lora_state(0)), step=2)
            outcome = "loaded"
        except shardckpt.ShardckptError as exc:
            outcome = type(exc).__name__
        noted = is_bad(open_location(root).display, rel)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mgr.save(3, lora_state(3))
        m3 = mgr.manifest(3)
    refs = sorted(f"{step_dirname(r.step)}/{r.file}" for r in references(m3.extra, 3))
    return {"file": rel, "load": outcome, "noted": noted, "step3_references": refs}
