"""Rank functions of tests/test_tier_s8_recover.py (run by ``harness.run_ranks`` on real gloo
groups): a resume through ``CheckpointManager.load`` that records every persistent manifest a
rank opens while it loads."""

from __future__ import annotations

import os
import sys
from typing import Any

import tier_targets as T


def persistent_save(rank: int, world: int, root: str, step: int) -> None:
    """One more persistent step (no local tier): newer than every local step."""
    import shardckpt

    with shardckpt.CheckpointManager(os.path.join(root, "persistent"),
                                     async_save=False) as mgr:
        mgr.save(step, T.tier_state(step, rank))


def resume_watching(rank: int, world: int, root: str, nodes: list[str]) -> dict[str, Any]:
    """``mgr.load(state)`` with a local tier; which persistent manifests this rank opened
    during the load (an audit hook), and what it restored."""
    persistent = os.path.join(root, "persistent") + os.sep
    opened: list[str] = []
    watching = [False]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if watching[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(os.fspath(args[0]))
            if path.startswith(persistent) and path.endswith("manifest.json"):
                opened.append(os.path.relpath(path, persistent))

    sys.addaudithook(hook)

    def load(mgr: Any, state: dict[str, Any]) -> int:
        watching[0] = True
        try:
            return mgr.load(state)
        finally:
            watching[0] = False

    got = T.resume_with_tier(rank, root, nodes, load)
    return {"step": got["step"], "tier": got["profile"]["tier"], "opened": sorted(set(opened)),
            "exact": got["exact"], "warnings": got["warnings"]}
