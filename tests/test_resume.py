"""Resumed training is bit-identical to uninterrupted training (issue 7), with blocking saves and
with asynchronous saves in both snapshot modes (issue 17), and no secret from the environment
reaches a checkpoint file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import TESTS_DIR, run_torchrun
from safetensors.torch import load_file

SCRIPT = str(TESTS_DIR / "repro_train.py")
STEPS, SAVE_AT = 14, 6  # the save falls inside the second epoch (8 batches/epoch at 1 rank)
SECRETS = {"AWS_SECRET_ACCESS_KEY": "aws-secret-marker-93f1", "HF_TOKEN": "hf_marker_1c2d3e4f5a",
           "MY_SERVICE_API_KEY": "api-key-marker-7a7a"}


def _env() -> dict[str, str]:
    return {**os.environ, **SECRETS, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{TESTS_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _run(nproc: int, *args: str) -> subprocess.CompletedProcess[str]:
    if nproc == 1:
        return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                              timeout=240, env=_env())
    return run_torchrun(SCRIPT, nproc, args, timeout=240, env={**SECRETS, "OMP_NUM_THREADS": "1"})


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("mode", ["blocking", "eager", "lazy"])
@pytest.mark.parametrize("nproc", [1, 2])
def test_killed_and_resumed_run_is_bit_identical(tmp_path: Path, nproc: int, mode: str) -> None:
    # the uninterrupted run saves too: an asynchronous save must not change training either
    straight = _run(nproc, "--root", str(tmp_path / "a"), "--steps", str(STEPS), "--save-at",
                    str(SAVE_AT), "--mode", mode, "--out", str(tmp_path / "a_out"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    # async modes: one more training step runs alongside the save before the kill
    killed = _run(nproc, "--root", str(tmp_path / "b"), "--steps", str(STEPS), "--save-at",
                  str(SAVE_AT), "--die-after-save", "--mode", mode, "--out",
                  str(tmp_path / "b_killed"))
    assert killed.returncode != 0  # SIGKILLed right after the checkpoint committed
    assert (tmp_path / "b" / f"step-{SAVE_AT:010d}" / "manifest.json").exists()
    resumed = _run(nproc, "--root", str(tmp_path / "b"), "--steps", str(STEPS), "--mode", mode,
                   "--out", str(tmp_path / "b_out"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in range(nproc):
        a = json.loads((tmp_path / f"a_out.rank{rank}.json").read_text())
        b = json.loads((tmp_path / f"b_out.rank{rank}.json").read_text())
        assert sorted(map(int, b)) == list(range(SAVE_AT + 1, STEPS + 1))
        assert {k: a[k] for k in b} == b  # every later step's loss, to the last bit
    fa, fb = load_file(str(tmp_path / "a_out.safetensors")), load_file(
        str(tmp_path / "b_out.safetensors"))
    assert set(fa) == set(fb) and any(k.startswith("optim/") for k in fa)
    for k in fa:
        assert torch.equal(_bits(fa[k]), _bits(fb[k])), k
    # no secret of the saving job's environment is in any file of the checkpoint
    for path in (tmp_path / "b").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for marker in SECRETS.values():
                assert marker.encode() not in data, (path, marker)
    show = subprocess.run([sys.executable, "-m", "shardckpt", "show", str(tmp_path / "b"),
                           "--json"], capture_output=True, text=True, timeout=120)
    prov = json.loads(show.stdout)["provenance"]
    for field in ("python", "torch", "hosts", "world_size", "command", "packages", "env",
                  "determinism"):
        assert field in prov, field
    assert prov["determinism"]["set_determinism"]["seed"] == 1234  # rank 0 seeds 1234 + rank
    assert len(prov["hosts"]) == nproc
