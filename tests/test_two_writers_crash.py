"""The two-writer race in the crash suite (issue 26, item 1): job A is SIGKILLed (every rank
at once) at each phase of its save of the last step, while job B saves the same steps to the
same root. Whatever the interleaving:

* no step is acknowledged to both jobs, and every acknowledged step holds its job's values;
* every committed step holds one job's values, bit for bit (never a mix of the two);
* the root stays usable: a fresh job saves the next step, and ``shardckpt prune --grace 0``
  removes what the dead job left behind (its partial directory, its leases).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import crash_targets
import pytest
import two_writer_targets as T
from harness import RankFailures, run_ranks

import shardckpt
from shardckpt.cli.main import main as cli_main

STEPS = 4
ENV = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "30", "OMP_NUM_THREADS": "1",
       "SHARDCKPT_CHUNK_SIZE": "4K"}
PHASES = ("snapshot", "writing", "fsync", "commit", "committed")


@pytest.fixture(scope="module", autouse=True)
def _fast_ranks() -> Any:
    with crash_targets.forked_ranks():
        yield


def acked(log: Path) -> set[int]:
    return {int(line) for line in log.read_text().split()} if log.exists() else set()


@pytest.mark.parametrize("phase", PHASES)
def test_a_writer_killed_at_each_phase_while_another_writes_the_same_steps(
        tmp_path: Path, phase: str) -> None:
    root = str(tmp_path / "run")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    out: list[Any] = [None, None]

    def job(i: int) -> None:
        try:
            out[i] = run_ranks(T.save_every_step, 2, root, i + 1, STEPS, None,
                               phase if i == 0 else None, str(logs[i]), timeout=240,
                               env={**ENV, "SHARDCKPT_JOB_ID": f"job-{'AB'[i]}"})
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if isinstance(out[0], RankFailures):  # job A was killed at the phase ...
        assert "SIGKILL" in str(out[0])
    else:  # ... unless B had that step first: A's save was refused before reaching it
        assert "ConcurrentWriterError" in out[0][0]["errors"][str(STEPS - 1)]
    assert not isinstance(out[1], BaseException), out[1]  # job B ran to its end
    a, b = acked(logs[0]), acked(logs[1])
    assert b == set(out[1][0]["acked"])
    assert not a & b, f"acknowledged to both: {sorted(a & b)}"
    assert STEPS - 1 not in a  # A died during that save, or it was refused
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        committed = mgr.steps()
    assert a | b <= set(committed)
    for step in committed:
        got = T.load_full(root, step, 2)
        owner = 1 if step in a else 2 if step in b else got["seed"]
        assert T.holds(got, owner, step, 2), f"step {step} is not job {owner}'s, bit for bit"
    # the next job on this root: saves a new step, and prune reaps the dead job's leftovers
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(STEPS, T.job_state(3, STEPS, 0, 1))
        assert mgr.steps()[-1] == STEPS
    assert cli_main(["prune", root, "--grace", "0", "--keep-last", "100"]) == 0
    left = [p.name for p in Path(root).glob("step-*") if not (p / "manifest.json").exists()]
    assert left == []
    assert list((Path(root) / ".shardckpt" / "leases").glob("*.json")) == []
