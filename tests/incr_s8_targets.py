"""Rank functions of tests/test_incr_s8_fallback.py (imported by spawned children)."""

from __future__ import annotations

import warnings
from typing import Any

from incremental_helpers import lora_state, mismatched_keys
from incremental_targets import _shard

import shardckpt


def save_with_replica(rank: int, world: int, root: str, rep: str, steps: list[int]) -> None:
    with shardckpt.CheckpointManager(root, replicas=[rep], async_save=False,
                                     incremental=True) as mgr:
        for s in steps:
            mgr.save(s, _shard(lora_state(s), world)).wait()


def load_newest(rank: int, world: int, root: str, rep: str) -> list[Any]:
    got = _shard(lora_state(0), world)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with shardckpt.CheckpointManager(root, replicas=[rep], async_save=False) as mgr:
            step = mgr.load(got)
    want = lora_state(step)
    return [step, mismatched_keys(got, want)]
