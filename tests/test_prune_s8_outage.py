"""Background retention survives a replica outage (issue 30 trial, item 1): a prune of the
replica that fails while the replica folder is gone releases what it can, a prune lock of ours
left behind does not block our later prunes, every later prune runs, and each distinct failure
is warned about once and counted."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

import shardckpt
import shardckpt.prune as P
from shardckpt.prune_background import retention_failures
from shardckpt.storage.lease import LOCK_PATH


def _steps(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-") and p.is_dir())


def _outage_once(rep: Path):
    """Wrap ``P._prune`` so that right after the first prune of ``rep`` does its work, the
    replica folder is moved away and a file stands in its place (the lock cannot be
    released); ``restore()`` puts the real folder back."""
    real = P._prune
    away = rep.with_name(rep.name + ".away")
    state = {"done": False}

    def wrapped(location, *a, **k):
        report = real(location, *a, **k)
        if not state["done"] and location.display.rstrip("/") == str(rep):
            state["done"] = True
            os.rename(rep, away)
            rep.write_text("\n")
        return report

    def restore() -> None:
        rep.unlink()
        os.rename(away, rep)

    return wrapped, restore, state


def test_replica_outage_during_background_retention(tmp_path, monkeypatch):
    root, rep = tmp_path / "root", tmp_path / "rep"
    wrapped, restore, state = _outage_once(rep)
    monkeypatch.setattr(P, "_prune", wrapped)
    mgr = shardckpt.CheckpointManager(root, replicas=[rep], min_replicas=1, async_save=False,
                                      retention=shardckpt.RetentionPolicy(keep_last=1))
    runner = mgr._retention_runner
    before = retention_failures()
    state_dict = {"w": torch.zeros(8)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr.save(1, state_dict)
        runner.close()  # waits for the requested prune: the replica is now gone
        assert state["done"]
        restore()
        # the lock we could not remove is still there, live, and ours
        assert (rep / LOCK_PATH).exists()
        for step in range(2, 7):
            state_dict["w"] += 1
            mgr.save(step, state_dict)
            runner.close()
        mgr.close()
    assert _steps(root) == ["step-0000000006"]
    assert _steps(rep) == ["step-0000000006"]  # pruned again after the outage
    assert not (rep / LOCK_PATH).exists()  # our stale lock was removed, not waited out
    failed = [w for w in caught if "background retention failed" in str(w.message)]
    assert len(failed) == 1, [str(w.message) for w in caught]
    assert "prune.lock" in str(failed[0].message)
    assert runner.failures == 1 and runner.failures_by_location == {str(rep): 1}
    assert retention_failures() == before + 1
    # the warning names the test's save() call, not the library
    assert failed[0].filename == __file__


def test_each_distinct_failure_warned_once(tmp_path):
    from shardckpt.errors import StorageError
    from shardckpt.prune_background import BackgroundPrune

    errors: list[Exception | None] = []

    def run() -> None:
        exc = errors.pop(0)
        if exc is not None:
            raise exc

    runner = BackgroundPrune(run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for exc in [StorageError("a: stat failed at 1"), StorageError("a: stat failed at 2"),
                    StorageError("a: disk full"), None, StorageError("a: disk full")]:
            errors.append(exc)
            runner.request()
            runner.close()
    texts = [str(w.message) for w in caught]
    assert len(texts) == 3, texts  # stat failed (once), disk full, disk full after a success
    assert runner.failures == 4
