"""Crash safety: a checkpoint is committed by its manifest, and nothing else.

* A child process saving a large step is SIGKILLed while its shard files are being written; the
  steps committed before survive bit for bit, the half-written step is invisible, and a fresh
  manager saves that step again over the leftovers.
* The commit itself (temp file, then ``os.replace`` onto ``manifest.json``) is interrupted right
  after the temp file is complete, once as an ordinary I/O error and once as a crash that skips
  every cleanup; neither leaves a committed or half-committed step behind.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import shardckpt
from shardckpt.format import manifest as M
from shardckpt.storage import local as location_mod

TESTS_DIR = Path(__file__).resolve().parent
BIG_TENSORS = 6  # x 64 MiB of float32 for the step that gets killed
KILL_AFTER_BYTES = 4 << 20  # kill once a step-3 shard file holds this much


def make_state(step: int) -> dict[str, Any]:
    """A few MB of state that depends only on ``step``: the parent regenerates what it saved."""
    g = torch.Generator().manual_seed(1000 + step)
    return {
        "model": {
            "embed.weight": torch.randn(512, 512, generator=g),
            "layers.0.weight": torch.randn(256, 1024, generator=g).to(torch.bfloat16),
            "layers.0.bias": torch.randn(1024, generator=g, dtype=torch.float64),
        },
        "ids": torch.randint(-(2**62), 2**62, (4096,), generator=g, dtype=torch.int64),
        "step": step,
        "lr": 0.1 / step,
    }


def big_state() -> dict[str, Any]:
    """Hundreds of MB, so that writing it takes many chunks and a noticeable time."""
    return {f"big{i}": torch.full((16 << 20,), float(i)) for i in range(BIG_TENSORS)}


def zeros_like_state(state: dict[str, Any]) -> dict[str, Any]:
    def z(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return torch.zeros_like(v)
        if isinstance(v, dict):
            return {k: z(x) for k, x in v.items()}
        return type(v)(0)

    return z(state)


def assert_bit_equal(got: Any, want: Any, path: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{path}: bytes differ"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for k in want:
            assert_bit_equal(got[k], want[k], f"{path}/{k}")
    else:
        assert type(got) is type(want) and got == want, path


def load_and_check(mgr: shardckpt.CheckpointManager, step: int) -> None:
    want = make_state(step)
    got = zeros_like_state(want)
    assert mgr.load(got, step=step) == step
    assert_bit_equal(got, want)


CHILD = f"""
import sys
sys.path.insert(0, {str(TESTS_DIR)!r})
import shardckpt
from test_crash import big_state, make_state

