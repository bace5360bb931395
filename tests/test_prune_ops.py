"""Issue 26 item 3: ``shardckpt prune`` from cron and systemd.

- a root that does not exist yet, or an empty folder: exit 0, one line, nothing created;
- ``.shardckpt/`` created by a prune gets the root's owner and mode (a prune run as another
  user never leaves the training job a control folder it cannot write);
- ``--quiet``: nothing on success, one line on failure;
- ``--json``: one line per run (JSON Lines) with a timestamp, failures included; a held lock
  gives the ``{"error": {...}}`` document;
- ``--metrics-file``: shardckpt_prune_last_success, the deleted count and time stamps;
- the example policy works on a job that logs no ``val_loss``.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.cli.main import main
from shardckpt.storage import open_location
from shardckpt.storage.lease import PruneLock

LAUNCH = Path(__file__).resolve().parent.parent / "launch"


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def make_run(root: Path, steps: range = range(1, 6), metrics: dict | None = None) -> Path:
    with shardckpt.CheckpointManager(str(root), async_save=False, capture_rng=False) as mgr:
        for step in steps:
            mgr.save(step, {"w": torch.full((4,), float(step))},
                     metrics=metrics if metrics is not None else {"loss": 1.0 / step})
    return root


def steps_of(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in root.glob("step-*"))


@pytest.mark.parametrize("exists", [False, True])
@pytest.mark.parametrize("as_json", [False, True])
def test_a_root_before_the_first_save_is_exit_0_one_line_nothing_created(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], exists: bool, as_json: bool) -> None:
    root = tmp_path / "run1"
    if exists:
        root.mkdir()
    code, out, err = cli(capsys, "prune", str(root), "--keep-last", "2",
                         *(["--json"] if as_json else []))
    assert code == 0 and err == ""
    assert len(out.splitlines()) == 1
    if as_json:
        doc = json.loads(out)
        assert doc["deleted"] == [] and "no checkpoints yet" in doc["note"]
    else:
        assert out.strip() == f"{root}: no checkpoints yet (the root " \
            f"{'is empty' if exists else 'does not exist'}); nothing to prune"
    assert root.exists() == exists and (not exists or list(root.iterdir()) == [])


def test_the_control_folder_gets_the_roots_owner_and_mode(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    root = make_run(tmp_path / "run")
    shutil.rmtree(root / ".shardckpt")  # a root copied without it, say
    os.chmod(root, 0o2775)
    if os.geteuid() == 0:  # as root (a root crontab): the folder goes to the root's owner
        os.chown(root, 4321, 4322)
    old = os.umask(0o077)  # cron's umask must not leave the job a folder it cannot write
    try:
        code, _, err = cli(capsys, "prune", str(root), "--keep-last", "2")
    finally:
        os.umask(old)
    assert code == 0, err
    want = os.stat(root)
    for sub in (".shardckpt", ".shardckpt/leases"):
        st = os.stat(root / sub)
        assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(want.st_mode) == 0o2775, sub
        assert (st.st_uid, st.st_gid) == (want.st_uid, want.st_gid), sub
    assert steps_of(root) == [4, 5]


def test_quiet_prints_nothing_on_success_and_one_line_on_failure(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_run(tmp_path / "run")
    assert cli(capsys, "prune", str(root), "--keep-last", "3", "--quiet") == (0, "", "")
    assert steps_of(root) == [3, 4, 5]
    lock = PruneLock.acquire(open_location(str(root)))
    try:
        code, out, err = cli(capsys, "prune", str(root), "--keep-last", "1", "--quiet",
                             "--lock-wait", "0")
    finally:
        lock.release()
    assert code == 70 and out == ""
    assert len(err.splitlines()) == 1 and "another prune holds the lock" in err
    for step in (3, 4):  # two corrupt manifests: still one line
        (root / f"step-{step:010d}" / "manifest.json").write_text("{not json")
    code, out, err = cli(capsys, "prune", str(root), "--keep-last", "1", "--quiet")
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert "step 3" in err and "1 more problem" in err


def test_json_is_one_line_per_run_with_a_time(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    root = make_run(tmp_path / "run")
    log = []
    for keep in ("4", "2"):
        code, out, err = cli(capsys, "prune", str(root), "--keep-last", keep, "--json")
        assert code == 0 and err == "" and out.count("\n") == 1
        log.append(out)
    lock = PruneLock.acquire(open_location(str(root)))
    try:
        code, out, _ = cli(capsys, "prune", str(root), "--keep-last", "1", "--json",
                           "--lock-wait", "0")
    finally:
        lock.release()
    assert code == 70 and out.count("\n") == 1
    log.append(out)
    code, out, _ = cli(capsys, "prune", str(root), "--keep-lats", "1", "--json")  # typo: 64
    assert code == 64 and out.count("\n") == 1
    log.append(out)
    docs = [json.loads(line) for line in "".join(log).splitlines()]  # a log of JSON Lines
    assert [d.get("deleted") for d in docs[:2]] == [[1], [2, 3]]
    for d in docs:
        assert datetime.fromisoformat(d["time"]).tzinfo is not None
    locked = docs[2]
    assert locked["error"]["type"] == "PruneLockedError" and locked["error"]["exit_code"] == 70
    assert str(root) in locked["error"]["message"] and "holds the lock" in \
        locked["error"]["message"]
    assert docs[3]["error"]["exit_code"] == 64


def _samples(path: Path) -> dict[str, float]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_file_records_success_deletions_and_failures(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_run(tmp_path / "run")
    prom = tmp_path / "textfile" / "prune.prom"
    prom.parent.mkdir()
    lab = f'{{root="{root}"}}'
    code, _, _ = cli(capsys, "prune", str(root), "--keep-last", "2", "--metrics-file",
                     str(prom), "--quiet")
    assert code == 0
    first = _samples(prom)
    assert first[f"shardckpt_prune_last_success{lab}"] == 1
    assert first[f'shardckpt_prune_last_deleted{{root="{root}",location="{root}"}}'] == 3
    ok_time = first[f"shardckpt_prune_last_success_timestamp_seconds{lab}"]
    assert ok_time == first[f"shardckpt_prune_last_run_timestamp_seconds{lab}"] > 1.7e9
    assert stat.S_IMODE(os.stat(prom).st_mode) == 0o644
    lock = PruneLock.acquire(open_location(str(root)))
    try:
        code, _, _ = cli(capsys, "prune", str(root), "--keep-last", "1", "--metrics-file",
                         str(prom), "--lock-wait", "0", "--quiet")
    finally:
        lock.release()
    assert code == 70
    failed = _samples(prom)
    assert failed[f"shardckpt_prune_last_success{lab}"] == 0
    assert failed[f"shardckpt_prune_last_exit_code{lab}"] == 70
    assert failed[f"shardckpt_prune_last_success_timestamp_seconds{lab}"] == ok_time
    assert failed[f"shardckpt_prune_last_run_timestamp_seconds{lab}"] >= ok_time
    # a dry run is no run of the job: the file is left as it was
    cli(capsys, "prune", str(root), "--keep-last", "1", "--metrics-file", str(prom),
        "--dry-run")
    assert _samples(prom) == failed


def test_a_root_whose_prune_never_succeeded_has_a_zero_success_time(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The documented alert, time() - last success > N, must fire for a root whose pruning has
    failed from the start: the success time is 0, never absent."""
    root = make_run(tmp_path / "run")
    prom = tmp_path / "prune.prom"
    lock = PruneLock.acquire(open_location(str(root)))
    try:
        code, _, _ = cli(capsys, "prune", str(root), "--keep-last", "1", "--metrics-file",
                         str(prom), "--lock-wait", "0", "--quiet")
    finally:
        lock.release()
    assert code == 70
    lab = f'{{root="{root}"}}'
    assert _samples(prom)[f"shardckpt_prune_last_success_timestamp_seconds{lab}"] == 0


def test_the_example_policy_works_without_val_loss(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    root = make_run(tmp_path / "run", metrics={"train_loss": 0.5})
    code, out, err = cli(capsys, "prune", str(root), "--config",
                         str(LAUNCH / "prune-policy.example.toml"), "--json")
    assert code == 0, err
    assert json.loads(out)["deleted"] == [1, 2] and steps_of(root) == [3, 4, 5]


def test_the_console_script_prunes_quietly(tmp_path: Path) -> None:
    """What cron runs: a process of its own, --quiet --json appended to a log."""
    root = make_run(tmp_path / "run")
    argv = [sys.executable, "-m", "shardckpt", "prune", str(root), "--keep-last", "1",
            "--quiet", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "" and done.stdout.count("\n") == 1
    assert json.loads(done.stdout)["deleted"] == [1, 2, 3, 4]
