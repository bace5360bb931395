"""The multi-process test harness itself: results, failures, timeouts, torchrun."""

from __future__ import annotations

import socket
import textwrap
from pathlib import Path

import _harness_targets as targets
import psutil
import pytest
from harness import RankFailures, RankTimeout, free_port, run_ranks, run_torchrun

HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _live_descendants() -> set[int]:
    """Pids of live (non-zombie) descendants of this process, minus multiprocessing helpers
    (the resource tracker, the fork server ``run_ranks`` starts ranks from; not its ranks)."""
    live = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if any(h in part for part in proc.cmdline() for h in HELPERS):
                continue
        except psutil.NoSuchProcess:
            continue
        live.add(proc.pid)
    return live


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.parametrize("world_size", [2, 3])
def test_all_reduce_results_in_rank_order(world_size: int) -> None:
    results = run_ranks(
        targets.all_reduce_sum, world_size, 10, timeout=60, env={"HARNESS_EXTRA": "x"}
    )
    expected_sum = float(sum(10 + r for r in range(world_size)))
    assert results == [
        {
            "rank": r,
            "dist_rank": r,
            "world_size": world_size,
            "env_rank": str(r),
            "extra": "x",
            "sum": expected_sum,
        }
        for r in range(world_size)
    ]


@pytest.mark.parametrize("method", ["forkserver",
                                    pytest.param("spawn", marks=pytest.mark.spawn_ranks)])
def test_ranks_get_this_processes_environment_at_the_call(
        method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also a forked rank, whose fork server started long before with another environment."""
    if method == "forkserver":
        run_ranks(targets.all_reduce_sum, 2, 0, timeout=120)  # the fork server is up by now
    monkeypatch.setenv("HARNESS_EXTRA", f"set later, {method}")
    results = run_ranks(targets.all_reduce_sum, 2, 10, timeout=120)
    assert [r["extra"] for r in results] == [f"set later, {method}"] * 2
    assert [r["sum"] for r in results] == [21.0, 21.0]


def test_exception_on_rank_1_is_reported() -> None:
    with pytest.raises(RankFailures) as info:
        run_ranks(targets.raise_on_rank_1, 2, timeout=60)
    assert info.value.failures == {1: "ValueError: boom from rank 1"}
    message = str(info.value)
    assert "rank 1: ValueError: boom from rank 1" in message
    assert "Traceback" in message and "raise_on_rank_1" in message
    assert "rank 0:" not in message


def test_hanging_rank_times_out_and_nothing_survives(tmp_path: Path) -> None:
    before = _live_descendants()
    with pytest.raises(RankTimeout) as info:
        run_ranks(targets.hang_on_rank_1, 2, str(tmp_path), timeout=10,
                  timeout_from=(tmp_path / "pids").exists)  # rank 1 is hanging: 10 s from then
    assert info.value.unfinished == [0, 1]
    assert info.value.finished == []
    assert "ranks [0, 1] did not finish within 10 s" in str(info.value)
    grandchildren = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert not [pid for pid in grandchildren if _alive(pid)]
    assert _live_descendants() <= before


def test_os_exit_is_reported_with_exit_code() -> None:
    with pytest.raises(RankFailures) as info:
        run_ranks(targets.exit_3_on_rank_1, 2, timeout=60)
    assert info.value.failures[1] == "ProcessDied: exited with code 3 without reporting a result"
    assert "rank 1: ProcessDied: exited with code 3" in str(info.value)
    assert 0 not in info.value.failures


def test_result_must_be_json() -> None:
    with pytest.raises(RankFailures, match="not JSON-serialisable") as info:
        run_ranks(targets.not_json, 1, timeout=60, init_pg=False)
    assert info.value.failures[0].startswith("TypeError: ")


def test_run_torchrun_prints_each_rank(tmp_path: Path) -> None:
    script = tmp_path / "print_rank.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            line = (f"rank={os.environ['RANK']} of {os.environ['WORLD_SIZE']} "
                    f"addr={os.environ['MASTER_ADDR']} arg={sys.argv[1]}\\n")
            os.write(1, line.encode())  # one write: atomic on a pipe, never interleaved
            """
        )
    )
    done = run_torchrun(script, 2, args=["hello"], timeout=60)
    assert done.returncode == 0, done.stderr
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("rank="))
    assert lines == [
        "rank=0 of 2 addr=127.0.0.1 arg=hello",
        "rank=1 of 2 addr=127.0.0.1 arg=hello",
    ]


def test_run_torchrun_timeout_kills_the_job(tmp_path: Path) -> None:
    script = tmp_path / "hang.py"
    started = tmp_path / "started"
    script.write_text(
        "import os, sys, threading\nprint(os.getpid(), flush=True)\n"
        "open(sys.argv[1], 'w').close()\nthreading.Event().wait()\n"
    )
    before = _live_descendants()
    with pytest.raises(RankTimeout) as info:  # 6 s from the moment the worker runs
        run_torchrun(script, 1, args=[str(started)], timeout=6, timeout_from=started.exists)
    assert info.value.unfinished == [0]
    assert _live_descendants() <= before
    pids = [int(w) for w in info.value.stdout.split() if w.isdigit()]
    assert pids, info.value.stdout
    assert not [pid for pid in pids if _alive(pid)]
