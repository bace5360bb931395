"""Issue 25 item 1: retention never deletes because of a misspelt metric.

While no checkpoint carries ``keep_best``'s metric, retention deletes nothing (the manager's
background retention warns once), and ``mgr.prune()`` raises a ``ValueError`` naming the
metrics that exist. Once a checkpoint has it, the rules apply as documented.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.policy import RetentionPolicy
from shardckpt.prune import prune_location
from shardckpt.storage import open_location


def test_the_background_retention_deletes_nothing_and_warns_once(tmp_path: Path) -> None:
    policy = RetentionPolicy(keep_best=3, metric="val_loss", keep_last=1)  # the trial's mistake
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with shardckpt.CheckpointManager(str(tmp_path / "ck"), retention=policy) as mgr:
            for step in range(1, 11):
                mgr.save(step, {"w": torch.full((3,), float(step))},
                         metrics={"val": 1.0 / step}).wait()
            mgr.wait()
        steps = shardckpt.CheckpointManager(str(tmp_path / "ck")).steps()
    assert steps == list(range(1, 11))
    ours = [str(w.message) for w in caught if "val_loss" in str(w.message)]
    assert len(ours) == 1, ours
    assert "the metrics that exist: val" in ours[0] and "deleting nothing" in ours[0]


def test_mgr_prune_raises_a_value_error_naming_the_metrics(tmp_path: Path) -> None:
    policy = RetentionPolicy(keep_best=1, metric="accuracy", keep_last=1)
    with shardckpt.CheckpointManager(str(tmp_path / "ck"), async_save=False) as mgr:
        for step in range(1, 5):
            mgr.save(step, {"w": torch.zeros(2)}, metrics={"acc": step / 10, "loss": 1.0})
    with shardckpt.CheckpointManager(str(tmp_path / "ck"), retention=policy) as mgr:
        with pytest.raises(ValueError, match="the metrics that exist: acc, loss"):
            mgr.prune()
        assert mgr.steps() == [1, 2, 3, 4]


def test_prune_location_keeps_everything_while_no_checkpoint_has_it(tmp_path: Path) -> None:
    with shardckpt.CheckpointManager(str(tmp_path / "ck"), async_save=False) as mgr:
        for step in range(1, 4):
            mgr.save(step, {"w": torch.zeros(2)})  # before the first evaluation: no metrics
    policy = RetentionPolicy(keep_best=1, metric="val_loss_unique_1", keep_last=1)
    with pytest.warns(UserWarning, match="no checkpoint has any metric"):
        report = prune_location(open_location(str(tmp_path / "ck")), policy)
    assert report.deleted == () and sorted(report.kept) == [1, 2, 3]
    assert "no checkpoint has metric 'val_loss_unique_1'" in report.kept[1]


def test_once_one_checkpoint_has_it_the_rules_apply(tmp_path: Path) -> None:
    with shardckpt.CheckpointManager(str(tmp_path / "ck"), async_save=False) as mgr:
        for step in range(1, 4):
            mgr.save(step, {"w": torch.zeros(2)})  # no evaluation yet
        for step in range(4, 8):
            mgr.save(step, {"w": torch.zeros(2)}, metrics={"val_loss": float(10 - step)})
    policy = RetentionPolicy(keep_best=1, metric="val_loss", keep_last=1)
    with shardckpt.CheckpointManager(str(tmp_path / "ck"), retention=policy) as mgr:
        assert mgr.prune().deleted == (1, 2, 3, 4, 5, 6)
        assert mgr.steps() == [7]
