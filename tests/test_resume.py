"""Resumed training is bit-identical to uninterrupted training (issue 7), with blocking saves and
with asynchronous saves in both snapshot modes (issue 17), and no secret from the environment
reaches a checkpoint file.

One uninterrupted run per rank count (no save) is the reference for every mode: the steps run
before the kill (with an asynchronous save in flight during the last one) and those run after
the resume must all match it, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
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


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """The uninterrupted run without any save, once per rank count: every mode's killed and
    resumed run is compared with it, so the modes are also checked to agree with each other."""
    done: dict[int, Path] = {}

    def get(nproc: int) -> Path:
        if nproc not in done:
            tmp = tmp_path_factory.mktemp(f"reference{nproc}")
            run = _run(nproc, "--root", str(tmp / "root"), "--steps", str(STEPS), "--out",
                       str(tmp / "out"))
            assert run.returncode == 0, run.stderr[-3000:]
            assert not (tmp / "root").exists() or not any((tmp / "root").iterdir())
            done[nproc] = tmp / "out"
        return done[nproc]

    return get


def _losses(prefix: Path, rank: int) -> dict[str, str]:
    return json.loads(Path(f"{prefix}.rank{rank}.json").read_text())


@pytest.mark.parametrize("mode", ["blocking", "eager", "lazy"])
@pytest.mark.parametrize("nproc", [1, 2])
def test_killed_and_resumed_run_is_bit_identical(tmp_path: Path, nproc: int, mode: str,
                                                  reference: Callable[[int], Path]) -> None:
    ref = reference(nproc)
    # async modes: one more training step runs alongside the save before the kill, and its loss
    # must be the reference's: an asynchronous save must not change training either
    killed = _run(nproc, "--root", str(tmp_path / "b"), "--steps", str(STEPS), "--save-at",
                  str(SAVE_AT), "--die-after-save", "--mode", mode, "--out",
                  str(tmp_path / "b_killed"))
    assert killed.returncode != 0  # SIGKILLed right after the checkpoint committed
    assert (tmp_path / "b" / f"step-{SAVE_AT:010d}" / "manifest.json").exists()
    resumed = _run(nproc, "--root", str(tmp_path / "b"), "--steps", str(STEPS), "--mode", mode,
                   "--out", str(tmp_path / "b_out"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ran_alongside = SAVE_AT if mode == "blocking" else SAVE_AT + 1
    for rank in range(nproc):
        a = _losses(ref, rank)
        assert sorted(map(int, a)) == list(range(1, STEPS + 1))
        before = _losses(tmp_path / "b_killed", rank)
        assert sorted(map(int, before)) == list(range(1, ran_alongside + 1))
        assert {k: a[k] for k in before} == before
        b = _losses(tmp_path / "b_out", rank)
        assert sorted(map(int, b)) == list(range(SAVE_AT + 1, STEPS + 1))
        assert {k: a[k] for k in b} == b  # every later step's loss, to the last bit
    fa, fb = load_file(f"{ref}.safetensors"), load_file(str(tmp_path / "b_out.safetensors"))
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
