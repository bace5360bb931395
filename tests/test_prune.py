"""Pruning: ``shardckpt prune`` and retention in the manager, against live writers and crashes.

* the CLI: flags, ``--config`` TOML (flags win), ``--dry-run``, the JSON shape, exit codes;
* deletion order: a step's manifest goes (durably) before any of its data;
* uncommitted directories: reaped only after the grace period and never under a live lease;
* the prune lock: two prunes at once neither fail nor delete twice; a dead holder's lock
  expires; a live one elsewhere makes the CLI exit 70;
* leases: a save holds one until it ends, and a prune leaves its step alone meanwhile;
* retention in the manager runs on its own thread and never holds up a save;
* acceptance: a writer saving every step while ``shardckpt prune`` runs in a loop, and a prune
  SIGKILLed half-way through a deletion.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import shardckpt
from shardckpt.cli.main import main
from shardckpt.format import manifest as M
from shardckpt.prune import prune_location
from shardckpt.storage import location as location_mod
from shardckpt.storage import open_location, step_dirname
from shardckpt.storage.lease import (
    LEASE_DIR,
    LOCK_PATH,
    WRITER,
    Lease,
    PruneLock,
    PruneLockedError,
    Record,
    live_leases,
    read_leases,
)

TESTS_DIR = Path(__file__).resolve().parent
POLICY = {"keep_last": 3, "keep_every": 5}


def state_for(step: int) -> dict[str, Any]:
    """Small state that depends only on ``step``, so any process can regenerate it."""
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 64, generator=g),
            "b": torch.arange(100, dtype=torch.int64) * step, "step": step}


def expected_kept(steps: list[int], keep_last: int = 3, keep_every: int = 5) -> list[int]:
    return sorted(set(steps[-keep_last:]) | {s for s in steps if s % keep_every == 0})


def assert_loads(root: str, steps: list[int]) -> None:
    """Every step loads bit for bit with a fresh manager."""
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        for step in steps:
            want = state_for(step)
            got = {"w": torch.zeros(64, 64), "b": torch.zeros(100, dtype=torch.int64),
                   "step": 0}
            assert mgr.load(got, step=step) == step
            assert torch.equal(got["w"], want["w"]) and torch.equal(got["b"], want["b"])
            assert got["step"] == step


def make_root(path: Path, steps: range | list[int], **save_kwargs: Any) -> str:
    root = str(path)
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        for step in steps:
            mgr.save(step, state_for(step), metrics={"loss": 1.0 / step}, **save_kwargs)
    return root


def committed(root: str) -> list[int]:
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        return mgr.steps()


def prune_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["prune", *args])
    out, err = capsys.readouterr()
    return code, out, err


def tree(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDCKPT_FSYNC", "0")  # in-process tests only: speed


# ---------------------------------------------------------------------------------------- CLI
def test_cli_json_shape_and_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_root(tmp_path / "run", range(1, 13))
    code, out, err = prune_cli(capsys, root, "--keep-last", "3", "--keep-every", "5", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["dry_run"] is False
    assert doc["deleted"] == [1, 2, 3, 4, 6, 7, 8, 9]
    assert [k["step"] for k in doc["kept"]] == [5, 10, 11, 12]
    assert all(isinstance(k["reasons"], list) and k["reasons"] for k in doc["kept"])
    assert "newest" in doc["kept"][-1]["reasons"]
    assert doc["reaped"] == [] and doc["corrupt"] == []
    assert [loc["url"] for loc in doc["locations"]] == [root]
    assert committed(root) == [5, 10, 11, 12]
    assert_loads(root, [5, 10, 11, 12])
    # Pruning again changes nothing; the human output names every step.
    code, out, _ = prune_cli(capsys, root, "--keep-last", "3", "--keep-every", "5")
    assert code == 0 and "deleted 0" in out and "newest" in out


def test_config_toml_and_flags_override(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    root = make_root(tmp_path / "run", range(1, 9))
    config = tmp_path / "policy.toml"
    config.write_text('[retention]\nkeep_last = 4\nkeep_every = 3\nkeep_tags = []\n'
                      '[other]\nignored = true\n')
    code, out, err = prune_cli(capsys, root, "--config", str(config), "--dry-run", "--json")
    assert code == 0, err
    assert json.loads(out)["deleted"] == [1, 2, 4]
    # A flag overrides the file's value of the same rule, the file's other rules stay.
    code, out, err = prune_cli(capsys, root, "--config", str(config), "--keep-last", "1",
                               "--json")
    assert code == 0, err
    assert json.loads(out)["deleted"] == [1, 2, 4, 5, 7]
    assert committed(root) == [3, 6, 8]
    top = tmp_path / "top.toml"
    top.write_text('keep-last = 1\n')
    code, out, _ = prune_cli(capsys, root, "--config", str(top), "--json")
    assert code == 0 and json.loads(out)["deleted"] == [3, 6]


@pytest.mark.parametrize("args", [
    (),                                              # no rule at all
    ("--keep-best", "2"),                            # --keep-best without --metric
    ("--keep-last", "-1"),
    ("--keep-within", "soon"),
    ("--keep-last", "1", "--grace", "forever"),
    ("--config", "{tmp}/missing.toml"),
    ("--config", "{tmp}/bad.toml"),
])
def test_usage_errors_exit_64_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            args: tuple[str, ...]) -> None:
    root = make_root(tmp_path / "run", [1, 2])
    (tmp_path / "bad.toml").write_text("keep_lots = 3\n")
    before = tree(root)
    code, out, err = prune_cli(capsys, root, *(a.format(tmp=tmp_path) for a in args))
    assert code == 64
    assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert tree(root) == before


def test_dry_run_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_root(tmp_path / "run", range(1, 8))
    stale = Path(root) / step_dirname(20)
    stale.mkdir()
    (stale / "rank00000-000.shard").write_bytes(b"x" * 10)
    old = time.time() - 7200
    for p in (stale / "rank00000-000.shard", stale):
        os.utime(p, (old, old))
    before = tree(root)
    code, out, err = prune_cli(capsys, root, "--keep-last", "2", "--dry-run", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["dry_run"] is True and doc["deleted"] == [1, 2, 3, 4, 5]
    assert doc["reaped"] == [step_dirname(20)]
    assert tree(root) == before
    assert not os.path.exists(os.path.join(root, LOCK_PATH))


def test_corrupt_manifest_is_reported_not_deleted(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    root = make_root(tmp_path / "run", range(1, 6))
    m = Path(root) / step_dirname(2) / M.MANIFEST_NAME
    data = bytearray(m.read_bytes())
    data[30] ^= 1
    m.write_bytes(bytes(data))
    code, out, err = prune_cli(capsys, root, "--keep-last", "1", "--json")
    assert code == 2
    doc = json.loads(out)
    assert doc["deleted"] == [1, 3, 4] and [c["step"] for c in doc["corrupt"]] == [2]
    assert "step 2" in err and "Traceback" not in err
    assert m.exists()


# ------------------------------------------------------------------------------ deletion order
def test_manifest_goes_first_and_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_root(tmp_path / "run", range(1, 7))
    calls: list[tuple[str, str]] = []
    cls = location_mod.LocalLocation
    for name in ("remove", "remove_tree", "fsync_dir"):
        real = getattr(cls, name)

        def record(self: Any, rel: str, _real: Any = real, _name: str = name) -> None:
            if rel.startswith("step-") or rel == "":
                calls.append((_name, rel))
            _real(self, rel)

        monkeypatch.setattr(cls, name, record)
    report = prune_location(open_location(root), shardckpt.RetentionPolicy(keep_last=2))
    assert report.deleted == (1, 2, 3, 4)
    for step in report.deleted:
        d = step_dirname(step)
        mine = [c for c in calls if c[1].startswith(d)]
        assert mine == [("remove", f"{d}/{M.MANIFEST_NAME}"), ("fsync_dir", d),
                        ("remove_tree", d)], mine
    assert calls[-1] == ("fsync_dir", "")


# ---------------------------------------------------------------------- uncommitted directories
def _uncommitted(root: str, step: int, age_s: float) -> Path:
    d = Path(root) / step_dirname(step)
    d.mkdir()
    (d / "rank00000-000.shard").write_bytes(b"partial")
    then = time.time() - age_s
    for p in (d / "rank00000-000.shard", d):
        os.utime(p, (then, then))
    return d


def _write_record(root: str, relpath: str, **fields: Any) -> None:
    now = time.time()
    rec = {"kind": WRITER, "token": "t" * 32, "dirs": [], "host": "elsewhere.example",
           "pid": 1, "boot": None, "pidns": None, "start": None, "acquired": now,
           "renewed": now, "expires": now + 600, **fields}
    path = Path(root) / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(Record(**rec).to_bytes())


def test_reaping_respects_grace_and_live_leases(tmp_path: Path) -> None:
    root = make_root(tmp_path / "run", [1, 2])
    loc = open_location(root)
    old = _uncommitted(root, 10, age_s=7200)
    fresh = _uncommitted(root, 11, age_s=60)
    leased = _uncommitted(root, 12, age_s=7200)
    expired = _uncommitted(root, 13, age_s=7200)
    stale_lease = f"{LEASE_DIR}/{step_dirname(13)}.writer.{'e' * 32}.json"
    _write_record(root, stale_lease, dirs=[step_dirname(13)], renewed=time.time() - 7000,
                  expires=time.time() - 6700)
    killed_tmp = Path(root) / LEASE_DIR / f"{step_dirname(14)}.writer.{'k' * 32}.json.tmp-0"
    killed_tmp.write_bytes(b"{")  # a writer killed half-way through writing its lease
    os.utime(killed_tmp, (time.time() - 7200, time.time() - 7200))
    lease = Lease.acquire(loc, step_dirname(12))
    try:
        report = prune_location(loc, shardckpt.RetentionPolicy(keep_last=5))
        assert not killed_tmp.exists()
        assert sorted(report.reaped) == [step_dirname(10), step_dirname(13)]
        assert set(report.skipped) == {step_dirname(11), step_dirname(12)}
        assert "lease" in report.skipped[step_dirname(12)]
        assert "grace" in report.skipped[step_dirname(11)]
        assert not old.exists() and not expired.exists() and fresh.exists() and leased.exists()
        assert not (Path(root) / stale_lease).exists()  # its directory is gone
        # --grace 0 takes the fresh one too, but never a leased one.
        report = prune_location(loc, shardckpt.RetentionPolicy(keep_last=5), grace=0)
        assert report.reaped == (step_dirname(11),) and leased.exists()
    finally:
        lease.release()
    assert not list((Path(root) / LEASE_DIR).iterdir())
    report = prune_location(loc, shardckpt.RetentionPolicy(keep_last=5))
    assert report.reaped == (step_dirname(12),)
    assert committed(root) == [1, 2]


# ---------------------------------------------------------------------------------- the lock
def test_two_prunes_at_once_neither_fail_nor_delete_twice(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_root(tmp_path / "run", range(1, 31))
    removed: list[str] = []
    real_remove = location_mod.LocalLocation.remove

    def remove(self: Any, rel: str) -> None:
        if rel.endswith(M.MANIFEST_NAME):
            removed.append(rel)
        real_remove(self, rel)

    monkeypatch.setattr(location_mod.LocalLocation, "remove", remove)
    barrier = threading.Barrier(2)
    results: list[Any] = [None, None]

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = prune_location(open_location(root), shardckpt.RetentionPolicy(**POLICY),
                                        lock_wait=30)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(isinstance(r, BaseException) for r in results), results
    deleted = [s for r in results for s in r.deleted]
    want = sorted(set(range(1, 31)) - set(expected_kept(list(range(1, 31)))))
    assert sorted(deleted) == want  # between them, each step once
    assert len(removed) == len(set(removed)) == len(want)
    assert committed(root) == expected_kept(list(range(1, 31)))
    assert not os.path.exists(os.path.join(root, LOCK_PATH))


def test_lock_of_a_dead_or_expired_holder_is_taken_over(tmp_path: Path) -> None:
    root = make_root(tmp_path / "run", range(1, 5))
    loc = open_location(root)
    # Expired: written by a host we know nothing about, an hour ago.
    _write_record(root, LOCK_PATH, kind="prune-lock", acquired=time.time() - 3600,
                  renewed=time.time() - 3600, expires=time.time() - 3480)
    assert prune_location(loc, shardckpt.RetentionPolicy(keep_last=3)).deleted == (1,)
    # Not expired, but held by a process of this host that has exited: taken over at once.
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    me = Record.new("prune-lock", (), 600, time.time())
    dead = {k: getattr(me, k) for k in ("host", "boot", "pidns")}
    _write_record(root, LOCK_PATH, kind="prune-lock", pid=int(proc.stdout), start=12345, **dead)
    assert prune_location(loc, shardckpt.RetentionPolicy(keep_last=2), lock_wait=0).deleted \
        == (2,)


def test_live_lock_elsewhere_is_exit_70(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_root(tmp_path / "run", range(1, 5))
    _write_record(root, LOCK_PATH, kind="prune-lock")
    before = tree(root)
    code, out, err = prune_cli(capsys, root, "--keep-last", "1", "--lock-wait", "0", "--json")
    assert code == 70
    assert "elsewhere.example" in err and len(err.strip().splitlines()) == 1
    doc = json.loads(out)
    assert doc["deleted"] == [] and "PruneLockedError" in doc["locations"][0]["error"]
    assert tree(root) == before
    with pytest.raises(PruneLockedError):
        PruneLock.acquire(open_location(root), wait=0.3)


def test_lease_renews_and_lapses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loc = open_location(str(tmp_path))
    # The renewal thread runs every TTL/5 of real time; the lease's own clock moves 1 ms per
    # reading, so no stall of a loaded machine can make the 0.5 s TTL lapse under the test.
    ticks = [time.time()]

    def clock() -> float:
        ticks[0] += 0.001
        return ticks[0]

    renewed = threading.Event()
    real_renew = Lease.renew

    def renew(self: Lease) -> None:
        real_renew(self)
        renewed.set()

    monkeypatch.setattr(Lease, "renew", renew)
    lease = Lease.acquire(loc, step_dirname(3), ttl=0.5, clock=clock)
    first = lease.record.expires
    assert renewed.wait(60), "the renewal thread never renewed"
    assert lease.record.expires > first and not lease.lost
    assert live_leases(loc, step_dirname(3), WRITER, clock=clock)[0].token == \
        lease.record.token
    lease.check(margin=0.1)
    lease.release()
    assert read_leases(loc) == {}
    clock = [1000.0]
    stalled = Lease.acquire(loc, step_dirname(4), ttl=100, clock=lambda: clock[0])
    try:
        clock[0] += 60  # renewals stalled for 60 s: under half the TTL left, no commit
        with pytest.raises(shardckpt.ShardckptError, match="left"):
            stalled.check(margin=50)
    finally:
        stalled.release()


# ----------------------------------------------------------------------------- saves and leases
def test_a_save_holds_a_lease_that_prune_respects(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_root(tmp_path / "run", [1, 2, 3])
    seen: dict[str, Any] = {}
    real = location_mod.LocalLocation.write_atomic

    def write_atomic(self: Any, rel: str, data: bytes) -> None:
        if rel == f"{step_dirname(4)}/{M.MANIFEST_NAME}" and "report" not in seen:
            seen["leases"] = live_leases(self, step_dirname(4), WRITER)
            # A prune at the worst moment: step 4 is complete but not committed yet.
            seen["report"] = prune_location(open_location(root),
                                            shardckpt.RetentionPolicy(keep_last=1), grace=0)
        real(self, rel, data)

    monkeypatch.setattr(location_mod.LocalLocation, "write_atomic", write_atomic)
    with shardckpt.CheckpointManager(root, async_save=True) as mgr:
        mgr.save(4, state_for(4)).wait()
    assert len(seen["leases"]) == 1
    report = seen["report"]
    assert report.reaped == () and step_dirname(4) in report.skipped
    assert report.deleted == (1, 2)  # step 3 was the newest committed then
    assert committed(root) == [3, 4]
    assert read_leases(open_location(root)) == {}  # released once the save ended
    assert_loads(root, [3, 4])


def test_failed_save_releases_its_lease(tmp_path: Path) -> None:
    root = make_root(tmp_path / "run", [1])
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        with pytest.raises((ValueError, shardckpt.ShardckptError)):
            mgr.save(1, state_for(1))  # step 1 is committed: refused after taking the lease
    assert read_leases(open_location(root)) == {}


def test_background_retention_never_blocks_saves(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path / "run")
    release = threading.Event()
    started = threading.Event()
    real = location_mod.LocalLocation.remove_tree
    pruner_threads: set[str] = set()

    def remove_tree(self: Any, rel: str) -> None:
        if threading.current_thread().name.startswith("shardckpt-retention"):
            pruner_threads.add(threading.current_thread().name)
            started.set()
            assert release.wait(timeout=60)
        real(self, rel)

    monkeypatch.setattr(location_mod.LocalLocation, "remove_tree", remove_tree)
    policy = shardckpt.RetentionPolicy(keep_last=2)
    with shardckpt.CheckpointManager(root, async_save=False, retention=policy) as mgr:
        mgr.save(1, state_for(1))
        mgr.save(2, state_for(2))
        mgr.save(3, state_for(3))
        assert started.wait(timeout=30)  # the prune that deletes step 1 is now stuck
        for step in range(4, 9):  # blocking saves complete all the same
            mgr.save(step, state_for(step))
        assert set(mgr.steps()) >= {4, 5, 6, 7, 8}
        release.set()
    assert pruner_threads
    assert committed(root) == [7, 8]
    assert_loads(root, [7, 8])


def test_manager_prune_with_a_replica(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with shardckpt.CheckpointManager(a, replicas=(b,), async_save=False) as mgr:
        for step in range(1, 6):
            mgr.save(step, state_for(step))
    # The replica holds an extra leftover step the root never had: each from its own listing.
    _uncommitted(b, 9, age_s=7200)
    with shardckpt.CheckpointManager(a, replicas=(b,), async_save=False,
                                     retention=shardckpt.RetentionPolicy(keep_last=2)) as mgr:
        report = mgr.prune()
        assert report.deleted == (1, 2, 3) and report.reaped == ()
        assert report.replicas[0].deleted == (1, 2, 3)
        assert report.replicas[0].reaped == (step_dirname(9),)
        assert mgr.steps() == [4, 5]
    assert committed(b) == [4, 5]


def test_prune_on_s3(s3: Any) -> None:
    """Leases, the lock and directory ages (LastModified) on an object store."""
    root = s3.new_root()
    with shardckpt.CheckpointManager(root, async_save=False,
                                     storage_options=s3.storage_options) as mgr:
        for step in range(1, 5):
            mgr.save(step, state_for(step))
    loc = open_location(root, s3.options)
    loc.write_atomic(f"{step_dirname(9)}/rank00000-000.shard", b"partial")
    lease = Lease.acquire(loc, step_dirname(8))  # a lease whose directory is not there yet
    report = prune_location(loc, shardckpt.RetentionPolicy(keep_last=2))
    assert report.deleted == (1, 2) and step_dirname(9) in report.skipped  # young
    lease.release()
    report = prune_location(loc, shardckpt.RetentionPolicy(keep_last=2), grace=0)
    assert report.reaped == (step_dirname(9),)
    assert sorted(loc.list_step_dirs()) == [3, 4]
    assert loc.size(LOCK_PATH) is None and read_leases(loc) == {}


# -------------------------------------------------------------------------------- acceptance
WRITER_CAP = 5000  # a safety net only: the writer saves until told to stop
WRITER_CHILD = f"""
import os, sys, time
sys.path.insert(0, {str(TESTS_DIR)!r})
import shardckpt
from test_prune import state_for

