"""Two writers on one root (issue 26, item 1): at most one of them commits a step, the other's
save fails naming it, and nothing another writer holds or committed is ever removed.

* single process, deterministic: another writer's live lease on the step (written as another
  job would write it), and another writer's manifest appearing between the prepare and the
  commit (the exclusive create loses);
* a second job on a root that a live job writes is warned about once;
* ``ls`` shows a step whose shard was replaced by another writer's as damaged;
* the race itself: two 2-rank jobs (real gloo groups) saving steps 0..19 to one root at the same
  time, on a local disk and on S3 (moto): every step acknowledged to a job holds that job's
  values, and no step is acknowledged to both.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import crash_targets
import pytest
import torch
import two_writer_targets as T
from harness import run_ranks

import shardckpt
from shardckpt.engine import stepdir
from shardckpt.errors import ConcurrentWriterError
from shardckpt.storage import open_location, step_dirname
from shardckpt.storage.lease import LEASE_DIR, WRITER, put_record, read_leases
from shardckpt.storage.records import Record

STEPS = 20
ENV = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def _fast_ranks() -> Any:
    with crash_targets.forked_ranks():
        yield


def state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(16, 8, generator=g), "step": step}


def other_writer(root: str, step: int, host: str = "node-b", job: str = "4242") -> Record:
    """A live writer lease on ``step`` as another job (on another host) would have written."""
    now = time.time()
    rec = Record(WRITER, "f" * 32, (step_dirname(step),), host, 31337, None, None, None,
                 now, now, now + 300, job)
    loc = open_location(root)
    loc.makedirs(LEASE_DIR)
    put_record(loc, f"{LEASE_DIR}/{step_dirname(step)}.{WRITER}.{rec.token}.json", rec)
    return rec


def test_a_live_lease_of_another_writer_fails_the_save_and_keeps_its_files(tmp_path: Path
                                                                           ) -> None:
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(1, state(1))
        other_writer(root, 2)
        theirs = Path(root) / step_dirname(2) / "rank00000-000.shard"
        theirs.parent.mkdir()
        theirs.write_bytes(b"another writer's partial shard")
        with pytest.raises(ConcurrentWriterError) as err:
            mgr.save(2, state(2))
        msg = str(err.value)
        assert "host node-b, pid 31337, job 4242" in msg and step_dirname(2) in msg
        assert err.value.holder == "host node-b, pid 31337, job 4242"
        assert theirs.read_bytes() == b"another writer's partial shard"  # never removed
        assert mgr.steps() == [1]
        # our own lease is gone, theirs is still there
        left = [r for r in read_leases(open_location(root)).values() if r is not None]
        assert [r.host for r in left] == ["node-b"]
        mgr.save(3, state(3))  # other steps are not affected (and no second warning)
        assert mgr.steps() == [1, 3]


def test_an_expired_lease_is_no_writer(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    loc = open_location(root)
    loc.makedirs(LEASE_DIR)
    now = time.time()
    rec = Record(WRITER, "e" * 32, (step_dirname(2),), "node-b", 1, None, None, None,
                 now - 400, now - 400, now - 100, "old")
    put_record(loc, f"{LEASE_DIR}/{step_dirname(2)}.{WRITER}.{rec.token}.json", rec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with shardckpt.CheckpointManager(root, async_save=False) as mgr:
            mgr.save(2, state(2))
            assert mgr.steps() == [2]


def test_losing_the_commit_race_names_the_winner_and_keeps_its_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer commits the step after our prepare (its lease was not seen: it had
    lapsed): our exclusive create of the manifest loses, and nothing of the winner's goes."""
    root = str(tmp_path / "run")
    winner = b'{"writer": {"host": "node-b", "pid": 7, "job": "99"}}'
    real = stepdir.files_intact

    def files_intact(location: Any, step_dir: str, files: Any) -> None:
        real(location, step_dir, files)
        Path(location.root, step_dir, "manifest.json").write_bytes(winner)

    monkeypatch.setattr(stepdir, "files_intact", files_intact)
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        with pytest.raises(ConcurrentWriterError, match="host node-b, pid 7, job 99"):
            mgr.save(5, state(5))
    assert (Path(root) / step_dirname(5) / "manifest.json").read_bytes() == winner


