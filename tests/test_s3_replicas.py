"""A local disk and a real S3 API (moto over HTTP) as replicas of one checkpoint (issue 5)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import dist_targets as T
import pytest
import torch
from harness import run_ranks
from test_storage_contract import NO_BOTO_RETRY

import shardckpt
from shardckpt.storage.remote import FsspecLocation


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(512, 300, generator=g), "b": torch.randn(999, generator=g)}


def blank() -> dict:
    return {"w": torch.zeros(512, 300), "b": torch.zeros(999)}


def same(a: dict, b: dict) -> bool:
    return torch.equal(a["w"], b["w"]) and torch.equal(a["b"], b["b"])


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardckpt", *args], capture_output=True,
                          text=True, timeout=180, env=env)


def s3_env(s3) -> dict:
    import os

    return {**os.environ, "FSSPEC_S3_ENDPOINT_URL": s3.endpoint_url}


def test_local_and_s3_round_trip_at_2_ranks(tmp_path: Path, s3) -> None:
    replica = s3.new_root("run")
    results = run_ranks(T.replicated_roundtrip, 2, str(tmp_path / "local"), replica,
                        s3.storage_options, timeout=240,
                        env={"SHARDCKPT_COLLECTIVE_TIMEOUT": "120"})
    for r in results:
        assert all(p == [] for p in r["problems"].values()), r["problems"]
    assert len(results[0]["replicas"]) == 2
    bucket, prefix = replica[len("s3://"):].split("/", 1)
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert f"{prefix}/step-0000000001/manifest.json" in keys
    # on an object store, names start with a hash prefix (spreading uploads over key prefixes)
    shards = [k.rsplit("/", 1)[1] for k in keys if k.endswith(".shard")]
    assert all(re.fullmatch(r"[0-9a-f]{2}-rank0000[01]-00[0-9]\.shard", n) for n in shards)
    assert {n[3:12] for n in shards} == {"rank00000", "rank00001"}
    assert len({n[:2] for n in shards}) > 1


def test_corrupt_local_shard_loads_from_s3_and_repair_heals_it(tmp_path: Path, s3) -> None:
    local, replica = tmp_path / "local", s3.new_root("run")
    with shardckpt.CheckpointManager(str(local), replicas=[replica],
                                     storage_options=s3.storage_options) as mgr:
        mgr.save(1, state(1))
    victim = sorted((local / "step-0000000001").glob("*.shard"))[0]
    data = bytearray(victim.read_bytes())
    data[5000] ^= 0x40
    victim.write_bytes(bytes(data))
    got = blank()
    with pytest.warns(UserWarning, match=victim.name):
        shardckpt.CheckpointManager(str(local), replicas=[replica],
                                    storage_options=s3.storage_options).load(got)
    assert same(got, state(1))
    proc = cli("repair", str(local), "--replica", replica, "--json", env=s3_env(s3))
    assert proc.returncode == 0, proc.stderr
    repaired = [e for s in json.loads(proc.stdout)["steps"] for e in s["repaired"]]
    assert [(e["location"], e["file"]) for e in repaired] == [(str(local), victim.name)]
    got = blank()
    shardckpt.CheckpointManager(str(local)).load(got)  # the local copy alone is whole again
    assert same(got, state(1))


def test_shard_deleted_on_s3_is_restored_by_repair(tmp_path: Path, s3) -> None:
    local, replica = tmp_path / "local", s3.new_root("run")
    with shardckpt.CheckpointManager(str(local), replicas=[replica],
                                     storage_options=s3.storage_options) as mgr:
        mgr.save(1, state(1))
    bucket = replica[len("s3://"):].split("/", 1)[0]
    client = s3.client()
    shard_keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]
                        if o["Key"].endswith(".shard"))
    client.delete_object(Bucket=bucket, Key=shard_keys[0])
    rows = json.loads(cli("ls", str(local), "--replica", replica, "--json",
                          env=s3_env(s3)).stdout)
    assert [loc["health"] for loc in rows[0]["locations"]] == ["ok", "missing files"]
    proc = cli("repair", str(local), "--replica", replica, "--json", env=s3_env(s3))
    assert proc.returncode == 0, proc.stderr
    got = blank()
    shardckpt.CheckpointManager(replica, storage_options=s3.storage_options).load(got)
    assert same(got, state(1))


def _kill_server_on_first_upload(monkeypatch, s3) -> None:
    real = FsspecLocation.open_sink

    def open_sink(self, relpath):
        if relpath.endswith(".shard") and s3.alive():
            s3.kill()  # the S3 server dies while the save is writing its shards
        return real(self, relpath)

    monkeypatch.setattr(FsspecLocation, "open_sink", open_sink)


@pytest.mark.parametrize("min_replicas", [1, 2])
def test_s3_killed_mid_save(tmp_path: Path, s3, monkeypatch, min_replicas: int) -> None:
    monkeypatch.setenv("SHARDCKPT_STORAGE_ATTEMPTS", "1")
    local, replica = tmp_path / "local", s3.new_root("run")
    # one botocore attempt: the dead server is found at once, not after a minute of retries
    opts = {"s3://": {**s3.options, **NO_BOTO_RETRY}}
    mgr = shardckpt.CheckpointManager(str(local), replicas=[replica], min_replicas=min_replicas,
                                      storage_options=opts)
    mgr.save(1, state(1)).wait()
    _kill_server_on_first_upload(monkeypatch, s3)
    if min_replicas == 1:
        with pytest.warns(UserWarning, match="degraded"):
            info = mgr.save(2, state(2)).wait()
        assert info.replicas == (str(local),)
        assert shardckpt.CheckpointManager(str(local)).manifest(2).extra["degraded"] is True
    else:
        with pytest.raises(shardckpt.StorageError):
            mgr.save(2, state(2)).wait()
        assert not (local / "step-0000000002" / "manifest.json").exists()
    monkeypatch.undo()
    check = shardckpt.CheckpointManager(str(local))
    assert check.steps() == ([1, 2] if min_replicas == 1 else [1])
    got = blank()
    check.load(got, step=1)
    assert same(got, state(1))
    mgr.close()


def test_throttled_s3_still_saves_and_loads(tmp_path: Path, s3, throttling_proxy) -> None:
    throttling_proxy.configure(every=4)
    replica = s3.new_root("run")
    opts = throttling_proxy.storage_options
    with shardckpt.CheckpointManager(str(tmp_path / "local"), replicas=[replica],
                                     storage_options=opts) as mgr:
        mgr.save(1, state(1))
        mgr.save(2, state(2))
    got = blank()
    shardckpt.CheckpointManager(replica, storage_options=opts).load(got, step=2)
    assert same(got, state(2))
    assert throttling_proxy.throttled > 0 and throttling_proxy.forwarded > 0
