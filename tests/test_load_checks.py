"""Issue 25 item 4: loads check before they write (2 ranks, real gloo processes).

* Keys, shapes, dtypes and destinations are checked on every rank before any byte reaches the
  user's tensors: when one rank's state does not fit (an ``expand()``ed, stride-0 destination;
  a wrong shape), every rank raises, naming the key, and no rank's state has changed.
* An expanded tensor in ``save`` stores its values and loads into a plain tensor.
* A meta tensor in ``save`` raises on every rank, naming its key path; nothing is written.

The data errors found while reading (bad chunk, truncated shard) are in
tests/test_corrupt_newest.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import crash_targets
import load_check_targets as T
import pytest
import torch
from harness import run_ranks

import shardckpt
from shardckpt.engine.load import overlaps

ENV = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "30", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def _fast_ranks() -> Iterator[None]:
    with crash_targets.forked_ranks():
        yield


def test_destinations_are_checked_on_every_rank_before_any_byte_is_written(
        tmp_path: Path) -> None:
    results = run_ranks(T.destination_checks, 2, str(tmp_path / "ck"), timeout=120, env=ENV)
    for rank, got in enumerate(results):
        expand, shape = got["expand"], got["shape"]
        assert expand is not None and shape is not None, (rank, got)
        # every rank raises, naming the key; nothing of any rank's state was changed
        assert "model/bias" in expand["message"] and "overlap" in expand["message"], expand
        assert expand["changed"] == [], (rank, expand)
        assert "model/ids" in shape["message"] and "shape" in shape["message"], shape
        assert shape["changed"] == [], (rank, shape)
        # the expanded tensor saved its values, and loads into a plain tensor
        assert got["loaded"] == 1 and got["problems"] == [], got
        assert got["exp_equal"] and got["exp_strides"] == [4, 1], got
    assert results[0]["expand"]["collective"]  # the rank whose state was right: CollectiveError
    assert results[1]["expand"]["type"] == "ValueError"  # the rank at fault: its own error


def test_meta_tensor_in_save_raises_naming_its_key_path(tmp_path: Path) -> None:
    results = run_ranks(T.meta_save, 2, str(tmp_path / "ck"), timeout=120, env=ENV)
    for got in results:
        assert got["type"] is not None, got
        assert "opt/buf" in got["message"] and "meta tensor" in got["message"], got
        assert got["steps"] == []  # nothing was written


def test_expanded_tensor_round_trips_in_one_process(tmp_path: Path) -> None:
    with shardckpt.CheckpointManager(str(tmp_path / "ck")) as mgr:
        mgr.save(1, {"exp": T.expanded(3)}).wait()
        got = {"exp": torch.zeros(T.EXPANDED_ROWS, 4)}
        mgr.load(got)
    assert torch.equal(got["exp"], T.expanded(3)) and got["exp"].is_contiguous()


def test_scalar_values_wait_for_every_check(tmp_path: Path) -> None:
    """Values other than tensors (here a step counter) are put into the caller's dicts only
    once every key has been checked: a bad destination later in the state leaves them alone."""
    with shardckpt.CheckpointManager(str(tmp_path / "ck"), async_save=False) as mgr:
        mgr.save(1, {"progress": {"step": 7}, "z": torch.ones(4, 2)})
        state = {"progress": {"step": 0}, "z": torch.zeros(4, 1).expand(4, 2)}
        with pytest.raises(ValueError, match=r"z: .*overlap"):
            mgr.load(state)
    assert state["progress"] == {"step": 0}


@pytest.mark.parametrize(("shape", "stride", "want"), [
    ((4, 3), (3, 1), False), ((3, 4), (1, 3), False), ((4, 3), (1, 0), True),
    ((3, 2), (2, 3), False), ((3, 2), (1, 2), True), ((2, 2, 2), (4, 1, 2), False),
    ((1, 5), (0, 1), False)])
def test_overlap_detection(shape: tuple[int, ...], stride: tuple[int, ...], want: bool) -> None:
    t = torch.zeros(64).as_strided(shape, stride)
    assert overlaps(t) is want


def test_loading_into_meta_tensors_raises_naming_the_key(tmp_path: Path) -> None:
    """A model built on the meta device and never materialized (to_empty forgotten) is refused
    before anything is written, instead of a load that returns with nothing restored."""
    with shardckpt.CheckpointManager(str(tmp_path / "ck"), async_save=False) as mgr:
        model = torch.nn.Linear(4, 3)
        mgr.save(1, {"model": model, "progress": {"step": 5}, "t": torch.ones(3, 4)})
        with torch.device("meta"):
            lazy_model = torch.nn.Linear(4, 3)
        state = {"model": lazy_model, "progress": {"step": 0}}
        with pytest.raises(ValueError, match=r"model.*meta device"):
            mgr.load(state)
        assert state["progress"] == {"step": 0}  # nothing changed
        with pytest.raises(ValueError, match=r"t: .*meta device"):
            mgr.load({"t": torch.empty(3, 4, device="meta")})
        lazy_model.to_empty(device="cpu")
        assert mgr.load(state) == 1
        assert torch.equal(lazy_model.weight, model.weight) and state["progress"] == {"step": 5}
