"""Issue 26 item 7: the metrics textfile tells the last attempt from the last commit, counts
degraded saves, and has every family from the manager's start (0 or NaN), so that staleness
alerts need no ``absent()``."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.observe import SaveEvent, SaveObserver

NEW = ("shardckpt_last_commit_timestamp_seconds", "shardckpt_last_commit_step",
       "shardckpt_degraded_saves_total")


def values(text: str) -> dict[str, float]:
    """name -> value of every sample (one per family here), and each family's TYPE line."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("{", 1)[0], line.rsplit(" ", 1)[1]
            out[name] = float(value)
    return out


def test_every_family_present_before_the_first_save(tmp_path: Path) -> None:
    prom = tmp_path / "train.prom"
    before = time.time()
    with shardckpt.CheckpointManager(str(tmp_path / "run"), metrics_path=prom) as mgr:
        first = prom.read_text()
        got = values(first)
        for name in NEW:
            assert f"# TYPE {name} " in first, name
        assert got["shardckpt_last_commit_timestamp_seconds"] == 0
        assert math.isnan(got["shardckpt_last_commit_step"])
        assert got["shardckpt_degraded_saves_total"] == 0
        assert math.isnan(got["shardckpt_last_save_success"])  # no attempt yet
        assert got["shardckpt_last_failure_timestamp_seconds"] == 0
        assert before <= got["shardckpt_start_timestamp_seconds"] <= time.time()
        mgr.save(5, {"w": torch.ones(8)}).wait()
        after = prom.read_text()
    assert set(values(after)) == set(got)  # the same families before and after a save
    done = values(after)
    assert done["shardckpt_last_commit_step"] == 5 and done["shardckpt_last_save_success"] == 1
    assert before <= done["shardckpt_last_commit_timestamp_seconds"] <= time.time()


def _event(step: int, ok: bool, degraded: bool = False) -> SaveEvent:
    return SaveEvent(step=step, ok=ok, nbytes=100 if ok else 0, stall_s=0.1, write_s=0.5,
                     total_s=0.6, world_size=2, locations=("a",) if ok else (),
                     degraded=degraded, unix_time=1000.0 + step)


def test_last_attempt_and_last_commit_are_apart(tmp_path: Path) -> None:
    obs = SaveObserver(enabled=True, root="r", world_size=2)
    obs.emit(_event(10, True))
    obs.emit(_event(20, True, degraded=True))
    obs.emit(_event(30, False))
    got = values(obs.metrics_text())
    assert got["shardckpt_last_save_success"] == 0  # the last attempt failed ...
    assert got["shardckpt_last_commit_step"] == 20  # ... the last commit is still step 20
    assert got["shardckpt_last_commit_timestamp_seconds"] == 1020.0
    assert got["shardckpt_last_failure_step"] == 30
    assert got["shardckpt_degraded_saves_total"] == 1
    assert got["shardckpt_checkpoints_committed_total"] == 2


def test_degraded_commit_is_counted(tmp_path: Path) -> None:
    prom = tmp_path / "m.prom"
    dead = tmp_path / "dead"
    dead.write_text("a file where a replica folder should be")  # the replica cannot be written
    with pytest.warns(UserWarning):
        with shardckpt.CheckpointManager(str(tmp_path / "run"), replicas=[str(dead / "r")],
                                         min_replicas=1, metrics_path=prom) as mgr:
            mgr.save(1, {"w": torch.ones(8)}).wait()
    got = values(prom.read_text())
    assert got["shardckpt_degraded_saves_total"] == 1
    assert got["shardckpt_last_save_degraded"] == 1 and got["shardckpt_last_commit_step"] == 1
