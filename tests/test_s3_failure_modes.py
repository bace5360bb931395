"""S3 failure modes (issue 26, item 2), against moto_server on 127.0.0.1: a missing bucket is
never created, deleting a step aborts the multipart uploads left under it, endpoint errors name
the endpoint, and a location that fails mid-save is given up for the rest of that save."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

import shardckpt
from shardckpt.storage import open_location


def state(step: int) -> dict[str, Any]:
    return {"w": torch.full((64,), float(step)), "step": step}


def buckets(s3: Any) -> set[str]:
    return {b["Name"] for b in s3.client().list_buckets()["Buckets"]}


def test_a_missing_bucket_fails_naming_it_and_is_never_created(s3: Any) -> None:
    root = "s3://no-such-bucket-x1/run"
    before = buckets(s3)
    with shardckpt.CheckpointManager(root, storage_options=s3.storage_options,
                                     async_save=False) as mgr:
        with pytest.raises(shardckpt.StorageError, match="bucket 'no-such-bucket-x1' does not "
                                                         "exist") as err:
            mgr.save(1, state(1))
    assert s3.endpoint_url in str(err.value)
    assert buckets(s3) == before  # never created
    loc = open_location(root, s3.options)
    with pytest.raises(shardckpt.StorageError, match="no-such-bucket-x1"):
        loc.makedirs("step-0000000001")
    assert buckets(s3) == before


def test_a_missing_replica_bucket_degrades_with_min_replicas_1(tmp_path: Path, s3: Any) -> None:
    with pytest.warns(UserWarning, match="no-such-bucket-x2"):
        with shardckpt.CheckpointManager(str(tmp_path / "run"), replicas=["s3://no-such-bucket-x2/r"],
                                         min_replicas=1, storage_options=s3.storage_options,
                                         async_save=False) as mgr:
            mgr.save(1, state(1))
            assert mgr.steps() == [1]
    assert "no-such-bucket-x2" not in buckets(s3)


def test_deleting_a_step_aborts_its_multipart_uploads(s3: Any) -> None:
    root = s3.new_root("mpu")
    bucket, prefix = root[len("s3://"):].split("/", 1)
    client = s3.client()
    key = f"{prefix}/step-0000000003/rank00000-000.shard"
    client.create_multipart_upload(Bucket=bucket, Key=key)  # a killed save's upload
    other = f"{prefix}/step-0000000004/rank00000-000.shard"
    client.create_multipart_upload(Bucket=bucket, Key=other)
    client.put_object(Bucket=bucket, Key=f"{prefix}/step-0000000003/x.shard", Body=b"x")
    loc = open_location(root, s3.options)
    loc.remove_tree("step-0000000003")
    left = [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    assert left == [other]  # only the uploads under the deleted step


def test_endpoint_errors_name_the_endpoint(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDCKPT_STORAGE_ATTEMPTS", "1")
    root = s3.new_root("ep")
    loc = open_location(root, s3.options)
    s3.kill()
    with pytest.raises(shardckpt.StorageError) as err:
        loc.read_file("step-0000000001/manifest.json", 1 << 20)
    assert f"(endpoint {s3.endpoint_url})" in str(err.value)


def test_a_replica_dying_mid_upload_never_stalls_training(tmp_path: Path, s3: Any,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """min_replicas=1: the S3 replica dies during the shard uploads of step 2. That save
    commits locally (degraded) within a few seconds (the location is given up for the rest of
    the save), and the next save does not wait for it at all."""
    from shardckpt.storage.remote import FsspecLocation

    local, replica = tmp_path / "local", s3.new_root("dies")
    mgr = shardckpt.CheckpointManager(str(local), replicas=[replica], min_replicas=1,
                                      storage_options=s3.storage_options)
    mgr.save(1, {"w": torch.randn(1 << 16), "b": torch.randn(1 << 16), "step": 1}).wait()
    real = FsspecLocation.open_sink

    def open_sink(self: Any, relpath: str) -> Any:
        if relpath.endswith(".shard") and s3.alive():
            s3.kill()
        return real(self, relpath)

    monkeypatch.setattr(FsspecLocation, "open_sink", open_sink)
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="degraded"):
        info = mgr.save(2, {"w": torch.randn(1 << 16), "b": torch.randn(1 << 16),
                            "step": 2}).wait()
    took = time.monotonic() - t0
    assert info.replicas == (str(local),)
    t1 = time.monotonic()
    with pytest.warns(UserWarning):
        mgr.save(3, {"w": torch.randn(1 << 16), "b": torch.randn(1 << 16), "step": 3}).wait()
    took3 = time.monotonic() - t1
    mgr.close()
    assert took < 12 and took3 < 3, (took, took3)


def test_a_failed_upload_never_deletes_the_object_another_writer_put_there(
        s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer stalled past its lease resumes: its multipart upload was aborted by the writer
    that took the step over, whose object is now at the key. The stalled writer's commit fails,
    and it must not delete that key (it is the other writer's, and acknowledged to it)."""
    monkeypatch.setenv("SHARDCKPT_S3_BLOCK_SIZE", str(5 << 20))
    root = s3.new_root("stalled")
    bucket, prefix = root[len("s3://"):].split("/", 1)
    key = f"{prefix}/step-0000000001/rank00000-000.shard"
    client = s3.client()
    loc = open_location(root, s3.options)
    loc.makedirs("step-0000000001")
    sink = loc.open_sink("step-0000000001/rank00000-000.shard")
    sink.write(b"a" * (6 << 20))  # one part uploaded: a multipart upload is under way
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == [key]
    client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=uploads[0]["UploadId"])
    client.put_object(Bucket=bucket, Key=key, Body=b"the other writer's shard")
    with pytest.raises(shardckpt.StorageError):
        sink.commit()
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert body == b"the other writer's shard"
