"""Issue 15 item 10: ``keep_best`` by a metric that no checkpoint has is never silent.

Before, ``shardckpt prune --keep-best N --metric NAME`` with a misspelt NAME was accepted, and
the best-N rule then kept nothing. Now the CLI exits 64 naming the metric and the metrics that
exist, before anything is deleted; a :class:`RetentionPolicy` used from Python (the manager's
retention, ``prune_location``) warns, once per policy, and deletes nothing (issue 25 item 1);
``mgr.prune()`` raises ``ValueError``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.cli.main import main
from shardckpt.policy import CheckpointRecord, RetentionPolicy, missing_metric
from shardckpt.prune import UnknownMetricError, prune_location
from shardckpt.storage import open_location


def make_run(root: Path, steps: range, metrics: bool = True) -> None:
    with shardckpt.CheckpointManager(str(root)) as mgr:
        for step in steps:
            mgr.save(step, {"w": torch.full((4,), float(step))},
                     metrics={"loss": 1.0 / step, "acc": step / 10} if metrics else None)


def test_missing_metric_is_a_pure_check() -> None:
    records = [CheckpointRecord(1, 0.0, {"loss": 1.0}), CheckpointRecord(2, 1.0, {"acc": 0.5})]
    policy = RetentionPolicy(keep_best=2, metric="lss")
    text = missing_metric(policy, records)
    assert text is not None
    assert "metric 'lss': no checkpoint has it, so keep_best=2 keeps nothing" in text
    assert "the metrics that exist: acc, loss" in text
    assert missing_metric(RetentionPolicy(keep_best=2, metric="acc"), records) is None
    assert missing_metric(RetentionPolicy(keep_last=2), records) is None
    assert missing_metric(policy, []) is None  # nothing to rank yet: nothing to say
    bare = missing_metric(policy, [CheckpointRecord(1, 0.0)])
    assert bare is not None and "no checkpoint has any metric" in bare


@pytest.mark.parametrize("dry_run", [False, True])
def test_cli_exits_64_naming_the_metric_and_deletes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], dry_run: bool) -> None:
    root = tmp_path / "ck"
    make_run(root, range(1, 6))
    argv = ["prune", str(root), "--keep-best", "2", "--metric", "lss", "--keep-last", "1"]
    assert main(argv + (["--dry-run"] if dry_run else [])) == 64
    err = capsys.readouterr().err
    assert "shardckpt prune: --metric: " in err
    assert "metric 'lss': no checkpoint has it" in err and "the metrics that exist: acc, loss" \
        in err, err
    assert shardckpt.CheckpointManager(str(root)).steps() == [1, 2, 3, 4, 5]
    # the right name prunes
    assert main(["prune", str(root), "--keep-best", "2", "--metric", "loss", "--keep-last",
                 "1"]) == 0
    assert shardckpt.CheckpointManager(str(root)).steps() == [4, 5]


def test_cli_json_error_for_an_unknown_metric(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "ck"
    make_run(root, range(1, 3), metrics=False)
    assert main(["prune", str(root), "--keep-best", "1", "--metric", "loss", "--json"]) == 64
    doc = json.loads(capsys.readouterr().out)
    assert doc["error"]["exit_code"] == 64
    assert "no checkpoint has any metric" in doc["error"]["message"]


def test_prune_location_raises_or_warns(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    make_run(root, range(1, 4))
    loc = open_location(str(root))
    policy = RetentionPolicy(keep_best=1, metric="accuracy", keep_last=1)
    with pytest.raises(UnknownMetricError, match="the metrics that exist: acc, loss"):
        prune_location(loc, policy, unknown_metric="raise")
    assert shardckpt.CheckpointManager(str(root)).steps() == [1, 2, 3]
    with pytest.warns(UserWarning, match="metric 'accuracy': no checkpoint has it"):
        report = prune_location(loc, policy, dry_run=True)
    assert report.deleted == ()  # issue 25 item 1: a misspelt metric deletes nothing


def test_manager_retention_warns_once(tmp_path: Path) -> None:
    policy = RetentionPolicy(keep_best=2, metric="val_loss", keep_last=2)  # unique to this test
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # so the "once" below is ours, not the filter's
        with shardckpt.CheckpointManager(str(tmp_path / "ck"), retention=policy) as mgr:
            for step in range(1, 5):
                mgr.save(step, {"w": torch.zeros(3)}, metrics={"loss": float(step)}).wait()
            with pytest.raises(ValueError, match="metric 'val_loss'"):
                mgr.prune()
            assert mgr.steps() == [1, 2, 3, 4]  # issue 25 item 1: nothing deleted
    ours = [str(w.message) for w in caught if "val_loss" in str(w.message)]
    assert len(ours) == 1, ours
    assert "retention: " in ours[0] and "metric 'val_loss': no checkpoint has it" in ours[0]
    assert "the metrics that exist: loss" in ours[0]


def test_mgr_prune_raises(tmp_path: Path) -> None:
    make_run(tmp_path / "ck", range(1, 4))
    policy = RetentionPolicy(keep_best=1, metric="top1", keep_last=1)  # unique to this test
    with shardckpt.CheckpointManager(str(tmp_path / "ck"), retention=policy) as mgr, \
            pytest.raises(ValueError, match="metric 'top1': no checkpoint has it"):
        mgr.prune()  # issue 25 item 1: a ValueError naming the metrics, nothing deleted
    assert shardckpt.CheckpointManager(str(tmp_path / "ck")).steps() == [1, 2, 3]
