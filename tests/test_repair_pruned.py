"""Issue 26 item 5: ``repair ROOT --replica R`` never brings back a step that ROOT's retention
deleted. It restores the files of the steps ROOT holds; a step found only at a replica is
reported and left alone unless ``--step N`` asks for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.cli.main import main
from shardckpt.repair import repair, steps_to_repair
from shardckpt.storage import open_location


def state_for(step: int) -> dict[str, object]:
    return {"w": torch.full((64, 8), float(step)), "step": step}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def pruned_at_root(tmp_path: Path) -> tuple[Path, Path]:
    """Steps 1-4 at ROOT ``a`` and replica ``b``; ROOT's retention then kept the newest 2 while
    ``b`` (down, or pruned on its own schedule) kept them all; and a shard of step 4 lost at
    ROOT: real damage."""
    a, b = tmp_path / "a", tmp_path / "b"
    with shardckpt.CheckpointManager(str(a), replicas=[str(b)], async_save=False) as mgr:
        for step in range(1, 5):
            mgr.save(step, state_for(step))
    with shardckpt.CheckpointManager(
            str(a), retention=shardckpt.RetentionPolicy(keep_last=2)) as mgr:
        assert list(mgr.prune().deleted) == [1, 2]
    assert sorted(p.name for p in b.iterdir() if p.name.startswith("step-"))[:2] == [
        "step-0000000001", "step-0000000002"]
    next((a / "step-0000000004").glob("*.shard")).unlink()
    return a, b


def steps_at(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step-"))


def test_repair_does_not_bring_back_pruned_steps(pruned_at_root: tuple[Path, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    a, b = pruned_at_root
    code, out, _ = run(capsys, "repair", str(a), "--replica", str(b), "--json")
    assert code == 0
    doc = json.loads(out)
    assert [s["step"] for s in doc["steps"]] == [3, 4]
    assert [s["step"] for s in doc["steps"] if s["repaired"]] == [4]  # the damage is healed
    assert doc["not_at_root"] == [{"step": 1, "locations": [str(b)]},
                                  {"step": 2, "locations": [str(b)]}]
    assert steps_at(a) == [3, 4]
    assert shardckpt.CheckpointManager(str(a)).steps() == [3, 4]
    # the text form says so, on stderr, and how to get one back
    code, out, err = run(capsys, "repair", str(a), "--replica", str(b), "--dry-run")
    assert code == 0 and "step 1: not at" in err and "repair --step 1 restores it" in err
    assert out.startswith("2 checkpoints checked: 2 healthy")  # step 4 was healed above


def test_repair_step_n_restores_a_pruned_step_on_request(
        pruned_at_root: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    a, b = pruned_at_root
    code, out, _ = run(capsys, "repair", str(a), "--replica", str(b), "--step", "1", "--json")
    assert code == 0
    assert [s["step"] for s in json.loads(out)["steps"]] == [1]
    assert steps_at(a) == [1, 3, 4]
    got = {"w": torch.zeros(64, 8), "step": 0}
    shardckpt.CheckpointManager(str(a)).load(got, step=1)
    assert torch.equal(got["w"], state_for(1)["w"])


def test_python_repair_follows_root(pruned_at_root: tuple[Path, Path]) -> None:
    a, b = pruned_at_root
    locs = [open_location(str(a)), open_location(str(b))]
    steps, left = steps_to_repair(locs)
    assert steps == [3, 4] and list(left) == [1, 2]
    assert [r.step for r in repair(locs)] == [3, 4]
    assert steps_at(a) == [3, 4]
    # the other way round, b is ROOT: it holds every step, a's missing ones are copied to a
    assert [r.step for r in repair(locs[::-1])] == [1, 2, 3, 4]
    assert steps_at(a) == [1, 2, 3, 4]
