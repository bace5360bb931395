"""Crashes of a distributed (2-rank gloo) async save: one rank, or the whole job, SIGKILLed.

* **At each phase** of the save of step 3 (see :func:`crash_targets.arm_kill`): snapshot,
  writing a shard, fsyncing a shard, just before the manifest is written, just after it is
  renamed into place, and during the retention that follows the commit. The kill is armed on
  one rank, and either kills that rank alone (its peer then fails in its next collective and
  the harness reaps it) or every rank of the job at that instant.
* **At random moments**: a job saving every step (async, with retention) is SIGKILLed as a
  whole after a delay drawn from a seeded RNG.

Afterwards, as a fresh job would see it (black box: ``steps()``, ``latest_step()``, ``load()``,
``shardckpt prune``): every earlier checkpoint loads bit for bit, the interrupted step is
listed only if its manifest had been renamed into place (and then loads bit for bit too), the
next save (of the same step, over the leftovers, or of a later one) works, and
``shardckpt prune --grace 0`` removes what the crash left behind (partial directories, the dead
job's leases and prune lock).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crash_targets as T
import psutil
import pytest
from harness import RankFailures, run_ranks

import shardckpt
from shardckpt.cli.main import main as cli_main

ENV = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "20", "OMP_NUM_THREADS": "1",
       "SHARDCKPT_CHUNK_SIZE": "4K",  # several chunks per shard file
       "SHARDCKPT_LOCK_SETTLE_MS": "10"}  # one pruner per job: retention keeps up with saves
KILLED = "ProcessDied: killed by signal SIGKILL without reporting a result"
MANIFEST = "manifest.json"

# phase -> (rank the kill is armed on, committed steps afterwards). Retention keeps the last 2,
# so step 1 goes once step 3 is committed.
PHASES: dict[str, tuple[int, list[int]]] = {
    "snapshot": (1, [1, 2]),
    "writing": (1, [1, 2]),
    "fsync": (0, [1, 2]),
    "commit": (0, [1, 2]),
    "committed": (0, [1, 2, 3]),  # the manifest is in place: the save did commit
    "retention": (0, [2, 3]),  # step 1's manifest is gone, its data half deleted
}


@pytest.fixture(scope="module", autouse=True)
def _fast_ranks() -> Iterator[None]:
    with T.forked_ranks():
        yield


HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


def assert_no_rank_left() -> None:
    """The harness reaped every rank: nothing is left under this process but multiprocessing's
    own idle helpers (the fork server that starts the ranks, its resource tracker)."""
    helpers = [p for p in psutil.Process().children()
               if any(h in " ".join(p.cmdline()) for h in HELPERS)]
    left = [p for p in psutil.Process().children(recursive=True) if p not in helpers]
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()) for p in left]}"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:010d}"


def check_root(root: Path, expected: list[int]) -> None:
    """A fresh (single-process) manager lists exactly ``expected`` and loads each bit for bit;
    the default load picks the newest."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a corrupt, skipped manifest would be a failure
        with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
            assert mgr.steps() == expected
            assert mgr.latest_step() == (expected[-1] if expected else None)
            for step in expected:
                got = T.blank_state()
                assert mgr.load(got, step=step, restore_rng=False) == step
                assert T.state_problems(got, step) == []
            if expected:
                got = T.blank_state()
                assert mgr.load(got, restore_rng=False) == expected[-1]


def uncommitted_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step-*") if not (p / MANIFEST).exists())


