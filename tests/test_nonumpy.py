"""Issue 15 item 8: shardckpt works where NumPy is not installed.

torch's CPU wheel does not require NumPy, and ``Tensor.numpy()`` on the save and load paths made
every save fail after a plain ``pip install`` (``RuntimeError: Numpy is not available``). This
builds a fresh venv (not ``--system-site-packages``: the system may have NumPy), installs torch
and the package from this source tree the ordinary way, without the dev extra, checks that
NumPy is not there, then saves and loads in one process and in a 2-rank torchrun job, and lists
the checkpoints with the CLI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().parent / "nonumpy_script.py"
TORCH = "torch==2.13.0"


def run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=env["HOME"])
    assert done.returncode == 0, f"{cmd}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    base = tmp_path_factory.mktemp("nonumpy")
    src = base / "src"  # a copy, so that the build leaves nothing in the work tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "shardckpt", src / "shardckpt",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HOME"] = str(base)
    # No pip of its own (ensurepip costs seconds): this interpreter's pip installs into it
    # (``pip --python``), the ordinary way otherwise. ``--no-compile``: the first imports
    # compile what they use, instead of pip compiling all of torch up front.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base / "venv")],
                   check=True, timeout=60)
    py = str(base / "venv" / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", py]
    run([*pip, "install", "-q", "--no-compile", TORCH, str(src)], env, timeout=240)
    listed = run([*pip, "list", "--format=freeze"], env)
    if any(line.lower().startswith("numpy==") for line in listed.splitlines()):
        run([*pip, "uninstall", "-y", "-q", "numpy"], env)  # torch may pull it in
    probe = subprocess.run([py, "-c", "import numpy"], capture_output=True, env=env)
    assert probe.returncode != 0, "numpy is still importable in the fresh venv"
    assert "shardckpt==" in listed and "torch==" in listed, listed
    return base / "venv" / "bin", env


def test_save_load_and_ls_without_numpy(venv: tuple[Path, dict[str, str]],
                                        tmp_path: Path) -> None:
    bindir, env = venv
    py = str(bindir / "python")
    one = run([py, str(SCRIPT), str(tmp_path / "one")], env)
    assert "rank 0: saved and loaded without numpy" in one
    job = run([py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(SCRIPT), str(tmp_path / "two")], env, timeout=180)
    assert "rank 0: saved and loaded without numpy" in job
    assert "rank 1: saved and loaded without numpy" in job
    listing = run([str(bindir / "shardckpt"), "ls", str(tmp_path / "two")], env)
    rows = [line.split() for line in listing.splitlines()[1:] if line.strip()]
    assert [(r[0], r[4], r[5]) for r in rows] == [("3", "2", "ok"), ("4", "2", "ok")], listing


def test_byte_view_shares_the_tensors_memory_and_keeps_it_alive() -> None:
    import gc

    import torch

    from shardckpt.engine.tensorbytes import byte_view

    t = torch.arange(6, dtype=torch.int32)
    view = byte_view(t)
    assert view.format == "B" and view.nbytes == 24 and not view.readonly
    assert bytes(view) == t.numpy().tobytes()
    view[0:4] = (7).to_bytes(4, "little")  # writes land in the tensor (the reader relies on it)
    assert t[0].item() == 7
    want = bytes(view)
    del t
    gc.collect()
    torch.arange(1000, dtype=torch.int32).add_(1)  # reuse freed memory, if it had been freed
    assert bytes(view) == want
    assert byte_view(torch.empty(0, 3)).nbytes == 0
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        byte_view(torch.zeros(4, 4).t())
    with pytest.raises(ValueError, match="conjugate"):
        byte_view(torch.zeros(3, dtype=torch.complex64).conj())
