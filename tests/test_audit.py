"""The audit trail (issue 32): one immutable record per event under ROOT/audit/, printed oldest
first by ``shardckpt log``; concurrent writers never lose each other's records; a record that
cannot be written never fails a save."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.audit import AUDIT_DIR, AuditWarning, append, read_trail, write_failures
from shardckpt.cli.main import main
from shardckpt.storage import open_location, step_dirname


def _log(root: str, capsys: pytest.CaptureFixture[str], *extra: str) -> list[dict]:
    capsys.readouterr()
    assert main(["log", root, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_job_leaves_a_trail_in_time_order(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Save 5 steps under keep_last=3 (2 pruned), repair one file: ``log --json`` prints every
    event oldest first, each with user, host, job and outcome."""
    monkeypatch.delenv("SHARDCKPT_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    root, replica = str(tmp_path / "run"), str(tmp_path / "replica")
    policy = shardckpt.RetentionPolicy(keep_last=3)
    with shardckpt.CheckpointManager(root, replicas=[replica], retention=policy,
                                     async_save=False) as mgr:
        for step in range(1, 6):
            mgr.save(step, {"w": torch.full((64,), float(step))})
            mgr._retention_runner.close()  # this step's retention is done before the next save
    shard = next(n for n in os.listdir(Path(replica) / step_dirname(5)) if n.endswith(".shard"))
    os.unlink(Path(replica) / step_dirname(5) / shard)
    assert main(["repair", root, "--replica", replica, "--step", "5", "--json"]) == 0

    trail = _log(root, capsys)
    events = [r["event"] for r in trail]
    assert events.count("commit") == 5 and "repair" in events and "prune" in events
    assert [r["time"] for r in trail] == sorted(r["time"] for r in trail)
    assert [r["step"] for r in trail if r["event"] == "commit"] == [1, 2, 3, 4, 5]
    deleted = sorted(s for r in trail if r["event"] == "prune" for s in r["detail"]["deleted"])
    assert deleted == [1, 2]
    prune = next(r for r in trail if r["event"] == "prune")
    assert prune["detail"]["policy"]["keep_last"] == 3
    repair = next(r for r in trail if r["event"] == "repair")
    assert repair["step"] == 5 and repair["outcome"] == "ok"
    assert repair["detail"]["files"][0]["file"] == shard
    assert repair["detail"]["files"][0]["from"] == root
    for r in trail:
        assert r["user"] and r["host"] and r["job"] == "4242" and r["outcome"] in ("ok",)
        assert set(r) >= {"time", "event", "step", "user", "host", "job", "detail"}
    assert [r["step"] for r in _log(root, capsys, "--step", "5")] == [5, 5]  # commit, repair
    assert os.listdir(Path(root) / AUDIT_DIR)  # prune and repair left audit/ alone


def _cron_prune(root: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "shardckpt", "prune", root, "--keep-last",
                             "1", "--lock-wait", "60s", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_prune_from_cron_adds_its_records_and_loses_none(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "run")
    policy = shardckpt.RetentionPolicy(keep_last=2)
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        for step in range(1, 7):
            mgr.save(step, {"w": torch.full((16,), float(step))})
    with shardckpt.CheckpointManager(root, retention=policy, async_save=False) as mgr:
        cron = _cron_prune(root)
        for step in range(7, 10):  # commits and background prunes while the cron prune runs
            mgr.save(step, {"w": torch.full((16,), float(step))})
        _, err = cron.communicate(timeout=120)
        assert cron.returncode == 0, err
        for step in (10, 11, 12):
            mgr.save(step, {"w": torch.full((16,), float(step))})
        mgr._retention_runner.close()
        mgr.prune()
    trail = _log(root, capsys)
    prunes = [r for r in trail if r["event"] == "prune"]
    deleted = [s for r in prunes for s in r["detail"]["deleted"]]
    remaining = set(open_location(root).list_step_dirs())
    assert len(deleted) == len(set(deleted))  # each deletion recorded once
    assert set(deleted) == set(range(1, 13)) - remaining
    assert cron.pid in {r["pid"] for r in prunes}
    assert os.getpid() in {r["pid"] for r in prunes}
    assert [r["step"] for r in trail if r["event"] == "commit"] == list(range(1, 13))


def test_concurrent_writers_never_overwrite_each_other(tmp_path: Path) -> None:
    loc = open_location(str(tmp_path / "run"))
    loc.makedirs("")

    def write(i: int) -> None:
        for j in range(10):
            assert append(loc, "tag", i, detail={"n": i * 100 + j}) is not None

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records, bad = read_trail(loc)
    assert bad == [] and sorted(r["detail"]["n"] for r in records) == \
        sorted(i * 100 + j for i in range(4) for j in range(10))


def test_a_record_that_cannot_be_written_never_fails_a_save(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shardckpt.storage.local import LocalLocation

    real = LocalLocation.write_exclusive

    def refuse_audit(self: LocalLocation, relpath: str, data: bytes) -> None:
        if relpath.startswith(f"{AUDIT_DIR}/"):
            raise PermissionError(13, "read-only audit folder", relpath)
        real(self, relpath, data)

    monkeypatch.setattr(LocalLocation, "write_exclusive", refuse_audit)
    before = write_failures()
    root, prom = str(tmp_path / "run"), tmp_path / "train.prom"
    with pytest.warns(AuditWarning, match="could not write the audit record of commit"):
        with shardckpt.CheckpointManager(root, async_save=False, metrics_path=prom) as mgr:
            mgr.save(1, {"w": torch.ones(4)})
            mgr.save(2, {"w": torch.ones(4)})
    assert shardckpt.CheckpointManager(root).steps() == [1, 2]
    assert write_failures() == before + 2
    line = next(x for x in prom.read_text().splitlines()
                if x.startswith("shardckpt_audit_write_failures_total{"))
    assert float(line.rsplit(" ", 1)[1]) >= before + 1  # the first failure, at the 2nd save


def test_records_hold_no_credentials(tmp_path: Path) -> None:
    loc = open_location(str(tmp_path / "run"))
    loc.makedirs("")
    append(loc, "export", 3, detail={"out": "s3://AKIAABCDEFGHIJKLMNOP:secretvalue@bkt/x",
                                     "aws_secret_access_key": "hunter2"})
    text = next((tmp_path / "run" / AUDIT_DIR).iterdir()).read_text()
    assert "hunter2" not in text and "secretvalue" not in text


def test_log_of_a_corrupt_record_exits_2(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(1, {"w": torch.ones(4)})
    (tmp_path / "run" / AUDIT_DIR / "zzz.json").write_text("{not json")
    assert main(["log", root]) == 2
    captured = capsys.readouterr()
    assert "commit" in captured.out and "zzz.json: not a valid audit record" in captured.err
