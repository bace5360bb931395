"""Recovery you can count on (issue 15, items 1-3): a dead replica never blocks a read path, a
corrupt newest checkpoint is reported (never hidden) and can be saved again, and the end-to-end
job that loses its S3 replica mid-run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import recovery_targets as R
import torch
from harness import free_port, run_ranks

import shardckpt
from shardckpt import catalog
from shardckpt.cli.main import main


def dead_options() -> dict:
    """fsspec options of an S3 endpoint on a closed port: every connection is refused."""
    from s3_server import s3_options

    return {"s3://": s3_options(f"http://127.0.0.1:{free_port()}")}


def point_s3_at_a_closed_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsspec reads FSSPEC_S3_* variables once, at import: set its config itself."""
    import fsspec.config

    monkeypatch.setitem(fsspec.config.conf, "s3",
                        {"endpoint_url": f"http://127.0.0.1:{free_port()}"})


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from s3_server import TEST_ENV, UNSET_ENV

    for name in UNSET_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in TEST_ENV.items():
        monkeypatch.setenv(name, value)


def saved(root: Path, steps: tuple[int, ...] = (1, 2, 3), **kwargs) -> None:
    with shardckpt.CheckpointManager(str(root), async_save=False, capture_rng=False,
                                     **kwargs) as mgr:
        for s in steps:
            mgr.save(s, {"w": torch.full((4,), float(s)), "step": s})


def truncate_manifest(root: Path, step: int) -> Path:
    m = root / f"step-{step:010d}" / "manifest.json"
    m.write_bytes(m.read_bytes()[:100])
    return m


# --------------------------------------------------------------------- 1. a dead replica


def test_dead_replica_never_blocks_a_read_path(tmp_path: Path, aws_env: None) -> None:
    opts = dead_options()
    root = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.monotonic()
        mgr = shardckpt.CheckpointManager(str(root), replicas=["s3://bkt/run"], min_replicas=1,
                                          storage_options=opts, capture_rng=False)
        mgr.save(1, {"w": torch.ones(4)}, blocking=True)
        mgr.save(2, {"w": torch.full((4,), 2.0)}, blocking=True)
        assert mgr.steps() == [1, 2] and mgr.latest_step() == 2
        assert mgr.info(2).replicas == (str(root),)  # committed at the reachable copy only
        assert mgr.manifest(2).extra["degraded"] is True
        got = {"w": torch.zeros(4)}
        assert mgr.load(got) == 2 and torch.equal(got["w"], torch.full((4,), 2.0))
        mgr.close()
        elapsed = time.monotonic() - t0
    unreachable = [str(w.message) for w in caught if "unreachable" in str(w.message)
                   and "reading from the other locations" in str(w.message)]
    assert len(unreachable) == 1 and "s3://bkt/run" in unreachable[0]  # warned once
    # a probe (3 s) instead of minutes of client retries, for two saves and every read
    assert elapsed < 30, elapsed


