"""A user trial (session 9): ``repair ROOT --replica REP`` summed up "N of N now healthy
everywhere" (exit 0) while steps that only the replica holds went unrestored, said only on
stderr. The summary line now says how many steps exist only at the replica, names them and the
command that restores one; ``--json`` lists them (``not_restored``) beside ``not_at_root``; the
exit code stays 0 (nothing is damaged, see docs/operations.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.cli.main import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def only_at_replica(tmp_path: Path) -> tuple[Path, Path]:
    """Steps 1-3 at ROOT ``a`` and replica ``b``; ROOT's retention then kept the newest one."""
    a, b = tmp_path / "a", tmp_path / "b"
    with shardckpt.CheckpointManager(str(a), replicas=[str(b)], async_save=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((16,), float(step))})
    with shardckpt.CheckpointManager(
            str(a), retention=shardckpt.RetentionPolicy(keep_last=1)) as mgr:
        assert list(mgr.prune().deleted) == [1, 2]
    return a, b


@pytest.mark.parametrize("dry_run", [False, True])
def test_the_summary_names_the_steps_only_the_replica_holds(
        only_at_replica: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
        dry_run: bool) -> None:
    a, b = only_at_replica
    code, out, err = run(capsys, "repair", str(a), "--replica", str(b),
                         *(["--dry-run"] if dry_run else []))
    assert code == 0  # nothing is damaged: the documented exit code of a healthy repair
    (line,) = out.splitlines()  # the summary: the last (here the only) line on stdout
    assert line.startswith("1 checkpoint checked: 1 ")
    assert "NOT RESTORED: 2 steps exist only at " + str(b) in line and "(1, 2)" in line
    assert ("would not be restored" if dry_run else "were not restored") in line
    assert f"`shardckpt repair {a} --replica {b} --step N` restores step N" in line
    assert "step 1: not at" in err and "step 2: not at" in err  # the per-step lines, as before


def test_json_lists_the_steps_not_restored_with_their_command(
        only_at_replica: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    a, b = only_at_replica
    code, out, _ = run(capsys, "repair", str(a), "--replica", str(b), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["ok"] is True and [s["step"] for s in doc["steps"]] == [3]
    assert doc["not_at_root"] == [{"step": 1, "locations": [str(b)]},
                                  {"step": 2, "locations": [str(b)]}]  # unchanged
    assert doc["not_restored"] == [
        {"step": s, "command": f"shardckpt repair {a} --replica {b} --step {s}"} for s in (1, 2)]
    assert "NOT RESTORED: 2 steps" in doc["summary"]
    # the command it names restores the step, and then nothing is left out
    code, _, _ = run(capsys, *doc["not_restored"][0]["command"].split()[1:])
    assert code == 0
    code, out, _ = run(capsys, "repair", str(a), "--replica", str(b), "--json")
    doc = json.loads(out)
    assert [s["step"] for s in doc["not_restored"]] == [2]
    assert "NOT RESTORED: 1 step exists only at" in doc["summary"] and "(2)" in doc["summary"]


def test_the_summary_is_unchanged_when_root_holds_every_step(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with shardckpt.CheckpointManager(str(a), replicas=[str(b)], async_save=False) as mgr:
        mgr.save(1, {"w": torch.ones(4)})
    code, out, _ = run(capsys, "repair", str(a), "--replica", str(b), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["not_restored"] == [] and doc["not_at_root"] == []
    assert doc["summary"] == ("1 checkpoint checked: 1 already healthy everywhere, 0 repaired, "
                              "0 still damaged; 1 of 1 now healthy everywhere")


def test_many_steps_only_at_a_replica_are_counted_and_abbreviated() -> None:
    from shardckpt.repair import summary

    left = {s: ["/r1"] if s % 2 else ["/r1", "/r2"] for s in range(1, 21)}
    line = summary([], False, left, "shardckpt repair /a --replica /r1 --replica /r2")
    assert ("NOT RESTORED: 20 steps exist only at /r1, /r2, not at ROOT (1, 2, 3, 4, 5, ..., "
            "16, 17, 18, 19, 20), and were not restored: `shardckpt repair /a --replica /r1 "
            "--replica /r2 --step N` restores step N") in line