mgr = shardckpt.CheckpointManager(sys.argv[1], async_save=False)
mgr.save(1, make_state(1))
mgr.save(2, make_state(2))
print("committed 2", flush=True)
state = big_state()
print("writing 3", flush=True)
mgr.save(3, state)
print("committed 3", flush=True)
"""


class _Lines:
    """Lines of a child's stdout, each awaited with a deadline (never a blocking read)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self._fd = proc.stdout.fileno()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._fd, selectors.EVENT_READ)
        self._buf = b""

    def expect(self, line: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            lines = self._buf.split(b"\n")
            if line.encode() in lines[:-1]:
                return
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                raise AssertionError(f"child did not print {line!r} in {timeout}s")
            data = os.read(self._fd, 4096)
            if not data:
                raise AssertionError(f"child exited before printing {line!r}")
            self._buf += data

    def rest(self) -> str:
        """Everything the (dead) child printed, once its stdout has reached EOF."""
        while data := os.read(self._fd, 4096):
            self._buf += data
        self._sel.close()
        return self._buf.decode(errors="replace")


def _wait_for_partial_shard(step_dir: Path, proc: subprocess.Popen[bytes],
                            timeout: float) -> int:
    """Poll until a shard file of ``step_dir`` has grown past the threshold; its size."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "child finished before it could be killed mid-write"
        sizes = [p.stat().st_size for p in step_dir.glob("*.shard")] if step_dir.is_dir() else []
        if sizes and max(sizes) >= KILL_AFTER_BYTES:
            return max(sizes)
        time.sleep(0.01)
    raise AssertionError(f"no shard file in {step_dir} grew past {KILL_AFTER_BYTES} bytes")


@pytest.mark.timeout(120)
def test_sigkill_while_writing_shards_leaves_earlier_steps_intact(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    stderr_path = tmp_path / "child.stderr"
    env = dict(os.environ, SHARDCKPT_CHUNK_SIZE="1M", PYTHONUNBUFFERED="1")
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root)], env=env,
                                stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
    try:
        lines = _Lines(proc)
        try:
            lines.expect("committed 2", timeout=60)
            lines.expect("writing 3", timeout=30)
            step3 = root / "step-0000000003"
            seen = _wait_for_partial_shard(step3, proc, timeout=30)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nchild stderr:\n{stderr_path.read_text()[-3000:]}") \
                from None
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        printed = lines.rest()
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert "committed 3" not in printed, "step 3 committed before the kill: nothing was tested"
    assert seen >= KILL_AFTER_BYTES

    # The partial step is there on disk, but not committed.
    assert step3.is_dir()
    assert not (step3 / M.MANIFEST_NAME).exists()
    assert list(step3.glob("*.shard"))

    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        assert mgr.steps() == [1, 2]
        assert mgr.latest_step() == 2
        load_and_check(mgr, 1)
        load_and_check(mgr, 2)
        # Loading "the latest" picks step 2, not the half-written step 3.
        got = zeros_like_state(make_state(2))
        assert mgr.load(got) == 2
        assert_bit_equal(got, make_state(2))

    # A fresh manager saves step 3 again: the leftovers are cleared, not mixed in.
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        info = mgr.save(3, make_state(3)).wait()
        assert info is not None and info.step == 3
        assert mgr.steps() == [1, 2, 3]
        assert mgr.latest_step() == 3
        files = set(mgr.manifest(3).files)
        assert {p.name for p in step3.iterdir()} == files | {M.MANIFEST_NAME}
        assert sum(p.stat().st_size for p in step3.glob("*.shard")) == info.nbytes
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        load_and_check(mgr, 3)
        load_and_check(mgr, 1)


class _Crash(BaseException):
    """Stands in for the process dying: no ``except Exception`` cleanup runs."""


@pytest.mark.parametrize("failure", ["oserror", "crash"])
def test_interrupted_manifest_commit_never_commits(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   failure: str) -> None:
    root = tmp_path / "ckpt"
    step_dir = root / "step-0000000005"
    real_replace = os.replace
    temps: list[bytes] = []

    def failing_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if os.path.basename(os.fspath(dst)) != M.MANIFEST_NAME:
            return real_replace(src, dst, *args, **kwargs)
        # The temp file is complete at this point: all of it parses as a valid manifest.
        assert os.path.basename(os.fspath(src)).startswith(M.MANIFEST_NAME + ".tmp-")
        temps.append(Path(src).read_bytes())
        if failure == "oserror":
            raise OSError(28, "No space left on device (injected)")
        raise _Crash("killed between writing the temp manifest and renaming it")

    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        mgr.save(4, make_state(4))
        monkeypatch.setattr(location_mod.os, "replace", failing_replace)
        if failure == "oserror":
            with pytest.raises(shardckpt.ShardckptError, match="commit") as excinfo:
                mgr.save(5, make_state(5))
            assert isinstance(excinfo.value, shardckpt.StorageError)
            assert "No space left on device" in str(excinfo.value)
        else:
            with pytest.raises(_Crash):
                mgr.save(5, make_state(5))
        monkeypatch.undo()
        assert len(temps) == 1
        assert M.parse(temps[0]).step == 5
        assert mgr.steps() == [4]
        assert mgr.latest_step() == 4

    assert not (step_dir / M.MANIFEST_NAME).exists()
    leftovers = sorted(p.name for p in step_dir.iterdir()) if step_dir.exists() else []
    if failure == "oserror":
        assert leftovers == []  # an orderly failure removes the uncommitted directory
    else:
        # A crash leaves shards and the temp manifest, which no reader takes for a commit.
        assert any(n.startswith(M.MANIFEST_NAME + ".tmp-") for n in leftovers)
        assert any(n.endswith(".shard") for n in leftovers)

    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        assert mgr.steps() == [4]
        info = mgr.save(5, make_state(5)).wait()
        assert info is not None and info.step == 5
        assert mgr.steps() == [4, 5]
        assert not [p for p in step_dir.iterdir() if ".tmp-" in p.name]
        load_and_check(mgr, 5)
        load_and_check(mgr, 4)
