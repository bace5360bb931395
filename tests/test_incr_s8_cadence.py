"""``full_every`` counts saves along the chain of bases, as each commit records it: pruning the
steps in between (``keep_last=1``, in the job or from cron) neither delays nor hastens the next
full save."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from incremental_helpers import load_step, lora_state

import shardckpt
from shardckpt.storage import step_dirname

CHUNK = 64 << 10


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDCKPT_FSYNC", "0")
    monkeypatch.setenv("SHARDCKPT_CHUNK_SIZE", str(CHUNK))


def test_full_every_holds_while_keep_last_1_prunes_between_saves(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    full = []
    keep1 = shardckpt.RetentionPolicy(keep_last=1)
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True,
                                     full_every=3, retention=keep1) as mgr:
        for step in range(1, 11):
            info = mgr.save(step, lora_state(step)).wait()
            assert isinstance(info, shardckpt.CheckpointInfo)
            if not info.depends_on:
                full.append(step)
            mgr.prune()
    assert full == [1, 4, 7, 10]
    load_step(root, 10, lora_state(10))


def test_the_count_is_recorded_in_each_manifest_and_survives_a_restart(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    counts: dict[int, object] = {}
    for steps in ([1, 2], [3, 4, 5]):  # a restart between step 2 and step 3
        with shardckpt.CheckpointManager(root, async_save=False, incremental=True,
                                         full_every=4,
                                         retention=shardckpt.RetentionPolicy(keep_last=1)) as mgr:
            for step in steps:
                mgr.save(step, lora_state(step)).wait()
                path = Path(root) / step_dirname(step) / "manifest.json"
                counts[step] = json.loads(path.read_text()).get("saves_since_full")
                mgr.prune()
    assert counts == {1: None, 2: 1, 3: 2, 4: 3, 5: None}  # step 5: the 4th save after 1, full
