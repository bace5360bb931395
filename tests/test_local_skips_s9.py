"""A user trial (session 8, left for session 9): with ``local_every=1`` and async saves, a local
save skipped because the previous one still runs was warned about at every step, which is
noise with millisecond steps. Now the 1st, 10th, 100th... skip is warned about, every skip is
still counted (``skipped``), and ``close`` logs how many were skipped (rank 0)."""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import shardckpt


def test_skipped_local_saves_warn_rarely_and_are_summed_up_at_close(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.warns(UserWarning, match="single node"):
        mgr = shardckpt.CheckpointManager(
            str(tmp_path / "p"), async_save=True, capture_rng=False,
            local=shardckpt.LocalTier(str(tmp_path / "{node}"), every=1, copies=1, keep=1,
                                      node="solo"))
    runner = mgr._local
    release, started = threading.Event(), threading.Event()
    save = runner.store.save

    def held(*args: Any, **kwargs: Any) -> Any:  # the first local save runs until released
        started.set()
        assert release.wait(60)
        return save(*args, **kwargs)

    runner.store.save = held
    state = {"w": torch.ones(8)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr.save(1, state)
        assert started.wait(60)
        for step in range(2, 27):  # 25 local saves due while step 1's still runs
            assert mgr.save(step, state) is None
    skips = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert runner.skipped == list(range(2, 27))
    assert len(skips) == 2  # the 1st and the 10th, not 25
    assert skips[0].startswith("local save of step 2 skipped: the previous local save is "
                               "still running (1 skipped so far; warned again at the 10th")
    assert skips[1].startswith("local save of step 11 skipped") and "10 skipped so far" in skips[1]
    release.set()
    with caplog.at_level(logging.WARNING, logger="shardckpt.tier"):
        mgr.close()
    (record,) = [r for r in caplog.records if r.name == "shardckpt.tier"]
    assert "25 local save(s) skipped in this run" in record.getMessage()
    assert "steps 2, 3, 4, ..., 24, 25, 26" in record.getMessage()
    assert mgr.steps(tier="local") == [1]
