"""Replicas that vanish are noticed (issue 25, item 5): the root marker ``ROOT/.shardckpt-root``,
and a location that turns read-only."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import crash_targets
import pytest
import root_marker_targets as T
import torch
from harness import run_ranks

import shardckpt
from shardckpt.storage.marker import MARKER

ENV = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "30", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def _fast_ranks() -> Any:
    with crash_targets.forked_ranks():
        yield


def state(step: int) -> dict[str, Any]:
    return {"w": torch.full((8,), float(step)), "step": step}


def marker_id(root: Path) -> str:
    doc = json.loads((root / MARKER).read_text())
    assert doc["format"] == "shardckpt-root"
    return doc["id"]


def test_the_first_save_creates_the_marker_and_later_saves_keep_it(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        mgr.save(1, state(1))
        first = marker_id(root)
        mgr.save(2, state(2))
    assert marker_id(root) == first and len(first) == 32
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:  # a restarted job
        mgr.save(3, state(3))
    assert marker_id(root) == first


def test_a_root_made_by_an_older_version_is_adopted(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        mgr.save(1, state(1))
    (root / MARKER).unlink()  # as an older version left it: checkpoints, no marker
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
            mgr.save(2, state(2))
            assert mgr.steps() == [1, 2]
    assert marker_id(root)


@pytest.mark.parametrize("how", ["deleted", "unmounted", "replaced"])
def test_a_vanished_replica_is_a_failed_location_never_recreated(tmp_path: Path,
                                                                 how: str) -> None:
    root, replica = tmp_path / "run", tmp_path / "mnt" / "run"
    with shardckpt.CheckpointManager(str(root), replicas=[str(replica)], min_replicas=1,
                                     async_save=False) as mgr:
        mgr.save(1, state(1))
        if how == "deleted":
            shutil.rmtree(replica)
        elif how == "unmounted":  # the mount point is there, empty
            shutil.rmtree(replica)
            replica.mkdir()
        else:  # another root now lives there
            (replica / MARKER).write_text(json.dumps({"format": "shardckpt-root",
                                                      "id": "0" * 32}))
        before = sorted(p.name for p in replica.iterdir()) if replica.exists() else None
        with pytest.warns(UserWarning, match=rf"{replica}.*root marker"):
            mgr.save(2, state(2))
        assert mgr.steps() == [1, 2]
        assert mgr.info(2).replicas == [str(root)] or str(replica) not in mgr.info(2).replicas
    after = sorted(p.name for p in replica.iterdir()) if replica.exists() else None
    assert after == before  # nothing written there, not even the root recreated


def test_a_vanished_root_fails_the_save_when_min_replicas_needs_it(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        mgr.save(1, state(1))
        shutil.rmtree(root)
        with pytest.warns(UserWarning, match="root marker"), \
                pytest.raises(shardckpt.StorageError, match=rf"{root}.*root marker .*missing"):
            mgr.save(2, state(2))
    assert not root.exists()


def test_a_replica_that_turns_read_only_is_that_locations_failure(tmp_path: Path) -> None:
    root, replica = tmp_path / "run", tmp_path / "replica"
    out = run_ranks(T.replica_turns_read_only, 2, str(root), str(replica), 2, timeout=120,
                    env=ENV)
    for r in out:
        assert r["type"] == "StorageError", r
        assert str(replica) in r["error"] and "Read-only" in r["error"], r
        assert "state collection failed" not in r["error"]
        assert r["steps"] == [1]
    assert not (root / "step-0000000002").exists()  # no empty step directory left behind
    # with min_replicas=1 the same save commits, degraded
    out = run_ranks(T.replica_turns_read_only, 2, str(tmp_path / "r2"), str(tmp_path / "p2"),
                    1, timeout=120, env=ENV)
    assert all(r["type"] is None and r["steps"] == [1, 2] for r in out), out


def test_a_marker_being_created_by_another_process_is_waited_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two jobs starting on a new root at once: the one whose exclusive create of the marker
    loses waits for the other's to land and adopts its id (it failed the save before)."""
    from shardckpt.storage import marker, open_location

    loc = open_location(str(tmp_path / "run"))
    loc.makedirs("")
    real_read = marker.read_marker
    reads: list[int] = []

    def other_lands_late(location: Any) -> str | None:
        reads.append(1)
        if len(reads) == 3:  # the other process's rename lands while we wait
            location.write_atomic(marker.MARKER, json.dumps(
                {"format": marker.MARKER_FORMAT, "id": "theirs"}).encode())
        return real_read(location)

    def claimed(relpath: str, data: bytes) -> None:
        raise FileExistsError(17, "claimed by another writer", relpath)

    monkeypatch.setattr(marker, "read_marker", other_lands_late)
    monkeypatch.setattr(loc, "write_exclusive", claimed)
    marker.check_marker(loc)
    assert loc.marker_id == "theirs"
