"""The metrics textfile counts background retention failures (session 9):
``shardckpt_retention_failures_total``, a counter labelled by root like the other families,
present from the manager's start (at this process's count, 0 in a fresh process), rewritten as
soon as a background prune fails, not only at the next save."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_observability import parse_prometheus, value_of

import shardckpt
import shardckpt.prune as P
from shardckpt.errors import StorageError
from shardckpt.prune_background import BackgroundPrune, retention_failures

NAME = "shardckpt_retention_failures_total"


def counter(prom: Path, root: str) -> float:
    """The family's one sample, after checking its TYPE, HELP and labels."""
    fam = parse_prometheus(prom.read_text())[NAME]
    assert fam["type"] == "counter" and "background retention" in fam["help"]
    assert [labels for labels, _ in fam["samples"]] == [{"root": root}]
    return value_of({NAME: fam}, NAME)


def _steps(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


def test_a_failed_background_prune_is_counted_in_the_textfile_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every prune of the replica fails (the root's succeeds): each failure adds 1, and the
    file shows it once the prune has failed, before any later save rewrites it."""
    root, rep, prom = tmp_path / "root", tmp_path / "rep", tmp_path / "train.prom"
    real = P._prune

    def replica_down(location, *a, **k):  # type: ignore[no-untyped-def]
        if location.display.rstrip("/") == str(rep):
            raise StorageError(f"{location.display}: injected outage")
        return real(location, *a, **k)

    monkeypatch.setattr(P, "_prune", replica_down)
    before = retention_failures()
    state = {"w": torch.zeros(8)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with shardckpt.CheckpointManager(root, replicas=[rep], async_save=False,
                                         retention=shardckpt.RetentionPolicy(keep_last=1),
                                         metrics_path=prom) as mgr:
            label = mgr.location.display
            assert counter(prom, label) == before  # present from the start
            runner = mgr._retention_runner
            mgr.save(1, state)
            runner.close()  # the prune that save 1 requested has failed at the replica
            assert counter(prom, label) == before + 1
            state["w"] += 1
            mgr.save(2, state)
            runner.close()
            assert counter(prom, label) == before + 2
    assert counter(prom, label) == retention_failures() == before + 2
    assert _steps(root) == ["step-0000000002"]  # the root was pruned all the same
    failed = [str(w.message) for w in caught if "background retention failed" in str(w.message)]
    assert len(failed) == 1 and "injected outage" in failed[0], failed  # one cause, warned once


def test_successful_retention_leaves_the_counter_as_it_was(tmp_path: Path) -> None:
    root, prom = tmp_path / "root", tmp_path / "train.prom"
    before = retention_failures()
    with shardckpt.CheckpointManager(root, async_save=False, metrics_path=prom,
                                     retention=shardckpt.RetentionPolicy(keep_last=1)) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((8,), float(step))})
    assert _steps(root) == ["step-0000000003"]
    assert counter(prom, mgr.location.display) == before == retention_failures()


def test_a_fresh_process_shows_the_counter_at_zero(tmp_path: Path) -> None:
    """Like the other counters, present at 0 before anything failed (no ``absent()`` needed)."""
    prom = tmp_path / "m.prom"
    code = ("import sys; from shardckpt.observe import SaveObserver; "
            "SaveObserver(enabled=True, root='r', world_size=1, metrics_path=sys.argv[1])"
            ".publish()")
    subprocess.run([sys.executable, "-c", code, str(prom)], check=True, timeout=120)
    assert counter(prom, "r") == 0


def test_on_failure_runs_after_a_failed_run_only_and_cannot_stop_later_runs() -> None:
    outcomes: list[Exception | None] = [StorageError("a: down"), None, StorageError("a: full")]
    calls: list[int] = []

    def run() -> None:
        exc = outcomes.pop(0)
        if exc is not None:
            raise exc

    def hook() -> None:
        calls.append(retention_failures())
        raise RuntimeError("a broken hook")

    before = retention_failures()
    runner = BackgroundPrune(run, on_failure=hook)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            runner.request()
            assert runner.close()
    assert outcomes == [] and runner.failures == 2
    assert calls == [before + 1, before + 2]  # after the count, once per failed run
