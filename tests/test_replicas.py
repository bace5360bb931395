"""Several locations: every checkpoint everywhere, failover reads, degraded commits, repair."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.storage.location import LocalLocation


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(300, 40, generator=g), "b": torch.randn(77, generator=g),
            "step": seed}


def blank() -> dict:
    return {"w": torch.zeros(300, 40), "b": torch.zeros(77), "step": -1}


def same(a: dict, b: dict) -> bool:
    return torch.equal(a["w"], b["w"]) and torch.equal(a["b"], b["b"]) and a["step"] == b["step"]


def shards(root: Path, step: int) -> list[Path]:
    return sorted((root / f"step-{step:010d}").glob("*.shard"))


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, str]:
    return tmp_path / "primary", tmp_path / "replica", f"memory://{uuid.uuid4().hex}"


def test_every_location_gets_every_checkpoint(roots) -> None:
    a, b, mem = roots
    with shardckpt.CheckpointManager(str(a), replicas=[str(b), mem]) as mgr:
        info = mgr.save(1, state(1)).wait()
        assert len(info.replicas) == 3
    for root in (a, b):
        assert (root / "step-0000000001" / "manifest.json").exists()
        assert [p.name for p in shards(root, 1)] == [p.name for p in shards(a, 1)]
    # each location is a complete checkpoint on its own
    for only in (str(a), str(b), mem):
        got = blank()
        shardckpt.CheckpointManager(only).load(got)
        assert same(got, state(1))


def test_corrupt_local_shard_reads_from_replica_and_warns(roots) -> None:
    a, b, _ = roots
    with shardckpt.CheckpointManager(str(a), replicas=[str(b)]) as mgr:
        mgr.save(1, state(1))
    victim = shards(a, 1)[0]
    data = bytearray(victim.read_bytes())
    data[200] ^= 0xFF
    victim.write_bytes(bytes(data))
    got = blank()
    with pytest.warns(UserWarning, match=victim.name):
        shardckpt.CheckpointManager(str(a), replicas=[str(b)]).load(got)
    assert same(got, state(1))
    with pytest.raises(shardckpt.CorruptCheckpointError, match=victim.name):
        shardckpt.CheckpointManager(str(a)).load(blank())


def _broken_replica(monkeypatch: pytest.MonkeyPatch, broken_root: Path) -> None:
    real = LocalLocation.open_sink

    def open_sink(self, relpath):
        if self.root == str(broken_root):
            raise OSError(5, "Input/output error (injected)")
        return real(self, relpath)

    monkeypatch.setattr(LocalLocation, "open_sink", open_sink)


def test_min_replicas_1_commits_degraded_when_a_replica_fails(roots, monkeypatch) -> None:
    a, b, _ = roots
    mgr = shardckpt.CheckpointManager(str(a), replicas=[str(b)], min_replicas=1)
    mgr.save(1, state(1)).wait()
    _broken_replica(monkeypatch, b)
    with pytest.warns(UserWarning, match="degraded"):
        info = mgr.save(2, state(2)).wait()
    assert info.replicas == (str(a),)
    monkeypatch.undo()
    m = shardckpt.CheckpointManager(str(a)).manifest(2)
    assert m.extra["degraded"] is True
    assert not (b / "step-0000000002" / "manifest.json").exists()
    assert mgr.steps() == [1, 2]
    mgr.close()


def test_min_replicas_2_fails_and_leaves_earlier_checkpoints(roots, monkeypatch) -> None:
    a, b, _ = roots
    mgr = shardckpt.CheckpointManager(str(a), replicas=[str(b)], min_replicas=2)
    mgr.save(1, state(1)).wait()
    _broken_replica(monkeypatch, b)
    with pytest.raises(shardckpt.StorageError, match="Input/output error"):
        mgr.save(2, state(2)).wait()
    monkeypatch.undo()
    for root in (a, b):
        assert not (root / "step-0000000002" / "manifest.json").exists()
        check = shardckpt.CheckpointManager(str(root))
        assert check.steps() == [1]
        got = blank()
        check.load(got)
        assert same(got, state(1))
    mgr.save(3, state(3)).wait()  # and saving works again
    mgr.close()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardckpt", *args], capture_output=True,
                          text=True, timeout=120)


def test_repair_heals_corrupt_and_missing_files_and_manifest(roots) -> None:
    a, b, _ = roots
    with shardckpt.CheckpointManager(str(a), replicas=[str(b)]) as mgr:
        mgr.save(1, state(1))
        mgr.save(2, state(2))
    corrupt = shards(a, 1)[0]
    data = bytearray(corrupt.read_bytes())
    data[100] ^= 0x01
    corrupt.write_bytes(bytes(data))
    shards(b, 2)[-1].unlink()
    (b / "step-0000000002" / "manifest.json").unlink()

    proc = run_cli("ls", str(a), "--replica", str(b), "--json")
    health = {r["step"]: [loc["health"] for loc in r["locations"]]
              for r in json.loads(proc.stdout)}
    assert health[2][0] == "ok" and health[2][1] != "ok"

    proc = run_cli("repair", str(a), "--replica", str(b), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True
    repaired = {(s["step"], e["file"]) for s in doc["steps"] for e in s["repaired"]}
    assert (1, corrupt.name) in repaired and len(repaired) == 2
    assert [s["manifests_restored"] for s in doc["steps"] if s["step"] == 2] == [[str(b)]]
    # each location alone now loads both steps bit-exactly, and a second repair finds nothing
    for root in (a, b):
        for step in (1, 2):
            got = blank()
            shardckpt.CheckpointManager(str(root)).load(got, step=step)
            assert same(got, state(step))
    again = json.loads(run_cli("repair", str(a), "--replica", str(b), "--json").stdout)
    assert all(not s["repaired"] and not s["manifests_restored"] for s in again["steps"])


def test_repair_cannot_invent_data(roots) -> None:
    a, b, _ = roots
    with shardckpt.CheckpointManager(str(a), replicas=[str(b)]) as mgr:
        mgr.save(1, state(1))
    name = shards(a, 1)[0].name
    for root in (a, b):
        (root / "step-0000000001" / name).unlink()
    proc = run_cli("repair", str(a), "--replica", str(b), "--json")
    assert proc.returncode == 2
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False
    assert {e["file"] for e in doc["steps"][0]["unrepairable"]} == {name}


@pytest.mark.parametrize("fail_at", ["open", "write", "commit", None])
def test_tee_sink_survives_a_location_failing_at_any_point(fail_at: str | None,
                                                          tmp_path: Path) -> None:
    from shardckpt.storage.location import Sink
    from shardckpt.storage.replicas import TeeSink

    class FakeSink(Sink):
        def __init__(self, fail: str | None) -> None:
            self.fail, self.data = fail, []

        def write(self, data):
            if self.fail == "write":
                raise OSError("write failed")
            self.data.append(bytes(data))
            return len(data)

        def commit(self) -> None:
            if self.fail == "commit":
                raise OSError("commit failed")

        def abort(self) -> None:
            pass

    class FakeLocation(LocalLocation):  # a real backend whose sinks are fakes
        def __init__(self, fail: str | None) -> None:
            super().__init__(str(tmp_path))
            self.url, self.fail = "fake://", fail
            self.sinks: list[FakeSink] = []

        def open_sink(self, relpath):
            if self.fail == "open":
                raise OSError("open failed")
            self.sinks.append(FakeSink(self.fail))
            return self.sinks[-1]

    good, flaky = FakeLocation(None), FakeLocation(fail_at)
    tee = TeeSink([(0, good), (1, flaky)], "f")
    for i in range(50):  # more than the queue holds: a dead branch must keep draining
        tee.write(bytes([i]) * 10)
    assert tee.commit() == ([0] if fail_at else [0, 1])
    assert b"".join(good.sinks[0].data) == b"".join(bytes([i]) * 10 for i in range(50))
    assert set(tee.failures) == ({1} if fail_at else set())
