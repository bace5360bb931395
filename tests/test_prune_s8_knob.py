"""SHARDCKPT_STREAM_COPY is a 0/1 switch, refused at manager construction when malformed
(issue 30 trial, item 4)."""

from __future__ import annotations

import pytest

import shardckpt
from shardckpt import knobs
from shardckpt.errors import ShardckptError


@pytest.mark.parametrize("raw, value", [("1", 1), ("0", 0), ("TRUE", 1), ("off", 0),
                                        (" Yes ", 1), ("no", 0), ("", 1)])
def test_stream_copy_switch_values(monkeypatch, raw, value):
    monkeypatch.setenv("SHARDCKPT_STREAM_COPY", raw)
    assert knobs.STREAM_COPY.get() == value


@pytest.mark.parametrize("raw", ["2", "yes please", "64M", "-1"])
def test_stream_copy_refused_at_construction(monkeypatch, tmp_path, raw):
    monkeypatch.setenv("SHARDCKPT_STREAM_COPY", raw)
    with pytest.raises(ShardckptError, match="SHARDCKPT_STREAM_COPY"):
        shardckpt.CheckpointManager(tmp_path / "root")
    assert not (tmp_path / "root").exists()
