"""The command-line contract, command by command: --help, usage errors (exit 64, one line, no
traceback), --json (one JSON document on stdout, the contract's shapes), unknown commands."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import free_port

import shardckpt
from shardckpt.cli import progress
from shardckpt.cli.main import build_parser, main

COMMON = ("--replica", "--json")
FLAGS = {
    "ls": (),
    "show": ("--step",),
    "verify": ("--step", "--model", "--nproc", "--atol", "--rtol"),
    "prune": ("--keep-last", "--keep-every", "--keep-best", "--metric", "--mode",
              "--keep-hourly", "--keep-daily", "--keep-weekly", "--keep-within", "--config",
              "--dry-run"),
    "repair": ("--step", "--dry-run"),
    "export": ("--step", "--format", "--out", "--only", "--max-shard-size", "--dtype",
               "--config"),
    "import-dcp": ("--step", "--trust-pickle"),
    "diff": ("--atol",),
    "report": ("--out", "--metric"),
    # issue 32: governance
    "log": ("--step",),
    "tag": ("--step", "--add", "--remove", "--note"),
    "sign": ("--step", "--key"),
    "lock": ("--step", "--until", "--mode"),
}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardckpt", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = str(tmp_path_factory.mktemp("contract") / "run")
    with shardckpt.CheckpointManager(d, async_save=False, capture_rng=False) as mgr:
        for step in (10, 20, 30):
            mgr.save(step, {"w": torch.arange(6.0) * step, "b": torch.ones(2)},
                     metrics={"loss": 1.0 / step}, tags=("pinned",) if step == 10 else ())
    return d


def test_every_command_is_covered() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(FLAGS)


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_help_exits_0_and_names_every_flag(command: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    for flag in (*COMMON, *FLAGS[command]):
        assert flag in out, f"{command} --help does not mention {flag}"
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[command]._actions:  # and nothing it accepts goes unmentioned
        for opt in action.option_strings:
            assert opt in out, f"{command} --help does not mention {opt}"


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in FLAGS:
        assert command in out


USAGE_ERRORS = [
    ("ls",), ("ls", "nosuchproto://x/y"), ("ls", "{root}", "--bogus"),
    ("show",), ("show", "{root}", "--step", "-1"), ("show", "{root}", "--step", "abc"),
    ("verify",), ("verify", "{root}", "--nproc", "0"), ("verify", "{root}", "--atol", "-1"),
    ("verify", "{root}", "--model", "no_colon_here"), ("verify", "{missing}"),
    ("prune", "{root}"), ("prune", "{root}", "--keep-within", "soon"),
    ("prune", "{root}", "--keep-last", "x"), ("prune", "{root}", "--mode", "median"),
    ("repair", "{root}"), ("repair", "{root}", "--replica", "{missing}"),
    ("repair", "{root}", "--step", "1e3"),
    ("export", "{root}", "--step", "10"), ("export", "{root}", "--step", "10", "--format",
                                           "npz", "--out", "{tmp}/x"),
    ("export", "{root}", "--step", "10", "--format", "torch", "--out", "{tmp}/no/dir/x.pt"),
    ("export", "{root}", "--step", "10", "--format", "torch", "--out", "{tmp}"),
    ("export", "{root}", "--format", "hf", "--out", "{root}"),
    ("export", "{root}", "--format", "dcp", "--out", "{root}"),
    ("export", "{root}", "--format", "hf", "--dtype", "int8", "--out", "{tmp}/hf"),
    ("import-dcp", "{root}", "{tmp}/new"), ("import-dcp", "{root}", "{tmp}/new", "--step", "1"),
    ("diff",), ("diff", "{root}"), ("diff", "{missing}", "{root}@20"),
    ("diff", "{root}@10", "{root}@x"), ("diff", "{root}@10", "{root}@20", "--atol", "-3"),
    ("report", "{root}"), ("report", "{root}", "--out", "{tmp}/x.jpeg"),
    ("report", "{root}", "--out", "{tmp}/x.png", "--metric", "accuracy"),
    ("report", "{missing}", "--out", "{tmp}/x.png"),
    ("frobnicate",), ("frobnicate", "{root}", "--json"), (), ("--json",), ("--bogus",),
]


@pytest.mark.parametrize("argv", USAGE_ERRORS, ids=lambda a: " ".join(a) or "<none>")
def test_usage_errors_exit_64_with_one_line(argv: tuple[str, ...], root: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.format(root=root, missing=str(tmp_path / "missing"), tmp=tmp_path) for a in argv]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 64, (args, captured.err)
    if "--json" in args:  # one JSON error document (issue 15 item 13)
        assert json.loads(captured.out)["error"]["exit_code"] == 64
    else:
        assert captured.out == ""
    assert "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    assert captured.err.startswith("shardckpt")


@pytest.mark.parametrize("argv", [("frobnicate",), ("export",), ("report", "/x", "--json")])
def test_usage_errors_as_a_process(argv: tuple[str, ...]) -> None:
    proc = run_cli(*argv)
    assert proc.returncode == 64
    if "--json" in argv:  # one JSON error document (issue 15 item 13)
        assert json.loads(proc.stdout)["error"]["exit_code"] == 64
    else:
        assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_user_mistakes_are_one_line_without_traceback(root: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    for argv, code in ((["show", root, "--step", "11"], 2), (["verify", root, "--step", "11"], 2),
                       (["export", root, "--step", "11", "--format", "torch", "--out",
                         str(tmp_path / "x.pt")], 2),
                       (["diff", f"{root}@10", f"{root}@11"], 2)):
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def _json(argv: list[str], capsys: pytest.CaptureFixture[str], codes: tuple[int, ...] = (0,)
          ) -> object:
    code = main(argv)
    captured = capsys.readouterr()
    assert code in codes, (argv, captured.err)
    return json.loads(captured.out)  # exactly one document, nothing else on stdout


def test_json_ls(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _json(["ls", root, "--json"], capsys)
    assert isinstance(rows, list) and [r["step"] for r in rows] == [10, 20, 30]
    for r in rows:
        assert isinstance(r["time"], str) and "T" in r["time"]
        assert isinstance(r["nbytes"], int) and isinstance(r["world_size"], int)
        assert isinstance(r["metrics"], dict) and isinstance(r["tags"], list)
    assert rows[0]["tags"] == ["pinned"]


def test_json_show(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(["show", root, "--json"], capsys)
    assert isinstance(doc, dict) and doc["step"] == 30 and isinstance(doc["nbytes"], int)


def test_json_verify(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(["verify", root, "--step", "20", "--no-record", "--json"], capsys)
    assert isinstance(doc, dict) and doc["step"] == 20 and doc["ok"] is True
    assert doc["checks"] and all(isinstance(c["name"], str) and isinstance(c["ok"], bool) and
                                 isinstance(c["detail"], str) for c in doc["checks"])


def test_json_prune(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(["prune", root, "--keep-last", "1", "--dry-run", "--json"], capsys)
    assert isinstance(doc, dict) and doc["dry_run"] is True
    kept = {k["step"]: k["reasons"] for k in doc["kept"]}
    assert set(kept) == {10, 30} and all(isinstance(r, list) for r in kept.values())
    assert doc["deleted"] == [20]


def test_json_repair(root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    replica = tmp_path / "replica"
    shutil.copytree(root, replica)
    doc = _json(["repair", root, "--replica", str(replica), "--dry-run", "--json"], capsys)
    assert isinstance(doc, dict) and doc["ok"] is True and doc["dry_run"] is True
    assert isinstance(doc["steps"], list)


def test_json_export(root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "w.pt"
    doc = _json(["export", root, "--step", "20", "--format", "torch", "--out", str(out),
                 "--json"], capsys)
    assert doc == {"step": 20, "format": "torch", "out": str(out), "tensors": 2,
                   "nbytes": 8 * 4}
    tensors = torch.load(out, weights_only=True)
    assert torch.equal(tensors["w"], torch.arange(6.0) * 20)


def test_json_diff(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(["diff", f"{root}@10", f"{root}@20", "--json"], capsys)
    assert isinstance(doc, dict)
    assert doc["summary"] == {"same": 1, "changed": 1, "added": 0, "removed": 0}
    assert {t["key"]: t["status"] for t in doc["tensors"]} == {"b": "same", "w": "changed"}


def test_json_report(root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(["report", root, "--out", str(tmp_path / "r.png"), "--json"], capsys)
    assert isinstance(doc, dict) and doc["format"] == "png"
    assert [r["step"] for r in doc["steps"]] == [10, 20, 30] and doc["pinned"] == [10]


def test_json_as_a_process(root: str) -> None:
    proc = run_cli("ls", root, "--json")
    assert proc.returncode == 0 and proc.stderr == ""
    assert [r["step"] for r in json.loads(proc.stdout)] == [10, 20, 30]


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal_and_never_with_json(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    tty = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert progress.wanted(argparse.Namespace(json=False))
    assert not progress.wanted(argparse.Namespace(json=True))
    assert list(progress.bar(range(3), desc="x", enabled=False)) == [0, 1, 2]
    assert tty.getvalue() == ""
    assert list(progress.bar(range(3), desc="x", total=3, enabled=True)) == [0, 1, 2]
    assert "x" in tty.getvalue()  # tqdm drew on the (fake) terminal
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress.wanted(argparse.Namespace(json=False))


def test_ls_with_an_unreachable_replica_shows_the_others(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica that cannot be listed is reported in one line and marked unreachable; the
    root's checkpoints are still listed (exit 2: a copy is missing)."""
    root = tmp_path / "ckpt"
    with shardckpt.CheckpointManager(str(root), capture_rng=False) as mgr:
        mgr.save(1, {"w": torch.ones(3)}, blocking=True)
    closed = free_port()  # nothing listens there: every request fails at once
    import fsspec.config  # it reads FSSPEC_S3_* variables once, at import: set it itself

    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://127.0.0.1:{closed}"})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("SHARDCKPT_STORAGE_ATTEMPTS", "1")
    code = main(["ls", str(root), "--replica", "s3://no-such-bucket/run", "--json"])
    out, err = capsys.readouterr()
    assert code == 2
    rows = json.loads(out)
    assert [r["step"] for r in rows] == [1]
    assert [loc["health"] for loc in rows[0]["locations"]] == ["ok", "unreachable"]
    assert len(err.strip().splitlines()) == 1 and "cannot be listed" in err
    assert "Traceback" not in err
