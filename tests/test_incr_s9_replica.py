"""Issue 30, session 9 trial (F3): an incremental save never commits a step that a replica
cannot serve. A replica that lost a file the base step holds or references (or the referenced
step's manifest) makes the save full, with a warning naming the location and the file; the new
step then verifies and loads at that replica alone."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from incremental_helpers import assert_bit_equal, lora_state, zeros_like

import shardckpt
from shardckpt.storage import step_dirname


def build(tmp_path: Path) -> tuple[Path, Path]:
    root, rep = tmp_path / "root", tmp_path / "rep"
    with shardckpt.CheckpointManager(str(root), replicas=[str(rep)], async_save=False,
                                     incremental=True, capture_rng=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, lora_state(step))
    refs = json.loads((root / step_dirname(3) / "manifest.json").read_bytes())["references"]
    assert {r["step"] for r in refs} == {1}  # steps 2, 3 reference step 1's files
    return root, rep


def save_next(root: Path, rep: Path, step: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with shardckpt.CheckpointManager(str(root), replicas=[str(rep)], async_save=False,
                                         incremental=True, capture_rng=False) as mgr:
            mgr.save(step, lora_state(step))
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("damage", ["step", "file", "manifest"])
def test_a_replica_missing_what_the_base_references_gets_a_full_save(tmp_path: Path,
                                                                     damage: str) -> None:
    root, rep = build(tmp_path)
    lost = rep / step_dirname(1)
    if damage == "step":
        shutil.rmtree(lost)
    elif damage == "file":
        next(lost.glob("*.shard")).unlink()
    else:
        (lost / "manifest.json").unlink()
    said = save_next(root, rep, 4)
    assert any(str(rep) in m and step_dirname(1) in m and "writing in full" in m
               for m in said), said
    for where in (root, rep):
        doc = json.loads((where / step_dirname(4) / "manifest.json").read_bytes())
        assert not doc.get("references")  # full: readable wherever it was committed
        with shardckpt.CheckpointManager(str(where), capture_rng=False) as alone:
            got = zeros_like(lora_state(4))
            assert alone.load(got, step=4) == 4
            assert_bit_equal(got, lora_state(4))


def test_a_replica_holding_everything_keeps_incremental_saves(tmp_path: Path) -> None:
    root, rep = build(tmp_path)
    said = save_next(root, rep, 4)
    assert not [m for m in said if "writing in full" in m], said
    doc = json.loads((rep / step_dirname(4) / "manifest.json").read_bytes())
    assert {r["step"] for r in doc["references"]} == {1}
