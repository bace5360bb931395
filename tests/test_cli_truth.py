"""Issue 25 items 6 and 9, issue 26 item 4 (ls/show): the CLI tells the truth about what it
looks at.

- ``ls`` exits 2 when a listed step has missing or wrong-size files, and the table names the
  location;
- ``ls``, ``show`` and ``prune`` on a path that is not a checkpoint root (a step directory, a
  folder of other files, a file) exit 2 with one line and write nothing there; a root that does
  not exist yet, or an empty folder, is a root with no checkpoints (``ls`` exit 0, ``show``
  exit 2 "no checkpoints yet"), and nothing is created;
- ``ls`` and ``show`` mark a degraded save (manifest ``"degraded": true``) without
  ``--replica``;
- a command whose reader goes away (``| head``) ends quietly with its own exit code, never 70.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.cli.main import main
from shardckpt.storage.local import LocalLocation


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def make_run(root: Path, steps: range = range(1, 4)) -> None:
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        for step in steps:
            mgr.save(step, {"w": torch.full((64,), float(step))}, metrics={"loss": 1.0 / step})


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``path`` with its size and mtime: to show that nothing was written."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.stat(full)
            out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns)
    return out


def shard_of(root: Path, step: int) -> Path:
    return next((root / f"step-{step:010d}").glob("*.shard"))


@pytest.mark.parametrize("damage", ["missing files", "wrong sizes"])
def test_ls_exits_2_on_a_damaged_step_and_names_the_location(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    root, replica = tmp_path / "a", tmp_path / "b"
    with shardckpt.CheckpointManager(str(root), replicas=[str(replica)],
                                     async_save=False) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": torch.full((64,), float(step))})
    victim = shard_of(replica, 2)
    if damage == "missing files":
        victim.unlink()
    else:
        with open(victim, "ab") as f:
            f.write(b"x")
    code, out, err = cli(capsys, "ls", str(root), "--replica", str(replica))
    assert code == 2, (out, err)
    assert f"{replica}: {damage}" in out  # in the table, under the step
    assert f"shardckpt ls: step 2: {replica}: {damage}" in err
    code, out, _ = cli(capsys, "ls", str(root), "--replica", str(replica), "--json")
    assert code == 2
    row = next(r for r in json.loads(out) if r["step"] == 2)
    assert row["health"] == "degraded" and row["problems"] == [f"{replica}: {damage}"]
    # the only location damaged: the step is damaged, still exit 2
    code, out, _ = cli(capsys, "ls", str(replica), "--json")
    assert code == 2 and next(r for r in json.loads(out) if r["step"] == 2)["health"] == \
        "damaged"


@pytest.mark.parametrize("damage", ["missing files", "wrong sizes"])
def test_show_exits_2_on_a_damaged_step_and_names_the_location(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    root = tmp_path / "ck"
    make_run(root)
    code, _, err = cli(capsys, "show", str(root), "--step", "2")
    assert code == 0 and err == ""
    victim = shard_of(root, 2)
    if damage == "missing files":
        victim.unlink()
    else:
        os.truncate(victim, victim.stat().st_size // 2)
    code, out, err = cli(capsys, "show", str(root), "--step", "2")
    assert code == 2, (out, err)
    assert f"DAMAGED: {root}: {damage}" in out
    assert f"shardckpt show: step 2: {root}: {damage}" in err
    code, out, _ = cli(capsys, "show", str(root), "--step", "2", "--json")
    assert code == 2 and json.loads(out)["damage"] == [f"{root}: {damage}"]
    assert cli(capsys, "show", str(root), "--step", "3")[0] == 0  # other steps are whole


def test_ls_of_a_healthy_root_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "ck")
    code, out, err = cli(capsys, "ls", str(tmp_path / "ck"))
    assert code == 0 and err == "" and len(out.splitlines()) == 4


@pytest.mark.parametrize("command", ["ls", "show", "prune"])
@pytest.mark.parametrize("what", ["step directory", "other files", "a file"])
def test_not_a_root_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               command: str, what: str) -> None:
    make_run(tmp_path / "ck")
    if what == "step directory":
        target = tmp_path / "ck" / "step-0000000002"
    elif what == "other files":
        target = tmp_path / "home"
        target.mkdir()
        (target / "notes.txt").write_text("mine")
        (target / "data").mkdir()
    else:
        target = tmp_path / "file.bin"
        target.write_bytes(b"123")
    before = snapshot(tmp_path)
    extra = ["--keep-last", "1"] if command == "prune" else []
    code, out, err = cli(capsys, command, str(target), *extra)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and str(target) in err
    assert "not a checkpoint root" in err or "is a step directory" in err
    assert snapshot(tmp_path) == before
    code, out, _ = cli(capsys, command, str(target), *extra, "--json")
    assert code == 2 and json.loads(out)["error"]["exit_code"] == 2
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("exists", [False, True])
def test_a_root_with_no_checkpoints_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        exists: bool) -> None:
    root = tmp_path / "run"
    if exists:
        root.mkdir()
    code, out, err = cli(capsys, "ls", str(root))
    assert code == 0 and err == ""
    assert out.strip() == f"{root}: no checkpoints yet (the root " \
        f"{'is empty' if exists else 'does not exist'})"
    code, out, _ = cli(capsys, "ls", str(root), "--json")
    assert code == 0 and json.loads(out) == []
    code, out, err = cli(capsys, "show", str(root))
    assert code == 2 and "no checkpoints yet" in err and len(err.strip().splitlines()) == 1
    assert root.exists() == exists
    assert not exists or list(root.iterdir()) == []  # nothing created


def _degraded_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root, replica = tmp_path / "a", tmp_path / "b"
    real = LocalLocation.open_sink

    def open_sink(self, relpath):  # the replica fails while step 2 is written
        if self.root == str(replica) and "step-0000000002" in relpath:
            raise OSError(5, "Input/output error (injected)")
        return real(self, relpath)

    with shardckpt.CheckpointManager(str(root), replicas=[str(replica)], min_replicas=1,
                                     async_save=False) as mgr:
        mgr.save(1, {"w": torch.ones(4)})
        monkeypatch.setattr(LocalLocation, "open_sink", open_sink)
        with pytest.warns(UserWarning, match="degraded"):
            mgr.save(2, {"w": torch.ones(4)})
    monkeypatch.undo()
    return root


def test_ls_and_show_mark_a_degraded_save_without_replica(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    root = _degraded_run(tmp_path, monkeypatch)
    code, out, err = cli(capsys, "ls", str(root), "--json")
    rows = {r["step"]: r for r in json.loads(out)}
    assert code == 0, err
    assert rows[1]["health"] == "ok" and rows[1]["degraded_save"] is False
    assert rows[2]["health"] == "degraded" and rows[2]["degraded_save"] is True
    assert f"only at {root}" in rows[2]["problems"][0]
    code, out, _ = cli(capsys, "ls", str(root))
    lines = out.splitlines()
    step2 = next(i for i, line in enumerate(lines) if line.split()[:1] == ["2"])
    assert " degraded " in lines[step2] and "degraded save" in lines[step2 + 1]
    code, out, _ = cli(capsys, "show", str(root), "--step", "2")
    assert code == 0 and "DEGRADED: degraded save" in out
    code, out, _ = cli(capsys, "show", str(root), "--step", "1")
    assert "DEGRADED" not in out


def test_a_repaired_degraded_save_is_no_longer_reported_degraded(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After `repair` fills the replica, `ls` with both locations says the step is whole
    (the manifest still records the degraded save: `degraded_save` stays true)."""
    root = _degraded_run(tmp_path, monkeypatch)
    replica = tmp_path / "b"
    code, out, _ = cli(capsys, "ls", str(root), "--replica", str(replica), "--json")
    assert {r["step"]: r["health"] for r in json.loads(out)}[2] == "degraded"
    assert cli(capsys, "repair", str(root), "--replica", str(replica))[0] == 0
    code, out, err = cli(capsys, "ls", str(root), "--replica", str(replica), "--json")
    row = {r["step"]: r for r in json.loads(out)}[2]
    assert code == 0, err
    assert row["health"] == "ok" and row["problems"] == [] and row["degraded_save"] is True


def test_a_closed_pipe_ends_quietly_with_the_commands_own_code(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        for step in (1, 2):  # 3000 tensors: far more output than a pipe holds
            mgr.save(step, {f"layer{i:04d}.weight_with_a_long_name": torch.full((2,), step * 1.0)
                            for i in range(3000)})
    argv = [sys.executable, "-m", "shardckpt", "diff", f"{root}@1", f"{root}@2"]
    whole = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert len(whole.stdout) > 150_000 and whole.returncode != 70
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()  # `| head -1`: read one line, then go away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == whole.returncode
    assert err == whole.stderr and "Traceback" not in err and "BrokenPipe" not in err
