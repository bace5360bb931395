"""Pruning an incremental root: a prune SIGKILLed at several phases never loses a byte that a
kept step references, and the next prune finishes the job."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from incremental_helpers import load_step, lora_state

import shardckpt
from shardckpt.cli.main import main
from shardckpt.prune import prune_location
from shardckpt.storage import open_location, step_dirname

CHILD_ENV = {"SHARDCKPT_FSYNC": "1", "PYTHONUNBUFFERED": "1", "SHARDCKPT_CHUNK_SIZE": "65536"}

HANG = """
import sys, threading
import shardckpt.prune_refs as PR
from shardckpt.storage import local as L
phase = sys.argv[1]

def hang(what):
    print(what, flush=True)
    threading.Event().wait()

real_retire, real_tree = PR.retire, L.LocalLocation.remove_tree

def retire(location, step, *a):
    real_retire(location, step, *a)
    if phase == "retired":
        hang(f"retired {step}")

def remove_tree(self, rel):
    if (phase == "deleting" and rel.startswith("step-")) or \
            (phase == "whole" and rel == "step-0000000001"):
        names = sorted(self.listdir(rel))
        for name in names[: len(names) // 2]:
            self.remove(rel + "/" + name)
        hang(f"deleting {rel}")
    real_tree(self, rel)

PR.retire = retire
L.LocalLocation.remove_tree = remove_tree
from shardckpt.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@contextlib.contextmanager
def _child(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", HANG, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, **CHILD_ENV})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)


def _line(proc: subprocess.Popen[bytes], timeout: float = 60) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout.fileno(), selectors.EVENT_READ)
    buf, deadline = b"", time.monotonic() + timeout
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError("the prune printed nothing")
            data = os.read(proc.stdout.fileno(), 4096)
            if not data:
                raise AssertionError("the prune exited: " + proc.stderr.read().decode()[-2000:])
            buf += data
    finally:
        sel.close()
    return buf.split(b"\n")[0].decode()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDCKPT_FSYNC", "0")
    monkeypatch.setenv("SHARDCKPT_CHUNK_SIZE", "65536")


def _root(path: Path, steps: list[int]) -> str:
    root = str(path)
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True) as mgr:
        for s in steps:
            mgr.save(s, lora_state(s))
    return root


def _steps(root: str) -> list[int]:
    with shardckpt.CheckpointManager(root, async_save=False) as mgr:
        return mgr.steps()


def _all_load(root: str) -> None:
    for s in _steps(root):
        load_step(root, s, lora_state(s))
    assert main(["verify", root]) == 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("phase", ["retired", "deleting"])
def test_prune_killed_while_retiring_or_deleting(tmp_path: Path, phase: str) -> None:
    root = _root(tmp_path / "run", [1, 2, 3, 4])
    with _child(phase, "prune", root, "--keep-last", "1") as proc:
        line = _line(proc)
        assert line.split()[0] == ("retired" if phase == "retired" else "deleting")
        _kill(proc)
    assert _steps(root)[-1] == 4
    _all_load(root)  # step 4 (and whatever else is still listed) loads bit for bit
    prune_location(open_location(root), shardckpt.RetentionPolicy(keep_last=1), grace=0)
    assert _steps(root) == [4]
    assert (Path(root) / "step-0000000001.retired").exists()
    assert sorted(p.name for p in Path(root).iterdir()) == [
        ".shardckpt", ".shardckpt-root", "audit", step_dirname(1), "step-0000000001.retired",
        step_dirname(4)]
    _all_load(root)


@pytest.mark.timeout(180)
def test_prune_killed_while_deleting_an_unreferenced_retired_step(tmp_path: Path) -> None:
    root = _root(tmp_path / "run", [1, 2, 3])
    prune_location(open_location(root), shardckpt.RetentionPolicy(keep_last=1), grace=0)
    assert (Path(root) / "step-0000000001.retired").exists() and _steps(root) == [3]
    with shardckpt.CheckpointManager(root, async_save=False, incremental=True,
                                     full_every=1) as mgr:
        info = mgr.save(4, lora_state(4)).wait()  # full: step 1 is referenced by 3 only
    assert info is not None and info.depends_on == ()
    with _child("whole", "prune", root, "--keep-last", "1") as proc:
        line = _line(proc)
        assert line.startswith("deleting ")
        _kill(proc)
    assert _steps(root) == [4]
    _all_load(root)
    prune_location(open_location(root), shardckpt.RetentionPolicy(keep_last=1), grace=0)
    assert sorted(p.name for p in Path(root).iterdir()) == [".shardckpt", ".shardckpt-root",
                                                          "audit", step_dirname(4)]
    _all_load(root)