root, stop = sys.argv[1], sys.argv[2]
step = 0
with shardckpt.CheckpointManager(root, async_save=False) as mgr:
    while not os.path.exists(stop) and step < {WRITER_CAP}:
        step += 1
        mgr.save(step, state_for(step), metrics={{"loss": 1.0 / step}})
        print(step, flush=True)
        time.sleep(0.05)  # the training step between two saves (keeps the step count modest)
print("done", step, flush=True)
"""


CHILD_ENV = {"SHARDCKPT_FSYNC": "1", "PYTHONUNBUFFERED": "1"}  # children run as users would


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardckpt", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **CHILD_ENV})


@contextlib.contextmanager
def _child(code: str, *args: str, env: dict[str, str] | None = None
           ) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, **CHILD_ENV, **(env or {})})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)


def _expect_line(proc: subprocess.Popen[bytes], want: Any, timeout: float) -> str:
    """Read the child's stdout (raw fd, with a deadline) until a line satisfies ``want``."""
    assert proc.stdout is not None
    fd, buf = proc.stdout.fileno(), b""
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while True:
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if want(line.decode()):
                    return line.decode()
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError("the child printed no line it was expected to")
            data = os.read(fd, 4096)
            if not data:
                raise AssertionError("the child exited early: " + _stderr(proc))
            buf += data
    finally:
        sel.close()


