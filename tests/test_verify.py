"""``shardckpt verify`` end to end: 1 rank, a torchrun job, a self-launched job, and failures.

One FSDP2 checkpoint with golden batches is saved at 2 ranks for the whole module; tests that
damage it work on copies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import verify_targets as V
from harness import TESTS_DIR, run_ranks, run_torchrun

import shardckpt
from shardckpt.cli.main import main
from shardckpt.verify.replay import Diff, compare

ENV = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
MODEL = "verify_targets:build_model"
PHASES = ["integrity", "completeness", "reassembly", "replay", "environment"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("verify") / "ckpt")
    run_ranks(V.save_with_golden, 2, root, timeout=240, env=ENV)
    return root


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_all_ok(doc: dict, nproc: int) -> None:
    assert doc["ok"] is True and doc["step"] == V.STEP, doc
    assert [c["name"] for c in doc["checks"]] == PHASES
    assert all(c["ok"] and not c["skipped"] for c in doc["checks"]), doc["checks"]
    assert doc["nproc"] == nproc and doc["saved_world_size"] == 2
    replay = doc["checks"][3]
    assert [b["batch"] for b in replay["batches"]] == [0, 1, 2]
    assert all(b["max_abs"] == 0 and b["ranks_agree"] for b in replay["batches"])


def damaged_copy(saved: str, tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "ckpt"
    shutil.copytree(saved, root)
    step_dir = root / f"step-{V.STEP:010d}"
    return step_dir, json.loads((step_dir / "manifest.json").read_text())


def test_one_rank_then_ls_shows_verified(saved: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "verify", saved, "--model", MODEL, "--json")
    assert code == 0, err
    assert_all_ok(json.loads(out), nproc=1)
    record = json.loads(Path(saved, f"step-{V.STEP:010d}", "verification.json").read_text())
    assert record["ok"] is True and record["nproc"] == 1 and record["shardckpt_version"]
    code, out, _ = cli(capsys, "ls", saved, "--json")
    assert code == 0 and json.loads(out)[0]["verified"] == "ok"
    code, out, _ = cli(capsys, "verify", saved, "--no-record")  # no model: replay skipped
    assert code == 0 and "replay" in out and "skipped" in out


def test_two_ranks_under_torchrun(saved: str, tmp_path: Path) -> None:
    script = tmp_path / "verify_main.py"
    script.write_text("import sys\nfrom shardckpt.cli.main import main\n"
                      "sys.exit(main(sys.argv[1:]))\n")
    proc = run_torchrun(script, 2, ["verify", saved, "--model", MODEL, "--json", "--no-record"],
                        timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert_all_ok(json.loads(proc.stdout), nproc=2)  # rank 0 alone printed


def test_three_ranks_self_launched(saved: str) -> None:
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(
        [str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "shardckpt", "verify", saved, "--model", MODEL,
                           "--nproc", "3", "--json", "--no-record"], capture_output=True,
                          text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert_all_ok(doc, nproc=3)
    assert "read by 3 ranks" in doc["checks"][0]["detail"]


def test_changed_model_is_a_mismatch(saved: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "verify", saved, "--model", "verify_targets:build_changed_model",
                         "--json", "--no-record")
    assert code == 1, err
    doc = json.loads(out)
    replay = doc["checks"][3]
    assert doc["ok"] is False and replay["ok"] is False and doc["checks"][2]["ok"] is True
    assert doc["first_offending"]["batch"] == 0 and doc["first_offending"]["rank"] == 0
    assert doc["first_offending"]["path"] == "output['logits']"
    assert "batch 0" in replay["detail"]
    assert replay["batches"][2]["ok"]  # empty sequences: nothing to differ
    assert len(err.strip().splitlines()) == 1 and "batch 0" in err
    code, out, err = cli(capsys, "verify", saved, "--model", "verify_targets:build_changed_model",
                         "--atol", "1e3", "--json", "--no-record")  # the CLI's tolerance wins
    assert code == 0, err
    assert json.loads(out)["checks"][3]["mode"] == "atol=1000 rtol=0"


def test_flipped_byte_is_an_integrity_error(saved: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    step_dir, _ = damaged_copy(saved, tmp_path)
    with shardckpt.CheckpointManager(str(step_dir.parent)) as mgr:
        meta = mgr.manifest(V.STEP, pieces=True).resolve("model/blocks.0.up.weight")
    assert meta is not None
    file, offset = meta.pieces[0].file, meta.pieces[0].chunks[0].offset
    data = bytearray((step_dir / file).read_bytes())
    data[offset + 5] ^= 0x10
    (step_dir / file).write_bytes(bytes(data))
    code, out, err = cli(capsys, "verify", str(step_dir.parent), "--model", MODEL, "--json")
    assert code == 2, err
    doc = json.loads(out)
    integrity = doc["checks"][0]
    assert not integrity["ok"] and file in integrity["detail"] and "checksum" in integrity["detail"]
    assert [b["file"] for b in integrity["bad_files"]] == [file]
    assert doc["checks"][2]["skipped"] and doc["checks"][3]["skipped"]
    code, out, _ = cli(capsys, "ls", str(step_dir.parent), "--json")
    assert json.loads(out)[0]["verified"] == "failed"


def test_deleted_shard_is_an_integrity_error(saved: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    step_dir, manifest = damaged_copy(saved, tmp_path)
    victim = sorted(manifest["files"])[-1]
    (step_dir / victim).unlink()
    code, out, err = cli(capsys, "verify", str(step_dir.parent))
    assert code == 2
    assert victim in out and "missing" in out and "FAILED" in out
    assert len(err.strip().splitlines()) == 1 and victim in err


@pytest.mark.parametrize("args, code", [
    (("--model", "nosuch.module:fn"), 64),
    (("--model", "verify_targets"), 64),
    (("--model", "verify_targets:no_such_function"), 64),
    (("--atol", "-1"), 64),
    (("--step", "4"), 2),
])
def test_errors_are_one_line(saved: str, capsys: pytest.CaptureFixture[str], args: tuple,
                             code: int) -> None:
    got, out, err = cli(capsys, "verify", saved, *args, "--no-record")
    assert got == code, err
    assert out == "" and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_root_is_a_usage_error(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "verify", str(tmp_path / "nothing"), "--model", MODEL)
    assert code == 64 and out == "" and len(err.strip().splitlines()) == 1


def test_compare_bitwise_and_tolerances() -> None:
    nan = torch.tensor([float("nan"), 1.0])
    neg_nan = torch.tensor([-float("nan"), 1.0])
    cases = [  # (got, want, atol, rtol, ok)
        (nan, nan.clone(), 0.0, 0.0, True),              # NaN == NaN with the same bits
        (neg_nan, nan, 0.0, 0.0, False),                 # ... but not with other bits
        (neg_nan, nan, 1e-6, 0.0, True),                 # with tolerances NaN matches NaN
        (torch.tensor([-0.0]), torch.tensor([0.0]), 0.0, 0.0, False),
        (torch.tensor([1.0 + 1e-6]), torch.tensor([1.0]), 0.0, 1e-5, True),
        (torch.tensor([1.1]), torch.tensor([1.0]), 0.05, 0.0, False),
        (torch.tensor([float("inf")]), torch.tensor([float("inf")]), 1e-3, 0.0, True),
        ({"a": [torch.ones(2)]}, {"a": [torch.ones(3)]}, 0.0, 0.0, False),
        (torch.ones(2, dtype=torch.int64), torch.ones(2), 1.0, 1.0, False),  # dtype differs
    ]
    for got, want, atol, rtol, ok in cases:
        diff = Diff()
        compare(got, want, atol, rtol, "output", diff)
        assert (diff.path is None) == ok, (got, want, atol, rtol, diff)
    diff = Diff()
    compare(torch.tensor([[1.0, 2.0], [3.0, 5.0]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
            0.0, 0.0, "out", diff)
    assert diff.max_abs == 1.0 and diff.max_rel == 0.25 and "[1, 1]" in diff.reason
