"""A restarted job never adopts an emptied replica: the root marker ids recorded in each
manifest's ``extra["markers"]`` (shardckpt/engine/rootmarks.py) are checked at the first save of
a new manager. An unmounted mount point, a folder replaced by an empty one or by another root is
a failed location until ``shardckpt repair`` refills it; a new replica, a fresh root and a root
made by an older version are adopted as before."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import shardckpt
from shardckpt.format import manifest as M
from shardckpt.repair import repair
from shardckpt.storage import open_location
from shardckpt.storage.marker import MARKER


def state(step: int) -> dict[str, Any]:
    return {"w": torch.full((8,), float(step)), "step": step}


def marker_id(root: Path) -> str:
    return str(json.loads((root / MARKER).read_text())["id"])


def extra_of(root: Path, step_dir: str) -> dict[str, Any]:
    path = root / step_dir / "manifest.json"
    return dict(M.parse(path.read_bytes(), str(path)).extra)


def manager(root: Path, replica: Path, **kw: Any) -> shardckpt.CheckpointManager:
    return shardckpt.CheckpointManager(str(root), replicas=[str(replica)], async_save=False,
                                       **kw)


def first_job(tmp_path: Path) -> tuple[Path, Path, str]:
    root, replica = tmp_path / "run", tmp_path / "mnt" / "run"
    with manager(root, replica) as mgr:
        mgr.save(1, state(1))
        mgr.save(2, state(2))
    return root, replica, marker_id(replica)


def empty(replica: Path) -> None:  # the volume unmounted: the mount point is there, empty
    shutil.rmtree(replica)
    replica.mkdir()


def test_the_manifest_records_each_locations_marker(tmp_path: Path) -> None:
    root, replica, rid = first_job(tmp_path)
    extra = extra_of(root, "step-0000000002")
    assert extra["markers"] == {str(root): {"id": marker_id(root), "step": 2},
                                str(replica): {"id": rid, "step": 2}}


def test_a_restart_with_an_emptied_replica_fails_it_and_commits_degraded(tmp_path: Path) -> None:
    root, replica, rid = first_job(tmp_path)
    empty(replica)
    with manager(root, replica, min_replicas=1) as mgr:
        with pytest.warns(UserWarning, match=rf"{replica}: the root marker .* is missing.*"
                          r"checkpoints up to step 2.*shardckpt repair ROOT --replica"):
            mgr.save(3, state(3))
        assert mgr.info(3).replicas == (str(root),)
        with pytest.warns(UserWarning, match=rf"{replica}: the root marker"):  # stays failed
            mgr.save(4, state(4))
    assert list(replica.iterdir()) == []  # no marker, no step: nothing written there
    extra = extra_of(root, "step-0000000004")
    assert extra["degraded"] is True
    assert extra["markers"][str(replica)] == {"id": rid, "step": 2}  # still expected there
    with manager(root, replica, min_replicas=1) as mgr:  # and again after another restart
        with pytest.warns(UserWarning, match=r"checkpoints up to step 2"):
            mgr.save(5, state(5))
    assert list(replica.iterdir()) == []


def test_a_restart_with_an_emptied_replica_fails_the_save_by_default(tmp_path: Path) -> None:
    root, replica, _ = first_job(tmp_path)
    empty(replica)
    with manager(root, replica) as mgr:  # min_replicas defaults to every location
        with pytest.warns(UserWarning, match="root marker"), \
                pytest.raises(shardckpt.StorageError, match=rf"{replica}.*root marker"):
            mgr.save(3, state(3))
        assert mgr.steps() == [1, 2]
    assert list(replica.iterdir()) == []


def test_a_restart_with_a_replaced_folder_holding_another_marker(tmp_path: Path) -> None:
    root, replica, _ = first_job(tmp_path)
    shutil.rmtree(replica)
    with shardckpt.CheckpointManager(str(replica), async_save=False) as other:  # another root
        other.save(7, state(7))
    other_id = marker_id(replica)
    before = sorted(str(p) for p in replica.rglob("*"))
    with manager(root, replica, min_replicas=1) as mgr:
        with pytest.warns(UserWarning, match=rf"{replica}: the root marker .* holds another "
                          rf"id \({other_id}\)"):
            mgr.save(3, state(3))
        assert mgr.info(3).replicas == (str(root),)
    assert marker_id(replica) == other_id
    assert sorted(str(p) for p in replica.rglob("*")) == before  # nothing written there


def test_a_replica_added_on_restart_is_adopted(tmp_path: Path) -> None:
    root, replica, _ = first_job(tmp_path)
    new = tmp_path / "new"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with shardckpt.CheckpointManager(str(root), replicas=[str(replica), str(new)],
                                         async_save=False) as mgr:
            mgr.save(3, state(3))
            assert mgr.info(3).replicas == (str(root), str(replica), str(new))
    extra = extra_of(new, "step-0000000003")
    assert extra["markers"][str(new)] == {"id": marker_id(new), "step": 3}


def test_a_relative_url_matches_the_recorded_absolute_one(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root, replica, _ = first_job(tmp_path)
    empty(replica)
    monkeypatch.chdir(tmp_path)
    with manager(root, Path("mnt/run"), min_replicas=1) as mgr:
        with pytest.warns(UserWarning, match=r"mnt/run: the root marker .* is missing"):
            mgr.save(3, state(3))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardckpt", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("how", ["emptied", "replaced"])
def test_after_repair_the_restarted_job_writes_there_again(tmp_path: Path, how: str) -> None:
    root, replica, rid = first_job(tmp_path)
    if how == "emptied":
        empty(replica)
    else:  # replaced on purpose by a folder holding another root's marker
        shutil.rmtree(replica)
        replica.mkdir()
        (replica / MARKER).write_text(json.dumps({"format": "shardckpt-root", "id": "0" * 32}))
    with manager(root, replica, min_replicas=1) as mgr:
        with pytest.warns(UserWarning, match="root marker"):
            mgr.save(3, state(3))
    proc = run_cli("repair", str(root), "--replica", str(replica))
    assert proc.returncode == 0, proc.stderr
    assert marker_id(replica) == rid  # the id the newest manifest recorded for it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with manager(root, replica) as mgr:  # default min_replicas: both must take it
            mgr.save(4, state(4))
            assert mgr.info(4).replicas == (str(root), str(replica))
    extra = extra_of(replica, "step-0000000004")
    assert extra["degraded"] is False
    assert extra["markers"][str(replica)] == {"id": rid, "step": 4}


def test_python_repair_restores_the_marker_and_fills_a_fresh_location(tmp_path: Path) -> None:
    root, replica, rid = first_job(tmp_path)
    empty(replica)
    fresh = tmp_path / "fresh"
    reports = repair([open_location(str(p)) for p in (root, replica, fresh)])
    assert all(r.ok for r in reports)
    assert marker_id(replica) == rid
    assert len(marker_id(fresh)) == 32  # a repair to a new location writes a marker too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with shardckpt.CheckpointManager(str(root), replicas=[str(replica), str(fresh)],
                                         async_save=False) as mgr:
            mgr.save(3, state(3))
            assert len(mgr.info(3).replicas) == 3


def test_a_dry_run_repair_writes_no_marker(tmp_path: Path) -> None:
    root, replica, _ = first_job(tmp_path)
    empty(replica)
    proc = run_cli("repair", str(root), "--replica", str(replica), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert list(replica.iterdir()) == []


def test_an_older_version_root_is_still_adopted_silently(tmp_path: Path) -> None:
    root, replica, _ = first_job(tmp_path)
    for folder in (root, replica):  # as an older version left them: no marker, none recorded
        (folder / MARKER).unlink()
        for path in folder.glob("step-*/manifest.json"):
            found = M.parse(path.read_bytes(), str(path))
            extra = {k: v for k, v in found.extra.items() if k != "markers"}
            path.write_bytes(M.serialize(dataclasses.replace(found, extra=extra)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with manager(root, replica) as mgr:
            mgr.save(3, state(3))
            assert mgr.steps() == [1, 2, 3]
    assert marker_id(root) and marker_id(replica)


def test_a_fresh_root_with_no_checkpoints_anywhere_is_created(tmp_path: Path) -> None:
    root, replica = tmp_path / "run", tmp_path / "mnt" / "run"
    replica.mkdir(parents=True)  # an empty folder, nothing recorded anywhere
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with manager(root, replica) as mgr:
            mgr.save(1, state(1))
    assert marker_id(root) and marker_id(replica)


def test_an_s3_bucket_recreated_empty_is_failed_on_restart_until_repaired(tmp_path: Path,
                                                                          s3: Any) -> None:
    import os

    root, replica = tmp_path / "run", s3.new_root("run")
    opts = {"storage_options": s3.storage_options, "async_save": False}
    with shardckpt.CheckpointManager(str(root), replicas=[replica], **opts) as mgr:
        mgr.save(1, state(1))
    bucket, client = replica[len("s3://"):].split("/", 1)[0], s3.client()
    for obj in client.list_objects_v2(Bucket=bucket)["Contents"]:  # the endpoint restarted
        client.delete_object(Bucket=bucket, Key=obj["Key"])
    client.delete_bucket(Bucket=bucket)
    client.create_bucket(Bucket=bucket)
    with shardckpt.CheckpointManager(str(root), replicas=[replica], min_replicas=1,
                                     **opts) as mgr:
        with pytest.warns(UserWarning, match=rf"{replica}: the root marker .* is missing.*"
                          r"up to step 1"):
            mgr.save(2, state(2))
        assert mgr.info(2).replicas == (str(root),)
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)  # nothing written there
    proc = subprocess.run([sys.executable, "-m", "shardckpt", "repair", str(root), "--replica",
                           replica], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "FSSPEC_S3_ENDPOINT_URL": s3.endpoint_url})
    assert proc.returncode == 0, proc.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with shardckpt.CheckpointManager(str(root), replicas=[replica], **opts) as mgr:
            mgr.save(3, state(3))
            assert mgr.info(3).replicas == (str(root), replica)


def test_cli_repair_refills_a_deleted_replica_but_refuses_unknown_missing_roots(
        tmp_path: Path) -> None:
    root, replica, rid = first_job(tmp_path)
    shutil.rmtree(replica)  # gone entirely; the manifests at ROOT record its marker
    proc = run_cli("repair", str(root), "--replica", str(replica))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in replica.glob("step-*")) == ["step-0000000001",
                                                               "step-0000000002"]
    assert marker_id(replica) == rid
    new = tmp_path / "new"
    new.mkdir()  # a new, empty location: filled, with a marker of its own
    proc = run_cli("repair", str(root), "--replica", str(new))
    assert proc.returncode == 0, proc.stderr
    assert len(marker_id(new)) == 32 and marker_id(new) != rid
    for argv in ([str(root), "--replica", str(tmp_path / "typo")],  # recorded nowhere
                 [str(tmp_path / "typo"), "--replica", str(replica)]):  # ROOT itself
        proc = run_cli("repair", *argv)
        assert proc.returncode == 64 and "no such checkpoint root" in proc.stderr, argv
    assert not (tmp_path / "typo").exists()