def _stderr(proc: subprocess.Popen[bytes]) -> str:
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)
        return proc.stderr.read().decode(errors="replace")[-3000:]  # type: ignore[union-attr]
    return ""


@pytest.mark.timeout(120)
def test_writer_never_fails_while_prune_runs_in_a_loop(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    root, stop = str(tmp_path / "run"), str(tmp_path / "stop")
    deleted_total = 0
    with _child(WRITER_CHILD, root, stop) as writer:
        _expect_line(writer, lambda line: line == "3", timeout=60)
        for _ in range(3):
            proc = _cli("prune", root, "--keep-last", "3", "--keep-every", "5", "--json")
            assert proc.returncode == 0, proc.stderr
            doc = json.loads(proc.stdout)
            deleted_total += len(doc["deleted"])
            steps = committed(root)
            kept = [k["step"] for k in doc["kept"]]
            assert set(kept) <= set(steps) and not set(doc["deleted"]) & set(steps)
            assert_loads(root, steps)
            assert writer.poll() is None, "the writer stopped early"
        Path(stop).touch()
        out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err.decode(errors="replace")[-3000:]
    assert not err.strip(), err.decode(errors="replace")[-3000:]  # not even a warning
    last = int(out.split()[-1])
    assert deleted_total > 0
    code, _, err = prune_cli(capsys, root, "--keep-last", "3", "--keep-every", "5")
    assert code == 0, err
    final = committed(root)
    assert final == expected_kept(list(range(1, last + 1)))
    assert_loads(root, final)
    assert not [p for p in Path(root).iterdir() if p.name.startswith("step-")
                and not (p / M.MANIFEST_NAME).exists()]


PRUNE_CHILD = """
import sys, threading
from shardckpt.storage import location as L

real = L.LocalLocation.remove_tree

def remove_tree(self, rel):
    if rel.startswith("step-"):  # take half the files, say so, and hang: SIGKILL comes here
        names = sorted(self.listdir(rel))
        for name in names[: len(names) // 2]:
            self.remove(rel + "/" + name)
        print("deleting", rel, flush=True)
        threading.Event().wait()
    real(self, rel)

L.LocalLocation.remove_tree = remove_tree
from shardckpt.cli.main import main
sys.exit(main(sys.argv[1:]))
"""




@pytest.mark.timeout(120)
def test_prune_killed_mid_deletion_leaves_every_listed_checkpoint_loadable(
        tmp_path: Path) -> None:
    root = make_root(tmp_path / "run", range(1, 21))
    with _child(PRUNE_CHILD, "prune", root, "--keep-last", "3", "--keep-every", "5") as proc:
        line = _expect_line(proc, lambda line: line.startswith("deleting "), timeout=60)
        victim = Path(root) / line.split()[1]
        assert not (victim / M.MANIFEST_NAME).exists()  # the manifest went first
        assert any(victim.iterdir())  # and data is still there: we are mid-deletion
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    listed = committed(root)  # the dropped steps go newest first (incremental references)
    assert int(victim.name.removeprefix("step-")) not in listed and listed[-3:] == [18, 19, 20]
    assert_loads(root, listed)
    # The next prune finds the dead prune's lock free at once (its holder is gone), finishes
    # the job and reaps the half-deleted directory.
    report = prune_location(open_location(root), shardckpt.RetentionPolicy(**POLICY), grace=0)
    assert victim.name in report.reaped
    assert committed(root) == expected_kept(list(range(1, 21)))
    assert sorted(p.name for p in Path(root).iterdir()) == \
        [".shardckpt", ".shardckpt-root", "audit",  # audit/: the trail (issue 32)
         *(step_dirname(s) for s in expected_kept(list(range(1, 21))))]
    assert_loads(root, committed(root))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("after", [1, 10, 25])
def test_prune_sigkilled_at_a_random_moment(tmp_path: Path, after: int) -> None:
    """No hooks: SIGKILL once ``after`` of the 39 doomed manifests are gone, wherever the prune
    is by then. The kill must land during the prune: checked, not assumed."""
    root = make_root(tmp_path / "run", range(1, 41))
    doomed = [Path(root) / step_dirname(s) for s in range(1, 40)]
    with _child("from shardckpt.cli.main import main; main()", "prune", root,
                "--keep-last", "1") as proc:
        deadline = time.monotonic() + 60
        while (sum(not (d / M.MANIFEST_NAME).exists() for d in doomed) < after
               and proc.poll() is None and time.monotonic() < deadline):
            time.sleep(0.001)  # polling for the deletions
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait(timeout=30)
    assert code == -signal.SIGKILL, f"the prune ended ({code}) before the kill: nothing was tested"
    left = [d.name for d in doomed if d.exists()]
    assert left, "every doomed directory was gone at the kill: nothing was tested"
    assert sum(not (d / M.MANIFEST_NAME).exists() for d in doomed) >= after
    listed = committed(root)
    assert listed and listed[-1] == 40
    assert_loads(root, listed)
    # the next prune finishes the job
    prune_location(open_location(root), shardckpt.RetentionPolicy(keep_last=1), grace=0)
    assert committed(root) == [40]
    assert sorted(p.name for p in Path(root).iterdir()) == [".shardckpt", ".shardckpt-root",
                                                         "audit", step_dirname(40)]


def test_launch_examples_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The crontab and systemd examples' command lines, pointed at a real root, dry-run."""
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        for step in range(1, 5):  # the example policy ranks by val_loss: a missing one is 64
            mgr.save(step, state_for(step), metrics={"loss": 1.0 / step, "val_loss": 2.0 / step})
    launch = TESTS_DIR.parent / "launch"
    policy = str(launch / "prune-policy.example.toml")
    cron = next(line for line in (launch / "cron" / "shardckpt-prune.crontab").read_text()
                .splitlines() if line and not line.startswith(("#", "SHELL", "PATH")))
    service = next(line for line in (launch / "systemd" / "shardckpt-prune.service").read_text()
                   .splitlines() if line.startswith("ExecStart="))
    for line in (cron, service.replace("${SHARDCKPT_ROOT}", "/nvme/run1")
                 .replace("${SHARDCKPT_POLICY}", "/etc/shardckpt/prune-policy.toml")):
        args = line.split(" prune ", 1)[1].split(">>")[0].split()
        args = [root if a == "/nvme/run1" else policy if a.endswith("prune-policy.toml") else a
                for a in args]
        code, out, err = prune_cli(capsys, *args, "--dry-run")
        assert code == 0, err
        assert json.loads(out)["deleted"] == [1]  # last 3 (the best 2 by val_loss among them)


def test_lease_record_host_is_this_host(tmp_path: Path) -> None:
    rec = Record.new(WRITER, [step_dirname(1)], 10, time.time())
    assert rec.host == socket.gethostname() and rec.pid == os.getpid()
    assert Record.parse(rec.to_bytes()) == rec and rec.live(time.time())
