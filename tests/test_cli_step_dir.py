"""Every command given a step directory where a root is wanted says so (exit 2), the same way."""

import subprocess
import sys

import pytest
import torch

import shardckpt


@pytest.fixture(scope="module")
def step_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "run"
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        mgr.save(1, {"w": torch.ones(3)})
    return root / "step-0000000001"


@pytest.mark.parametrize("argv", [
    ["ls"], ["show"], ["verify"], ["report", "--out", "{tmp}/r.html"],
    ["export", "--format", "hf", "--out", "{tmp}/hf"], ["diff", "{step}"],
])
def test_a_step_directory_is_named_as_such_with_exit_2(step_dir, tmp_path, argv):
    args = [a.replace("{tmp}", str(tmp_path)).replace("{step}", str(step_dir)) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "shardckpt", args[0], str(step_dir), *args[1:]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "is a step directory, not a checkpoint root" in proc.stderr
    assert not (tmp_path / "hf").exists() and not (tmp_path / "r.html").exists()
