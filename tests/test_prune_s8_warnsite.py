"""Warnings from a save's commit and from retention name the user's code, not shardckpt's
(issue 30 trial, item 3; shardckpt/warnsite.py)."""

from __future__ import annotations

import os
import threading
import warnings

import torch

import shardckpt
import shardckpt.prune as P

PACKAGE = os.path.dirname(shardckpt.__file__)


def test_missed_checkpoint_warning_names_the_callers_save(tmp_path):
    rep = tmp_path / "rep"
    rep.write_text("not a folder\n")  # the replica cannot take the checkpoint
    mgr = shardckpt.CheckpointManager(tmp_path / "root", replicas=[rep], min_replicas=1,
                                      async_save=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr.save(1, {"w": torch.zeros(4)})
        mgr.close()
    missed = [w for w in caught if "missed this checkpoint" in str(w.message)]
    assert missed, [str(w.message) for w in caught]
    assert missed[0].filename == __file__
    assert not missed[0].filename.startswith(PACKAGE)


def test_unknown_metric_warning_names_the_caller(tmp_path):
    root = tmp_path / "root"
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(1, {"w": torch.zeros(4)})
        policy = shardckpt.RetentionPolicy(keep_best=1, metric="s8-no-such-metric")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            P.prune_location(mgr.location, policy)
    assert [w.filename for w in caught] == [__file__]


def test_warning_on_a_library_thread_without_any_user_call(monkeypatch):
    import shardckpt.warnsite as W
    from shardckpt.errors import StorageError
    from shardckpt.prune_background import BackgroundPrune

    monkeypatch.setattr(W, "_last", None)

    def run() -> None:
        raise StorageError("s8: store down")

    runner = BackgroundPrune(run, name="s8-retention")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asker = threading.Thread(target=runner.request)  # no user frame on either thread
        asker.start()
        asker.join()
        runner.close()
    assert caught and caught[0].filename.startswith("<shardckpt thread s8-retention")