def test_commit_refused_when_a_file_was_replaced(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(1, state(1))
    real = stepdir.commit
    src = Path(root) / step_dirname(1) / "rank00000-000.shard"

    def commit(location: Any, step_dir: str, data: bytes, lease: Any, files: Any = None,
               *rest: Any) -> None:
        if step_dir == step_dirname(2):  # same size, another save's header
            (Path(location.root) / step_dir / "rank00000-000.shard").write_bytes(
                src.read_bytes())
        real(location, step_dir, data, lease, files, *rest)

    monkeypatch.setattr(stepdir, "commit", commit)
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        with pytest.raises(ConcurrentWriterError, match="was replaced"):
            mgr.save(2, state(2))
        assert mgr.steps() == [1]


def test_the_second_job_is_warned_once(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    other_writer(root, 7, job="first-job")  # the live job is saving step 7 right now
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        with pytest.warns(UserWarning, match=r"another job is writing.*job first-job"):
            mgr.save(1, state(1))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mgr.save(2, state(2))
    assert sorted(p.name for p in Path(root).glob("step-*")) == [step_dirname(1),
                                                                 step_dirname(2)]


def test_lease_records_name_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDCKPT_JOB_ID", "run-17")
    rec = Record.new(WRITER, ["step-0000000001"], 60, time.time())
    assert rec.job == "run-17" and "job run-17" in rec.describe()
    assert Record.parse(rec.to_bytes()) == rec
    old = json.loads(rec.to_bytes())
    del old["job"]  # a record written by an older version
    assert Record.parse(json.dumps(old).encode()).job is None
    assert rec.holder() == f"host {socket.gethostname()}, pid {os.getpid()}, job run-17"


def test_ls_health_catches_a_header_that_does_not_match_the_manifest(tmp_path: Path) -> None:
    """Two steps of the same shapes: step 2's shard replaced by step 1's (same size, another
    save's header), as a second writer would have left it."""
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(1, state(1))
        mgr.save(2, state(2))
    name = "rank00000-000.shard"
    a, b = (Path(root) / step_dirname(s) / name for s in (1, 2))
    assert a.stat().st_size == b.stat().st_size
    b.write_bytes(a.read_bytes())
    out = subprocess.run([sys.executable, "-m", "shardckpt", "ls", root, "--json"],
                         capture_output=True, text=True, timeout=120)
    rows = {r["step"]: r for r in json.loads(out.stdout)}
    assert rows[1]["health"] == "ok"
    assert rows[2]["health"] == "damaged"
    assert rows[2]["locations"][0]["health"] == "header mismatch"


# ------------------------------------------------------------------------------ the race
def race(roots: tuple[str, str], options: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Jobs A (seed 1) and B (seed 2), 2 ranks each, saving steps 0..STEPS-1 at once."""
    out: list[Any] = [None, None]

    def job(i: int) -> None:
        try:
            out[i] = run_ranks(T.save_every_step, 2, roots[i], i + 1, STEPS, options,
                               timeout=300, env={**ENV, "SHARDCKPT_JOB_ID": f"job-{'AB'[i]}"})
        except BaseException as exc:  # reported by the test thread
            out[i] = exc

    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return [r[0] for r in out]  # both ranks of a job see the same outcome: rank 0's


def check_race(root: str, results: list[dict[str, Any]],
               options: dict[str, Any] | None) -> None:
    a, b = (set(r["acked"]) for r in results)
    assert not a & b, f"steps acknowledged to both jobs: {sorted(a & b)}"
    for seed, (acked, result) in enumerate(zip((a, b), results), start=1):
        other = "job-B" if seed == 1 else "job-A"
        for msg in result["errors"].values():  # each names the other job
            assert "ConcurrentWriterError" in msg and f"job {other}" in msg, msg
        for step in sorted(acked):
            got = T.load_full(root, step, 2, options)
            assert T.holds(got, seed, step, 2), f"step {step} acknowledged to job {seed} " \
                f"holds job {got['seed']}'s values"
    assert a | b  # the root is usable: some steps committed


def test_two_jobs_race_on_a_local_root(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    results = race((root, root), None)
    check_race(root, results, None)


def test_two_jobs_race_on_s3(s3: Any) -> None:
    root = s3.new_root("race")
    results = race((root, root), s3.storage_options)
    check_race(root, results, s3.storage_options)


def test_a_lease_this_process_left_behind_is_no_rival(tmp_path: Path) -> None:
    """A failed save abandons its lease at a failing location (it expires later): saving the
    same step again from the same process is not a second writer."""
    root = str(tmp_path / "run")
    loc = open_location(root)
    loc.makedirs(LEASE_DIR)
    rec = Record.new(WRITER, [step_dirname(2)], 300, time.time())  # this process's
    put_record(loc, f"{LEASE_DIR}/{step_dirname(2)}.{WRITER}.{rec.token}.json", rec)
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(2, state(2))
        assert mgr.steps() == [2]


def test_the_loser_always_gets_a_concurrent_writer_error(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer committing the step between our checks and our step directory: the save
    fails with ConcurrentWriterError (what a script catches), not a StorageError wrapping it."""
    root = str(tmp_path / "run")

    def committed_meanwhile(loc: Any, step_dir: str) -> None:
        raise ConcurrentWriterError(f"{step_dir}: already committed: another writer committed "
                                    "it (host node-b, pid 7, job 9)", "host node-b, pid 7, job 9")

    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(1, state(1))
        monkeypatch.setattr(stepdir, "prepare_step_dir", committed_meanwhile)
        with pytest.raises(ConcurrentWriterError, match="host node-b, pid 7, job 9"):
            mgr.save(2, state(2))
        monkeypatch.undo()
        mgr.save(3, state(3))
        assert mgr.steps() == [1, 3]
