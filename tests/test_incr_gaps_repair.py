"""Repair of a root of incremental saves with retired steps (issue 30, gaps of a user trial):
a replica that lacks a retired step gets its referenced files *and* its retired record, and
``repair --step R`` of a retired step checks only the files kept steps reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from incremental_cli_helpers import _small_chunks, cli  # noqa: F401 (an autouse fixture)
from incremental_helpers import load_step, lora_state

import shardckpt
from shardckpt.storage import step_dirname

RECORD = "step-0000000001.retired"


def pruned_pair(tmp_path: Path) -> tuple[str, str]:
    """ROOT a and replica b: steps 1..4 saved incrementally at both, pruned to the last one at
    both, so step 1 (which step 4 references) is retired at both."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with shardckpt.CheckpointManager(a, replicas=[b], async_save=False, incremental=True) as m:
        for s in (1, 2, 3, 4):
            m.save(s, lora_state(s))
    with shardckpt.CheckpointManager(a, replicas=[b], async_save=False,
                                     retention=shardckpt.RetentionPolicy(keep_last=1)) as m:
        assert m.prune().retired == (1,)
    for root in (a, b):
        assert (Path(root) / RECORD).exists()
    return a, b


def _listing(root: str) -> list[str]:
    return sorted(p.name for p in Path(root).iterdir() if not p.name.startswith((".", "audit")))


@pytest.mark.parametrize("lost", ["step", "record"])
def test_repair_writes_the_retired_record_at_a_replica_that_lacks_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], lost: str) -> None:
    a, b = pruned_pair(tmp_path)
    (Path(b) / RECORD).unlink()
    if lost == "step":  # the replica lost the retired step whole: step 4 there is damaged
        shutil.rmtree(Path(b) / step_dirname(1))
        code, out, _ = cli(capsys, "verify", b, "--step", "4", "--json")
        assert code == 2, out
    code, out, err = cli(capsys, "repair", a, "--replica", b, "--dry-run")
    assert code == 0, out + err
    assert f"write {b}/{RECORD}" in out, out
    assert _listing(b) == ([step_dirname(4)] if lost == "step"
                           else [step_dirname(1), step_dirname(4)])  # dry run: unchanged
    code, out, err = cli(capsys, "repair", a, "--replica", b)
    assert code == 0, out + err
    assert _listing(b) == _listing(a) == [step_dirname(1), RECORD, step_dirname(4)]
    assert sorted(p.name for p in (Path(b) / step_dirname(1)).iterdir()) == \
        sorted(p.name for p in (Path(a) / step_dirname(1)).iterdir())
    # the replica is a whole root: the retired step hidden, step 4 verifies and loads there
    code, out, err = cli(capsys, "ls", b, "--json")
    assert code == 0 and [r["step"] for r in json.loads(out)] == [4], out + err
    code, out, _ = cli(capsys, "verify", b, "--step", "4", "--json")
    assert code == 0, out
    load_step(b, 4, lora_state(4))
    code, out, err = cli(capsys, "repair", a, "--replica", b, "--json")  # nothing left to do
    doc = json.loads(out)
    assert code == 0 and all(s["healthy_before"] for s in doc["steps"]), out + err


def test_repair_step_of_a_retired_step_checks_only_the_referenced_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = pruned_pair(tmp_path)
    code, out, err = cli(capsys, "repair", a, "--replica", b, "--step", "1")
    assert code == 0, out + err
    assert "step 1 is retired" in out and "not missing" in out, out
    assert "CANNOT" not in err and "copy" not in out, out + err
    code, out, err = cli(capsys, "repair", a, "--replica", b, "--step", "1", "--json")
    (step,) = json.loads(out)["steps"]
    assert code == 0 and step["retired"] and step["healthy_before"] and step["ok"], out + err
    # a referenced file it lacks at the replica is copied back; the deleted ones are not
    shard = next((Path(b) / step_dirname(1)).glob("*.shard"))
    shard.unlink()
    code, out, err = cli(capsys, "repair", a, "--replica", b, "--step", "1")
    assert code == 0 and f"copy {b}/{step_dirname(1)}/{shard.name}" in out, out + err
    assert shard.exists()
    load_step(b, 4, lora_state(4))


def test_repair_step_of_a_retired_step_nothing_references(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = pruned_pair(tmp_path)
    with shardckpt.CheckpointManager(a, replicas=[b], async_save=False, incremental=True,
                                     full_every=1) as m:
        m.save(5, lora_state(5))  # full: step 1 is referenced by step 4 alone
    shutil.rmtree(Path(b) / step_dirname(1))
    for s in (4,):
        shutil.rmtree(Path(a) / step_dirname(s))
        shutil.rmtree(Path(b) / step_dirname(s))
    code, out, err = cli(capsys, "repair", a, "--replica", b, "--step", "1")
    assert code == 0 and "no kept step references it" in out, out + err
    assert not (Path(b) / step_dirname(1)).exists()  # not recreated where it is gone


def test_repair_onto_root_that_lost_a_retired_step_its_checkpoints_reference(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ROOT itself lacks the retired step (its directory and record): its kept step 4 needs
    it, so a repair without --step brings it back, retired."""
    a, b = pruned_pair(tmp_path)
    shutil.rmtree(Path(b) / step_dirname(1))
    (Path(b) / RECORD).unlink()
    code, out, err = cli(capsys, "repair", b, "--replica", a)
    assert code == 0, out + err
    assert _listing(b) == [step_dirname(1), RECORD, step_dirname(4)]
    code, out, _ = cli(capsys, "verify", b, "--step", "4", "--json")
    assert code == 0, out
