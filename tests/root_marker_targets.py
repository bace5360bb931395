"""Rank functions for tests/test_root_marker.py: a 2-rank job whose replica turns read-only."""

from __future__ import annotations

import errno
from typing import Any

import torch

import shardckpt
from shardckpt.storage import local as local_mod


def make_read_only(root: str) -> None:
    """From now on, every write under the location ``root`` fails with EROFS, as on a
    filesystem remounted read-only (reads still work)."""
    cls = local_mod.LocalLocation

    def wrap(name: str) -> None:
        real = getattr(cls, name)

        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            if self.root == root:
                exc = OSError(errno.EROFS, "Read-only file system")
                raise self._wrap(name, str(args[0]) if args else ".", exc)
            return real(self, *args, **kwargs)

        setattr(cls, name, method)

    for name in ("makedirs", "open_sink", "write_atomic", "write_exclusive", "put_record",
                 "remove", "remove_tree", "move_tree"):
        wrap(name)


def state(rank: int, step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step * 10 + rank)
    return {f"w{rank}": torch.randn(32, 8, generator=g), "step": step}


def replica_turns_read_only(rank: int, world: int, root: str, replica: str,
                            min_replicas: int) -> dict[str, Any]:
    """Save step 1 to root + replica, make the replica read-only, save step 2; report."""
    import os

    mgr = shardckpt.CheckpointManager(root, replicas=[replica], min_replicas=min_replicas,
                                      async_save=False)
    mgr.save(1, state(rank, 1))
    make_read_only(os.path.abspath(replica))
    out: dict[str, Any] = {"error": None, "type": None}
    try:
        mgr.save(2, state(rank, 2))
    except shardckpt.ShardckptError as exc:
        out = {"error": str(exc), "type": type(exc).__name__}
    out["steps"] = mgr.steps()
    mgr.close()
    return out
