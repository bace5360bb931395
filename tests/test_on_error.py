"""``on_error`` (issue 24) and "a failed async save does not also cancel the next one" (issue 26):
a background save's failure costs that checkpoint only; under ``"warn"`` training goes on."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_ranks
from onerror_targets import three_failures_in_a_row
from torch import nn

import shardckpt
from shardckpt.engine import lazy
from shardckpt.engine import save as save_mod
from shardckpt.errors import ShardckptError, StorageError, TornSnapshotError


def state() -> dict[str, Any]:
    return {"w": torch.arange(1024, dtype=torch.float32)}


def fail_writes(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    real = save_mod.write_rank

    def write_rank(*args: Any, **kwargs: Any) -> Any:
        if kwargs["step"] in steps:
            raise OSError(28, f"injected: no space left on device (step {kwargs['step']})")
        return real(*args, **kwargs)

    monkeypatch.setattr(save_mod, "write_rank", write_rank)


def test_on_error_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_error"):
        shardckpt.CheckpointManager(str(tmp_path), on_error="ignore")


def test_a_failed_async_save_does_not_cancel_the_next_one(tmp_path: Path, monkeypatch) -> None:
    fail_writes(monkeypatch, {1})
    with shardckpt.CheckpointManager(str(tmp_path)) as mgr:  # on_error="raise"
        mgr.save(1, state())
        with pytest.raises(StorageError, match="no space left"):
            mgr.save(2, state())  # raised only once save 2 has started
        mgr.wait()
        assert mgr.steps() == [2]
        assert [s for s, _ in mgr.failed_saves] == [1]


def test_warn_goes_on_and_records_the_failure(tmp_path: Path, monkeypatch) -> None:
    fail_writes(monkeypatch, {1, 3})
    metrics = tmp_path / "metrics.prom"
    mgr = shardckpt.CheckpointManager(str(tmp_path / "root"), on_error="warn",
                                      metrics_path=str(metrics))
    h1 = mgr.save(1, state())
    with pytest.warns(UserWarning, match=r"step 1 failed.*no space left"):
        h2 = mgr.save(2, state())
    with pytest.raises(StorageError):
        h1.wait()  # the handle still raises
    h3 = mgr.save(3, state())
    assert h2.wait().step == 2
    with pytest.warns(UserWarning, match="step 3 failed"):
        mgr.wait()  # does not raise
    assert "shardckpt_save_failures_in_a_row{" in metrics.read_text()
    assert next(x for x in metrics.read_text().splitlines()
                if x.startswith("shardckpt_save_failures_in_a_row")).endswith(" 1")
    mgr.save(4, state())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mgr.close()  # nor does close
    with pytest.raises(StorageError):
        h3.wait()
    assert [s for s, _ in mgr.failed_saves] == [1, 3]
    assert all(isinstance(e, StorageError) for _, e in mgr.failed_saves)
    assert mgr.steps() == [2, 4]
    assert "shardckpt_save_failures_total{root=" in metrics.read_text()
    lines = metrics.read_text().splitlines()
    assert next(x for x in lines if x.startswith("shardckpt_save_failures_total")).endswith(" 2")
    assert next(x for x in lines if x.startswith("shardckpt_save_failures_in_a_row")).endswith(
        " 0")  # step 4 committed after step 3 failed


def test_warn_raises_after_max_failed_saves_in_a_row(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SHARDCKPT_MAX_FAILED_SAVES", "2")
    fail_writes(monkeypatch, {1, 2, 4, 5})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mgr = shardckpt.CheckpointManager(str(tmp_path), on_error="warn")
        mgr.save(1, state())
        mgr.save(2, state())
        with pytest.raises(ShardckptError, match=r"steps \[1, 2\]\) failed in a row"):
            mgr.save(3, state())
        mgr.save(3, state())  # the count starts again; a commit resets it
        mgr.save(4, state())
        mgr.save(5, state())
        with pytest.raises(ShardckptError, match=r"steps \[4, 5\]"):
            mgr.save(6, state())
        mgr.close()
    assert mgr.steps() == [3]


def test_blocking_saves_raise_under_warn(tmp_path: Path, monkeypatch) -> None:
    fail_writes(monkeypatch, {1})
    with shardckpt.CheckpointManager(str(tmp_path), on_error="warn") as mgr:
        with pytest.raises(StorageError):
            mgr.save(1, state(), blocking=True)
        with pytest.raises(TypeError):  # usage errors too
            mgr.save(2, {"x": object()})


def test_warn_with_a_tensor_changed_after_save(tmp_path: Path, monkeypatch) -> None:
    go = threading.Event()
    real = lazy.copy_cpu

    def held(job: lazy.CopyJob) -> None:
        assert go.wait(120)
        real(job)

    monkeypatch.setattr(lazy, "copy_cpu", held)
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    st = {"model": model, "optim": torch.optim.SGD(model.parameters(), lr=0.1)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mgr = shardckpt.CheckpointManager(str(tmp_path), snapshot="lazy", on_error="warn")
    with mgr:
        mgr.save(1, st)
        with torch.no_grad():
            model.weight.add_(1)  # in place, outside an optimizer step, before the copy
        go.set()
        with pytest.warns(UserWarning, match=r"step 1 failed.*TornSnapshotError"):
            mgr.save(2, st)
        mgr.save(3, st)
        mgr.wait()
        assert [s for s, _ in mgr.failed_saves] == [1]
        assert isinstance(mgr.failed_saves[0][1], TornSnapshotError)
        assert mgr.steps() == [2, 3]


def test_two_ranks_three_failures_in_a_row_then_both_raise(tmp_path: Path) -> None:
    results = run_ranks(three_failures_in_a_row, 2, str(tmp_path), timeout=240,
                        env={"OMP_NUM_THREADS": "1"})
    for rank, r in enumerate(results):
        assert r["failed"] == [1, 2, 3], (rank, r)
        assert r["causes"] == ["CollectiveError"] * 3, (rank, r)
        assert len(r["warned"]) == 3, (rank, r)
        assert r["error_type"] == "ShardckptError" and "failed in a row" in r["error"], (rank, r)
        assert r["steps"] == [5] or rank != 0, r  # steps() is read on every rank
    assert results[0]["steps"] == results[1]["steps"] == [5]
