"""Issue 15 item 9: ``bash launch/demo.sh ROOT`` never deletes a user's files.

The demo clears its folder before training. It now refuses a non-empty folder that it did not
create (a folder it creates holds the marker ``.shardckpt-demo``), before any setup or training,
with exit code 64 and a message naming the folder. The refusals run the real script in the
repository (it stops before ``launch/setup.sh``); the accepted cases run a copy of it next to a
stand-in ``setup.sh``, ``torchrun`` and ``shardckpt`` that only record their calls.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "launch" / "demo.sh"
MARKER = ".shardckpt-demo"


def run_demo(script: Path, root: str | None, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC",)}
    args = ["bash", str(script)] + ([root] if root is not None else [])
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def user_files(folder: Path) -> dict[str, bytes]:
    (folder / "notes").mkdir(parents=True)
    (folder / "thesis.tex").write_bytes(b"\\section{Do not delete}")
    (folder / "notes" / "todo.txt").write_bytes(b"buy milk")
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*") if p.is_file()}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def fake_repo(tmp_path: Path) -> Path:
    """A copy of launch/demo.sh in a tree whose setup.sh, torchrun and shardckpt log calls."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    (repo / ".venv" / "bin").mkdir(parents=True)
    shutil.copy2(DEMO, repo / "launch" / "demo.sh")
    log = repo / "calls.log"
    (repo / "launch" / "setup.sh").write_text(f'echo "setup" >> "{log}"\n')
    for tool in ("torchrun", "shardckpt"):
        path = repo / ".venv" / "bin" / tool
        path.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return repo


def calls(repo: Path) -> list[str]:
    log = repo / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_refuses_a_non_empty_folder_it_did_not_create(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    before = user_files(mine)
    done = run_demo(DEMO, str(mine), tmp_path)  # the real script: refused before any setup
    assert done.returncode == 64, done.stderr
    assert f"refusing to use {mine}: it is not empty and the demo did not create it" \
        in done.stderr, done.stderr
    assert "Nothing was changed" in done.stderr
    assert snapshot(mine) == before
    assert not (mine / MARKER).exists()


def test_refuses_a_relative_folder_of_the_callers(tmp_path: Path) -> None:
    # a relative ROOT means the caller's folder, not one under the repository
    before = user_files(tmp_path / "work" / "ckpt")
    done = run_demo(DEMO, "ckpt", tmp_path / "work")
    assert done.returncode == 64, done.stderr
    assert f"refusing to use {tmp_path / 'work' / 'ckpt'}:" in done.stderr, done.stderr
    assert snapshot(tmp_path / "work" / "ckpt") == before


@pytest.mark.parametrize("kind", ["file", "symlink", "url"])
def test_refuses_what_is_not_a_local_folder(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "target"
    user_files(target)
    if kind == "file":
        root = tmp_path / "a-file"
        root.write_text("keep me")
    elif kind == "symlink":
        root = tmp_path / "link"
        root.symlink_to(target)
    done = run_demo(DEMO, "memory://demo" if kind == "url" else str(root), tmp_path)
    assert done.returncode == 64, done.stderr
    assert "demo.sh: " in done.stderr
    assert len(snapshot(target)) == 2
    if kind == "file":
        assert root.read_text() == "keep me"


def test_new_empty_and_own_folders_are_used(fake_repo: Path, tmp_path: Path) -> None:
    script = fake_repo / "launch" / "demo.sh"
    new = tmp_path / "new" / "ckpt"
    done = run_demo(script, str(new), tmp_path)
    assert done.returncode == 0, done.stderr
    assert (new / MARKER).is_file()
    assert calls(fake_repo) == [
        "setup",
        f"torchrun --standalone --nproc-per-node 2 launch/demo.py --root {new} --steps 10",
        f"torchrun --standalone --nproc-per-node 2 launch/demo.py --root {new} --steps 20",
        f"shardckpt ls {new}"]
    # its own folder from an earlier run (the marker is there) is cleared and reused
    (new / "step-0000000010").mkdir()
    (new / "step-0000000010" / "manifest.json").write_text("{}")
    done = run_demo(script, str(new), tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in new.iterdir()) == [MARKER]
    # an empty folder is fine too
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_demo(script, "empty", tmp_path)
    assert done.returncode == 0, done.stderr
    assert (empty / MARKER).is_file()
    assert f"--root {empty} --steps 10" in calls(fake_repo)[-3]


def test_default_root_is_under_the_repository(fake_repo: Path, tmp_path: Path) -> None:
    done = run_demo(fake_repo / "launch" / "demo.sh", None, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (fake_repo / "demo_run" / "ckpt" / MARKER).is_file()
    assert "--root demo_run/ckpt --steps 10" in calls(fake_repo)[1]
