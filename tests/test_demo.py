"""The README's quick-start demo runs in CI: what ``launch/demo.sh`` does, without its setup step.

Two torchrun jobs of ``launch/demo.py`` (2 FSDP2 ranks on gloo): the first trains to step 10,
saving every 5; the second resumes from step 10 and trains to 20; retention keeps the last two
and every tenth. Then ``shardckpt ls`` lists what is left and ``verify`` passes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from harness import run_torchrun

from shardckpt.cli.main import main

DEMO = Path(__file__).resolve().parent.parent / "launch" / "demo.py"


def test_demo_trains_resumes_and_lists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "ckpt")
    env = {"OMP_NUM_THREADS": "1"}
    first = run_torchrun(DEMO, 2, ["--root", root, "--steps", "10"], timeout=240, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "done at step 10; checkpoints: [5, 10]" in first.stdout
    second = run_torchrun(DEMO, 2, ["--root", root, "--steps", "20"], timeout=240, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert re.search(r"resumed from step 10 \(lr [0-9.]+\)", second.stdout), second.stdout
    assert "step  11" in second.stdout and "step  10" not in second.stdout
    assert main(["ls", root, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in rows] == [10, 15, 20]
    assert all(r["world_size"] == 2 and "loss" in r["metrics"] for r in rows)
    assert main(["verify", root, "--json", "--no-record"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
