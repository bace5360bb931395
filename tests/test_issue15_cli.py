"""Issue 15 item 13: with ``--json``, every error is one JSON document on stdout.

``{"error": {"type": ..., "message": ..., "exit_code": N}}``, with the same exit code as
without ``--json`` (and the one-line message on stderr as before). Usage errors that argparse
finds count too, whenever ``--json`` is on the command line. Without ``--json`` stdout stays
empty on errors.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import shardckpt
from shardckpt.cli import commands
from shardckpt.cli.main import main
from shardckpt.errors import StorageError


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli15") / "ck"
    with shardckpt.CheckpointManager(str(path)) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": torch.full((8,), float(step))}, metrics={"loss": 1.0 / step})
    return path


def error_doc(capsys: pytest.CaptureFixture[str], argv: list[str], code: int) -> dict[str, Any]:
    assert main(argv) == code
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # exactly one document: json.loads refuses anything more
    # prune's documents are log lines: they also carry "time" (issue 26 item 3)
    assert set(doc) == ({"error", "time"} if argv[0] == "prune" else {"error"})
    assert set(doc["error"]) == {"type", "message", "exit_code"}
    assert doc["error"]["exit_code"] == code
    assert doc["error"]["message"] and "\n" not in doc["error"]["message"]
    assert captured.err.strip(), "the human line on stderr is kept"
    # and without --json: the same exit code, nothing on stdout
    assert main([a for a in argv if a != "--json"]) == code
    assert capsys.readouterr().out == ""
    return doc["error"]


USAGE = {
    "no command": (["--json"], "the following arguments are required: COMMAND"),
    "unknown command": (["frobnicate", "--json"], "invalid choice: 'frobnicate'"),
    "bad flag": (["ls", "{root}", "--json", "--bogus"], "unrecognized arguments: --bogus"),
    "ls no root": (["ls", "--json"], "the following arguments are required: ROOT"),
    "show bad step": (["show", "{root}", "--step", "x", "--json"], "--step"),
    "prune no rule": (["prune", "{root}", "--json"], "no retention rule given"),
    "prune bad count": (["prune", "{root}", "--keep-last", "-1", "--json"], "keep_last"),
    "repair no replica": (["repair", "{root}", "--json"], "needs at least one --replica"),
    "export no out": (["export", "{root}", "--json"], "--out"),
    "verify no root": (["verify", "--json"], "ROOT"),
    "diff bad spec": (["diff", "{root}@x", "{root}", "--json"], "not a non-negative integer"),
    "report no out": (["report", "{root}", "--json"], "--out"),
    # (ls/show/prune take a missing root for one with no checkpoints yet: issue 25 item 6)
    "no such root": (["verify", "{root}-missing", "--json"], "no such checkpoint root"),
}


@pytest.mark.parametrize("case", sorted(USAGE))
def test_usage_errors_are_json_documents(case: str, root: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    argv, text = USAGE[case]
    err = error_doc(capsys, [a.replace("{root}", str(root)) for a in argv], 64)
    assert err["type"] == "UsageError"
    assert text in err["message"], err


def test_integrity_errors_are_json_documents(root: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    err = error_doc(capsys, ["show", str(root), "--step", "7", "--json"], 2)
    assert err["type"] == "IncompleteCheckpointError" and "step 7" in err["message"]
    err = error_doc(capsys, ["export", str(root), "--step", "9", "--format", "safetensors",
                             "--out", str(tmp_path / "x.safetensors"), "--json"], 2)
    assert err["type"] == "IncompleteCheckpointError"
    err = error_doc(capsys, ["diff", f"{root}@1", f"{root}@8", "--json"], 2)
    assert err["type"] == "IncompleteCheckpointError"
    bad = tmp_path / "bad"
    with shardckpt.CheckpointManager(str(bad)) as mgr:
        mgr.save(3, {"w": torch.zeros(2)})
    manifest = bad / "step-0000000003" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])
    err = error_doc(capsys, ["show", str(bad), "--step", "3", "--json"], 2)
    assert err["type"] == "CorruptCheckpointError" and "manifest.json" in err["message"]


@pytest.mark.parametrize("exc, kind, message", [
    (StorageError("s3://bucket/run: connection refused"), "StorageError",
     "s3://bucket/run: connection refused"),
    (OSError(errno.EACCES, "Permission denied"), "PermissionError",
     "[Errno 13] Permission denied"),
    (RuntimeError("a bug\non two lines"), "RuntimeError", "a bug on two lines"),
    (KeyboardInterrupt(), "KeyboardInterrupt", "(no message)"),
])
def test_internal_errors_are_json_documents(exc: BaseException, kind: str, message: str,
                                            root: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    def failing(args: Any) -> int:
        raise exc

    _, help_text, add = commands.COMMANDS["ls"]
    monkeypatch.setitem(commands.COMMANDS, "ls", (failing, help_text, add))
    assert main(["ls", str(root), "--json"]) == 70
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"error": {"type": kind, "message": message,
                                                  "exit_code": 70}}


def test_console_script_prints_the_document_and_exits_with_its_code(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "shardckpt", "show", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr  # an empty root: no checkpoint (missing: 2)
    assert json.loads(done.stdout)["error"]["exit_code"] == 2
    assert "shardckpt show: " in done.stderr
