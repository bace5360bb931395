"""Issue 26 item 7: ``launch/ci/verify-latest.sh`` prints a one-line summary and no traceback
for a corrupt manifest or an empty root, and passes verify's exit code through."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shardckpt

SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "ci" / "verify-latest.sh"


def verify_latest(root: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "SHARDCKPT": f"{sys.executable} -m shardckpt",
           "VERIFY_REPORT": str(tmp_path / "report.json"), "HOME": str(tmp_path)}
    return subprocess.run(["bash", str(SCRIPT), str(root)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def saved(root: Path) -> Path:
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        mgr.save(3, {"w": torch.ones(16)})
    return root


@pytest.mark.parametrize("case", ["corrupt manifest", "empty root"])
def test_one_line_and_no_traceback(tmp_path: Path, case: str) -> None:
    root = tmp_path / "run"
    if case == "corrupt manifest":
        saved(root)
        (root / "step-0000000003" / "manifest.json").write_text('{"truncated": ')
        want = "CorruptCheckpointError"
    else:
        root.mkdir()
        want = "no committed checkpoint"
    proc = verify_latest(root, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"verify-latest: {root}: ") and want in line and "exit 2" in line


def test_a_verdict_summary_comes_first(tmp_path: Path) -> None:
    proc = verify_latest(saved(tmp_path / "run"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(f"verify-latest: {tmp_path / 'run'}: step 3: OK")
    assert any(ln.split()[:2] == ["integrity", "ok"] for ln in lines[1:])
