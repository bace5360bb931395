"""An operator's trial on S3 (moto on 127.0.0.1): orphaned multipart uploads of a killed save
are aborted by prune, a missing bucket is an error naming it (never "no checkpoints yet"), a
new prefix in an existing bucket is a valid repair target, and a committed step drops the
expired leases of its dead writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import shardckpt
from shardckpt.storage import open_location
from shardckpt.storage.lease import LEASE_DIR, WRITER, Lease, remove_dead_writers


def state(step: int) -> dict[str, Any]:
    return {"w": torch.full((64,), float(step)), "step": step}


def cli(s3: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FSSPEC_S3_ENDPOINT_URL": s3.endpoint_url}
    return subprocess.run([sys.executable, "-m", "shardckpt", *args], capture_output=True,
                          text=True, timeout=180, env=env)


def split(root: str) -> tuple[str, str]:
    bucket, prefix = root[len("s3://"):].split("/", 1)
    return bucket, prefix


def uploads(s3: Any, bucket: str) -> list[str]:
    return sorted(u["Key"] for u in
                  s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def dead_lease(loc: Any, step_dir: str) -> str:
    """A writer lease whose holder died long ago (its last renewal is 1000 s old)."""
    lease = Lease.acquire(loc, step_dir, WRITER, clock=lambda: time.time() - 1000)
    lease.abandon()
    return lease.relpath.rsplit("/", 1)[1]


def leases(loc: Any) -> list[str]:
    return loc.listdir(LEASE_DIR)


def killed_upload(s3: Any, bucket: str, key: str) -> None:
    client = s3.client()
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1,
                       Body=b"x" * (5 << 20))


def test_prune_aborts_the_orphaned_upload_of_a_killed_saves_only_file(s3: Any) -> None:
    root = s3.new_root("orphan")
    bucket, prefix = split(root)
    with shardckpt.CheckpointManager(root, storage_options=s3.storage_options,
                                     async_save=False) as mgr:
        mgr.save(1, state(1))
    loc = open_location(root, s3.options)
    dead = dead_lease(loc, "step-0000000002")  # the killed writer of step 2
    killed_upload(s3, bucket, f"{prefix}/step-0000000002/00-rank00000-000.shard")
    live = Lease.acquire(loc, "step-0000000003", WRITER)  # a save writing step 3 right now
    try:
        killed_upload(s3, bucket, f"{prefix}/step-0000000003/00-rank00000-000.shard")
        assert "step-0000000002" not in loc.listdir("")  # step 2 shows nothing
        proc = cli(s3, "prune", root, "--keep-last", "5", "--json")  # within the grace
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert {s["dir"] for s in doc["skipped"]} == {"step-0000000002", "step-0000000003"}
        assert len(uploads(s3, bucket)) == 2
        assert dead in leases(loc)  # the only trace of the dead writer stays while in grace
        proc = cli(s3, "prune", root, "--keep-last", "5", "--grace", "0s", "--json")
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["reaped"] == ["step-0000000002"]
        assert doc["skipped"] == [{"dir": "step-0000000003",
                                   "reason": "being written (live writer lease)"}]
        assert uploads(s3, bucket) == [f"{prefix}/step-0000000003/00-rank00000-000.shard"]
        assert dead not in leases(loc)
    finally:
        live.release()
    assert shardckpt.CheckpointManager(root, storage_options=s3.storage_options).steps() == [1]


def test_a_missing_bucket_is_an_error_naming_it_never_no_checkpoints_yet(
        tmp_path: Path, s3: Any) -> None:
    root = "s3://nosuchbkt-y1/run"
    for command in ("ls", "show"):
        proc = cli(s3, command, root)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert "bucket 'nosuchbkt-y1' does not exist" in proc.stderr, proc.stderr
        assert s3.endpoint_url in proc.stderr
        assert "no checkpoints yet" not in proc.stdout + proc.stderr
    metrics = tmp_path / "prune.prom"
    proc = cli(s3, "prune", root, "--keep-last", "5", "--metrics-file", str(metrics))
    assert proc.returncode != 0
    assert "bucket 'nosuchbkt-y1' does not exist" in proc.stderr, proc.stderr
    assert 'shardckpt_prune_last_success{root="s3://nosuchbkt-y1/run"} 0' in metrics.read_text()
    saved = str(tmp_path / "run")
    with shardckpt.CheckpointManager(saved, async_save=False) as mgr:
        mgr.save(1, state(1))
    for args in (("repair", root, "--replica", saved), ("verify", root),
                 ("repair", saved, "--replica", root)):
        proc = cli(s3, *args)
        assert proc.returncode != 0, args
        assert "bucket 'nosuchbkt-y1' does not exist" in proc.stderr, (args, proc.stderr)
        assert "no such checkpoint root" not in proc.stderr
    assert "nosuchbkt-y1" not in {b["Name"] for b in s3.client().list_buckets()["Buckets"]}
    # a prefix that does not exist in an existing bucket: a root before its first save
    existing = s3.new_root("there")
    for args in (("ls", existing), ("prune", existing, "--keep-last", "5")):
        proc = cli(s3, *args)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "no checkpoints yet" in proc.stdout


def test_repair_fills_a_new_prefix_in_an_existing_bucket(tmp_path: Path, s3: Any) -> None:
    local = tmp_path / "run"
    with shardckpt.CheckpointManager(str(local), async_save=False) as mgr:
        mgr.save(1, state(1))
    fresh = s3.new_root("fresh")
    proc = cli(s3, "repair", str(local), "--replica", fresh)
    assert proc.returncode == 0, proc.stderr
    got = {"w": torch.zeros(64), "step": 0}
    shardckpt.CheckpointManager(fresh, storage_options=s3.storage_options).load(got)
    assert torch.equal(got["w"], state(1)["w"])
    proc = cli(s3, "repair", str(tmp_path / "nothing"), "--replica", fresh)
    assert proc.returncode == 64 and "no such checkpoint root" in proc.stderr  # the root must be


def test_a_commit_removes_the_expired_leases_of_dead_writers_of_its_step(s3: Any) -> None:
    root = s3.new_root("leases")
    loc = open_location(root, s3.options)
    dead1 = dead_lease(loc, "step-0000000001")  # killed while saving step 1
    dead2 = dead_lease(loc, "step-0000000002")  # another step's: a prune judges that one
    with shardckpt.CheckpointManager(root, storage_options=s3.storage_options,
                                     async_save=False) as mgr:
        mgr.save(1, state(1))
    assert leases(loc) == [dead2]
    assert dead1 not in leases(loc)
    live = Lease.acquire(loc, "step-0000000001", WRITER)  # never a lease in force
    try:
        remove_dead_writers(loc, "step-0000000001")
        assert live.relpath.rsplit("/", 1)[1] in leases(loc)
        remove_dead_writers(loc, "step-0000000002")  # not committed: kept for the prune
        assert dead2 in leases(loc)
    finally:
        live.release()