def test_probe_gives_up_on_a_silent_endpoint(aws_env: None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint that accepts connections and never answers: unreachable after the
    connect timeout, not after botocore's 60 s read timeout times its retries."""
    from shardckpt.storage import open_location
    from shardckpt.storage.probe import Unreachable, reachable

    monkeypatch.setenv("SHARDCKPT_CONNECT_TIMEOUT", "1")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        from s3_server import s3_options

        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        loc = open_location("s3://bkt/run", s3_options(url))
        from shardckpt.storage import probe as probe_module

        asked: list[str] = []
        real_http_once = probe_module._http_once
        monkeypatch.setattr(probe_module, "_http_once",
                            lambda *a: asked.append(a[0]) or real_http_once(*a))
        t0 = time.monotonic()
        got = reachable(loc)
        # one probe that waited out the 1 s connect timeout; botocore alone would wait its
        # 60 s read timeout (times its retries)
        assert asked == [url] and time.monotonic() - t0 < 30
        assert isinstance(got, Unreachable) and "no answer within 1 s" in got.why
        with pytest.raises(shardckpt.StorageError, match="unreachable"):
            got.listdir("")
        # remembered: the next look skips the probe
        assert isinstance(reachable(loc), Unreachable) and asked == [url]


def test_cli_read_commands_work_with_a_dead_replica(tmp_path: Path, aws_env: None,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "run"
    saved(root)
    point_s3_at_a_closed_port(monkeypatch)
    dead = ["--replica", "s3://bkt/run"]
    out = tmp_path / "w.safetensors"
    for argv, code in ((["show", str(root)], 0), (["verify", str(root)], 0),
                       (["export", str(root), "--step", "3", "--format", "safetensors",
                         "--out", str(out)], 0),
                       (["diff", f"{root}@1", f"{root}@3"], 0)):
        assert main([*argv, *dead]) == code, argv
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if "s3://bkt/run" in ln]
        assert len(lines) == 1 and "unreachable" in lines[0], (argv, err)
        assert "Traceback" not in err
    assert out.exists()
    assert main(["ls", str(root), *dead, "--json"]) == 2  # a copy is missing: exit 2
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["locations"][1]["health"] == "unreachable" for r in rows)


def test_every_location_down_is_a_storage_error(aws_env: None, tmp_path: Path) -> None:
    mgr = shardckpt.CheckpointManager("s3://bkt/run", storage_options=dead_options())
    with pytest.raises(shardckpt.StorageError, match="no location is reachable"):
        mgr.steps()
    mgr.close()


# --------------------------------------------------------------------- 2. a corrupt newest step


