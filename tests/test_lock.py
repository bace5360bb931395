"""``shardckpt lock`` (issue 32): S3 Object Lock retention on every object version of a step,
which prune respects (kept, "locked until ...", no delete marker); other steps of a versioned
bucket are deleted by version id; 64 where there is no Object Lock."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import torch

import shardckpt
from shardckpt.cli.main import main
from shardckpt.storage import step_dirname


def _versions(client: Any, bucket: str, prefix: str) -> list[tuple[str, str]]:
    page = client.list_object_versions(Bucket=bucket, Prefix=prefix)
    return [(v["Key"], v["VersionId"]) for v in page.get("Versions", [])] + \
        [(v["Key"], v["VersionId"]) for v in page.get("DeleteMarkers", [])]


def test_a_locked_step_survives_deletion_and_prune(s3: Any, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from botocore.exceptions import ClientError

    client = s3.client()
    bucket = f"lock-{os.urandom(6).hex()}"
    client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    root = f"s3://{bucket}/run"
    import fsspec.config  # it reads FSSPEC_S3_* variables once, at import: set it itself

    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3.endpoint_url})
    with shardckpt.CheckpointManager(root, storage_options=s3.storage_options,
                                     async_save=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((16,), float(step))})
    until = (datetime.now(timezone.utc) + timedelta(days=2)).isoformat()
    capsys.readouterr()
    assert main(["lock", root, "--step", "1", "--until", until, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["locations"][0]["locked"] >= 2  # the manifest and at least one shard

    locked = _versions(client, bucket, f"run/{step_dirname(1)}/")
    assert len(locked) >= 2
    for key, version in locked:
        with pytest.raises(ClientError):
            client.delete_object(Bucket=bucket, Key=key, VersionId=version)

    assert main(["prune", root, "--keep-last", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    kept = {k["step"]: k["reasons"] for k in report["kept"]}
    assert report["deleted"] == [2]
    assert set(kept) == {1, 3} and kept[1][0].startswith("locked until ")
    assert sorted(_versions(client, bucket, f"run/{step_dirname(1)}/")) == sorted(locked)
    assert _versions(client, bucket, f"run/{step_dirname(2)}/") == []  # freed, no marker

    assert main(["log", root, "--json"]) == 0
    events = [r["event"] for r in json.loads(capsys.readouterr().out)]
    assert events.count("lock") == 1 and events.count("prune") == 1


def test_lock_on_a_local_path_exits_64(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(1, {"w": torch.ones(2)})
    until = (datetime.now(timezone.utc) + timedelta(days=2)).isoformat()
    capsys.readouterr()
    assert main(["lock", root, "--step", "1", "--until", until]) == 64
    assert "supported: s3:// buckets created with Object Lock enabled" in capsys.readouterr().err