def cli_prune_grace_0(root: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    code = cli_main(["prune", str(root), "--keep-last", "100", "--grace", "0", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def assert_only_committed_left(root: Path, committed: list[int]) -> None:
    """Nothing of a crashed save is left: step directories are exactly the committed steps,
    and no lease or lock record of the dead job remains."""
    assert sorted(p.name for p in root.glob("step-*")) == \
        [step_dir(root, s).name for s in committed]
    records = [p.name for p in (root / ".shardckpt").rglob("*.json")] + \
        [p.name for p in (root / ".shardckpt").glob("prune.lock")]
    assert records == [], f"stale lease/lock records left: {records}"


def file_ids(directory: Path) -> set[tuple[str, int, int]]:
    return {(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("whole_job", [False, True], ids=["one-rank", "whole-job"])
@pytest.mark.parametrize("phase", list(PHASES))
def test_sigkill_at_each_phase_of_a_distributed_async_save(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], phase: str, whole_job: bool) -> None:
    root = tmp_path / "ckpt"
    victim, expected = PHASES[phase]
    with pytest.raises(RankFailures) as excinfo:
        run_ranks(T.crash_at_phase, 2, str(root), phase, victim, whole_job, timeout=90, env=ENV)
    assert_no_rank_left()
    failures = excinfo.value.failures
    assert failures[victim] == KILLED, excinfo.value
    survivor = 1 - victim
    if phase == "retention":
        # the commit was complete and acknowledged before retention started: the peer's save
        # succeeded and it finished normally (or was killed on its way out, with the job)
        assert failures.get(survivor) in ((None, KILLED) if whole_job else (None,)), \
            excinfo.value
    elif whole_job:
        assert failures[survivor] == KILLED, excinfo.value
    else:
        # the peer's save fails in its next collective with the dead rank (or, at worst, the
        # harness kills it): it never reports success, and it never hangs
        assert failures[survivor].startswith(("CollectiveError", "Killed")), excinfo.value

    # The partial checkpoint is really there on disk (where no survivor could have cleaned
    # it up), and a fresh job does not see it.
    partial = [s for s in (1, 3) if s not in expected and step_dir(root, s).exists()]
    if phase in ("writing", "fsync", "commit") and (whole_job or victim == 0):
        assert partial == [3] and any(step_dir(root, 3).glob("*.shard"))
    if phase == "retention":
        assert partial == [1] and any(step_dir(root, 1).iterdir())  # data is still there
    for s in partial:
        assert not (step_dir(root, s) / MANIFEST).exists()
    check_root(root, expected)

    # The next job saves: the interrupted step again, over its leftovers (one-rank cases), or
    # a later step next to them (whole-job cases).
    nxt = 4 if whole_job or 3 in expected else 3
    before = file_ids(step_dir(root, nxt)) if step_dir(root, nxt).exists() else set()
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        info = mgr.save(nxt, T.rank_state(nxt)).wait()
        assert info is not None and info.step == nxt
    after = sorted({*expected, nxt})
    if before:
        assert not before & file_ids(step_dir(root, nxt)), "leftover files kept in the new save"
    check_root(root, after)

    # And prune (no grace) clears whatever the crash left: partial directories, dead leases,
    # the dead job's prune lock.
    leftovers = uncommitted_dirs(root)
    report = cli_prune_grace_0(root, capsys)
    assert sorted(report["reaped"]) == leftovers
    assert report["deleted"] == []
    assert_only_committed_left(root, after)
    check_root(root, after)


SEEDS = (11, 22, 33)
MAX_DELAY_S = 1.5


@pytest.mark.timeout(240)
def test_whole_job_sigkilled_at_random_moments(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """For each seed: a 2-rank job trains and saves every step (async, keep-last-3 retention)
    until it is SIGKILLed as a whole after a seeded random delay. Then one fresh 2-rank job
    resumes from each root (loads the latest bit for bit, saves the next step, prunes), and
    ``shardckpt prune --grace 0`` leaves nothing but committed checkpoints."""
    roots = []
    for seed in SEEDS:
        root = tmp_path / f"seed{seed}"
        log = tmp_path / f"seed{seed}.log"
        with pytest.raises(RankFailures) as excinfo:
            run_ranks(T.kill_at_random, 2, str(root), seed, str(log), MAX_DELAY_S, timeout=120,
                      env=ENV)
        assert excinfo.value.failures == {0: KILLED, 1: KILLED}, excinfo.value
        assert_no_rank_left()
        acknowledged = [int(line) for line in log.read_text().split()]
        assert acknowledged[0] == 1
        with shardckpt.CheckpointManager(str(root)) as mgr:
            listed = mgr.steps()
        # Every listed checkpoint is whole, and the newest acknowledged one survived (retention
        # keeps the newest 3). Rank 0 acknowledges step N once save(N + 1) has returned, so at
        # most the two saves issued after the newest acknowledged one can have got further.
        newest = acknowledged[-1]
        assert newest in listed, (seed, acknowledged, listed)
        assert set(listed) <= set(range(1, newest + 3)), (seed, acknowledged, listed)
        check_root(root, listed)
        for name in uncommitted_dirs(root):
            assert int(name[5:]) in range(1, newest + 3), name
        roots.append(root)
        with capsys.disabled():
            print(f"\nseed {seed}: killed after {len(acknowledged)} acknowledged saves; "
                  f"listed {listed}, partial {uncommitted_dirs(root)}")

    results = run_ranks(T.recover, 2, [str(r) for r in roots], timeout=120, env=ENV)
    for root, r0, r1 in zip(roots, results[0], results[1]):
        assert r0["problems"] == [] and r1["problems"] == []
        assert r0["latest"] == r0["before"][-1]
        assert r0["saved"] == r0["latest"] + 1
        assert r0["after"][-1] == r0["saved"] and len(r0["after"]) <= 3
        leftovers = uncommitted_dirs(root)
        report = cli_prune_grace_0(root, capsys)
        assert sorted(report["reaped"]) == leftovers
        assert_only_committed_left(root, r0["after"])
        check_root(root, r0["after"])


def test_targets_cover_every_phase() -> None:
    assert tuple(PHASES) == T.PHASES