def test_corrupt_newest_is_reported_by_the_cli(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "run"
    saved(root)
    bad = truncate_manifest(root, 3)
    for argv in (["verify", str(root)], ["show", str(root)],
                 ["export", str(root), "--format", "safetensors", "--out",
                  str(tmp_path / "x.safetensors")],
                 ["diff", f"{root}@1", str(root)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert str(bad) in err and "Traceback" not in err, (argv, err)
    assert main(["ls", str(root), "--json"]) == 2
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["health"]) for r in rows] == [(1, "ok"), (2, "ok"), (3, "corrupt")]
    assert main(["ls", str(root)]) == 2
    table = capsys.readouterr().out
    assert any(ln.split()[:2] == ["3", "-"] and "CORRUPT" in ln for ln in table.splitlines())
    # an explicit older step is still there to inspect
    assert main(["verify", str(root), "--step", "2"]) == 0


def test_load_skips_a_corrupt_newest_step_and_says_so(tmp_path: Path) -> None:
    root = tmp_path / "run"
    saved(root)
    truncate_manifest(root, 3)
    with shardckpt.CheckpointManager(str(root)) as mgr:
        assert mgr.steps() == [1, 2]
        got = {"w": torch.zeros(4), "step": 0}
        with pytest.warns(UserWarning, match=r"skipping step\(s\) 3 .*loading step 2"):
            assert mgr.load(got) == 2
        assert got["step"] == 2 and torch.equal(got["w"], torch.full((4,), 2.0))


def test_survey_semantics(tmp_path: Path) -> None:
    root = tmp_path / "run"
    saved(root, (1, 2))
    truncate_manifest(root, 2)
    (root / "step-0000000003").mkdir()  # a save in progress
    from shardckpt.storage import open_location

    found = catalog.survey([open_location(str(root))])
    assert found.committed() == [1]
    assert found.latest_manifest() == 2
    assert list(found.corrupt()) == [2]
    assert found.steps[3].state == ["uncommitted"]


# --------------------------------------------------------------------- 3. save it again


def test_saving_a_corrupt_step_moves_it_aside(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "run"
    saved(root)
    truncate_manifest(root, 3)
    before = sorted(p.name for p in (root / "step-0000000003").iterdir())
    with shardckpt.CheckpointManager(str(root), capture_rng=False) as mgr:
        state = {"w": torch.zeros(4), "step": 0}
        mgr.load(state)
        with pytest.warns(UserWarning, match="moved aside"):
            mgr.save(3, {"w": torch.full((4,), 33.0), "step": 3}, blocking=True)
        assert mgr.steps() == [1, 2, 3]
    aside = [p for p in root.iterdir() if p.name.startswith("step-0000000003.corrupt-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == before
    # ls shows it; a prune within the grace period keeps it, after it reaps it
    assert main(["ls", str(root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["health"]) for r in rows] == [(1, "ok"), (2, "ok"), (3, "aside"),
                                                       (3, "ok")]
    assert rows[2]["dir"].endswith(aside[0].name)
    from shardckpt.prune import prune_location
    from shardckpt.storage import open_location

    loc = open_location(str(root))
    report = prune_location(loc, shardckpt.RetentionPolicy(keep_last=5))
    assert aside[0].name in report.skipped and aside[0].exists()
    report = prune_location(loc, shardckpt.RetentionPolicy(keep_last=5), grace=0)
    assert aside[0].name in report.reaped and not aside[0].exists()
    assert [p.name for p in sorted(root.iterdir()) if p.name.startswith("step-")] == [
        "step-0000000001", "step-0000000002", "step-0000000003"]


def test_a_step_valid_at_a_replica_is_never_moved_aside(tmp_path: Path) -> None:
    """Corrupt at the root but valid at the replica: committed, so saving it again is refused
    everywhere and nothing is moved."""
    root, replica = tmp_path / "a", tmp_path / "b"
    saved(root, (1,), replicas=[str(replica)])
    truncate_manifest(root, 1)
    with shardckpt.CheckpointManager(str(root), replicas=[str(replica)], async_save=False,
                                     capture_rng=False) as mgr:
        assert mgr.steps() == [1]
        with pytest.raises(ValueError, match="already committed"):
            mgr.save(1, {"w": torch.zeros(4), "step": 1})
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == [
        "step-0000000001"]


# --------------------------------------------------------------------- end to end


def _cli(*args: str, env: dict) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "shardckpt", *args], capture_output=True,
                          text=True, timeout=180, env=env)
    return proc, time.monotonic() - t0


def test_job_loses_its_s3_replica_mid_run_and_resumes(tmp_path: Path, s3) -> None:
    root, replica = str(tmp_path / "local"), s3.new_root("run")
    assert s3.proc is not None
    env = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "120"}
    first = run_ranks(R.train_losing_replica, 2, root, replica, s3.storage_options,
                      s3.proc.pid, 2, 4, timeout=300, env=env)
    where = {int(k): v for k, v in first[0]["where"].items()}
    assert where[1] == where[2] == [root, replica]  # both copies while the server lived
    assert where[3] == where[4] == [root]  # then degraded, and the job went on
    assert not s3.alive()

    second = run_ranks(R.resume_without_replica, 2, root, replica, s3.storage_options,
                       timeout=300, env=env)
    for r in second:
        assert r["latest"] == 4 and r["loaded"] == 4 and r["progress"] == 4
        assert r["state"] == first[0]["ref"]
    assert any("unreachable" in w for w in second[0]["warnings"])

    cli_env = {**os.environ, "FSSPEC_S3_ENDPOINT_URL": s3.endpoint_url}
    base, plain = _cli("ls", root, "--json", env=cli_env)
    assert base.returncode == 0
    proc, took = _cli("ls", root, "--replica", replica, "--json", env=cli_env)
    assert proc.returncode == 2 and "unreachable" in proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {r["locations"][1]["health"] for r in rows} == {"unreachable"}
    # the dead replica is reported after a probe of seconds, not the minutes of client
    # retries (a bound far above the probe's 3 s, so that a loaded machine does not flake)
    assert took - plain < 30, (took, plain)
    for argv in (["show", root], ["verify", root]):
        proc, _ = _cli(*argv, "--replica", replica, env=cli_env)
        assert proc.returncode == 0, (argv, proc.stderr)
        assert "unreachable" in proc.stderr
