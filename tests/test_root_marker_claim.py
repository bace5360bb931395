"""A process killed while it created a root's marker leaves its claim behind: the next save
clears it (with a warning) instead of failing forever."""

import json
import os

import pytest
import torch

import shardckpt
from shardckpt.storage import marker
from shardckpt.storage.records import claim_path


def _leave_a_dead_claim(root):
    claim = root / claim_path(marker.MARKER)
    claim.parent.mkdir(parents=True)
    claim.write_bytes(b"")  # what an O_EXCL create leaves when its process is killed next


def test_a_claim_left_by_a_killed_creator_is_cleared_and_the_first_save_commits(tmp_path,
                                                                               monkeypatch):
    monkeypatch.setattr(marker, "_RIVAL_WAIT_S", 0.3)
    root = tmp_path / "run"
    _leave_a_dead_claim(root)
    state = {"w": torch.arange(6.0)}
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        with pytest.warns(UserWarning, match="claim on the root marker was left"):
            mgr.save(1, state)
        assert mgr.steps() == [1]
    doc = json.loads((root / marker.MARKER).read_text())
    assert doc["format"] == marker.MARKER_FORMAT
    assert not (root / claim_path(marker.MARKER)).exists()


def test_a_marker_that_lands_while_waiting_is_adopted_not_overwritten(tmp_path, monkeypatch):
    root = tmp_path / "run"
    _leave_a_dead_claim(root)
    loc = shardckpt.storage.open_location(str(root))
    reads = []
    real = marker.read_marker

    def rival_lands(location):  # the rival's rename lands after our first look
        reads.append(1)
        if len(reads) == 2:
            (root / marker.MARKER).write_bytes(marker._marker_bytes("rival"))
        return real(location)

    monkeypatch.setattr(marker, "read_marker", rival_lands)
    assert marker.write_marker(loc) == "rival"
    assert os.path.exists(root / claim_path(marker.MARKER))  # not ours to clear
