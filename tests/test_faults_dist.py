"""Storage faults on ONE rank of a 2-rank (gloo) save: ENOSPC / EIO injected into that rank's
shard writes, shard fsyncs, or (rank 0) the manifest's fsync and rename.

For each fault (see ``crash_targets.FAULTS``; async and blocking saves): the save fails on
*every* rank with a ``ShardckptError`` (``CollectiveError`` naming the failing rank and the
error, or ``StorageError`` when the commit itself failed), nothing is committed, both ranks
go on training, and the next save (the fault gone) succeeds. At the end the job loads the
latest checkpoint bit for bit, and a fresh process sees exactly the committed steps, each
loading bit for bit.
"""

from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import crash_targets as T
import pytest
from harness import run_ranks

import shardckpt

ENV = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "60", "OMP_NUM_THREADS": "1",
       "SHARDCKPT_CHUNK_SIZE": "4K"}


@pytest.fixture(scope="module", autouse=True)
def _fast_ranks() -> Iterator[None]:
    with T.forked_ranks():
        yield


@pytest.mark.timeout(120)
def test_fault_on_one_rank_fails_the_save_on_every_rank(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    results = run_ranks(T.faults_on_one_rank, 2, str(root), timeout=100, env=ENV)
    cases = [name for name, *_ in T.FAULTS]
    committed = [1]
    for i, (name, bad_rank, _op, _match, err, _blocking) in enumerate(T.FAULTS):
        step = i + 2
        for rank in (0, 1):
            rec = results[rank][i]
            assert rec["case"] == name and rec["step"] == step
            where = f"{name}, rank {rank}"
            if rank == bad_rank:
                assert rec["fired"] >= 1, f"{where}: the fault was never reached"
            error = rec["error"]
            assert error is not None, f"{where}: the save did not fail"
            assert rec["shardckpt_error"], f"{where}: {error}"
            assert error.startswith(("CollectiveError", "StorageError")), f"{where}: {error}"
            assert os.strerror(getattr(errno, err)) in error, f"{where}: {error}"
            if error.startswith("CollectiveError"):
                assert f"rank {bad_rank}" in error, f"{where}: does not name the rank: {error}"
            assert rec["steps_after_failure"] == committed, f"{where}: committed anyway"
            assert rec["resaved"] == (step if rank == 0 else None), where
            assert rec["steps"] == [*committed, step], where
        committed.append(step)
    assert len(results[0]) == len(cases) + 1
    for rank in (0, 1):
        assert results[rank][-1] == {"loaded": committed[-1], "problems": []}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
            assert mgr.steps() == committed
            for step in committed:
                got = T.blank_state()
                assert mgr.load(got, step=step, restore_rng=False) == step
                assert T.state_problems(got, step) == []
    # Failed saves cleaned up after themselves: only committed step directories are left.
    assert sorted(p.name for p in root.glob("step-*")) == \
        [f"step-{s:010d}" for s in committed]
