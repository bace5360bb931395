"""What operators see of saves: log records, the Prometheus textfile, callbacks, `report`."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import re
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import shardckpt
from shardckpt.cli.main import main
from shardckpt.textfile import escape_label, render_textfile

# ------------------------------------------------------------------ a Prometheus text parser
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)(?: (-?\d+))?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], value)


def _labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        assert m, f"bad label set at {text[pos:]!r}"
        assert m.group(1) not in out, f"duplicate label {m.group(1)}"
        out[m.group(1)] = _unescape(m.group(2))
        pos = m.end()
    return out


def parse_prometheus(text: str) -> dict[str, dict[str, Any]]:
    """Families by name: {"type", "help", "samples": [(labels, value)]}. Asserts the format:
    every line is a HELP, a TYPE or a sample; TYPE comes before the family's samples, at most
    once; values are Prometheus floats; the text ends with a newline."""
    assert text.endswith("\n")
    families: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                fam = families.setdefault(parts[2], {"type": None, "help": None, "samples": []})
                if parts[1] == "TYPE":
                    assert fam["type"] is None and not fam["samples"], line
                    assert parts[3] in _TYPES, line
                    fam["type"] = parts[3]
                else:
                    assert fam["help"] is None, line
                    fam["help"] = parts[3] if len(parts) > 3 else ""
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        assert value in ("NaN", "+Inf", "-Inf") or re.fullmatch(
            r"-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", value), line
        fam = families.setdefault(name, {"type": None, "help": None, "samples": []})
        fam["samples"].append((_labels(labels), float(value)))
    return families


def value_of(families: dict[str, dict[str, Any]], name: str) -> float:
    [(_, value)] = families[name]["samples"]
    return value


def test_prometheus_rendering_escapes_labels_and_help() -> None:
    nasty = 'a "quoted" \\ back\nslash'
    text = render_textfile([
        ("shardckpt_x", "gauge", "help with \\ and\nnewline", [({"root": nasty}, 1.5)]),
        ("shardckpt_empty", "gauge", "left out", []),
        ("shardckpt_odd", "gauge", "specials", [({"k": "v"}, math.nan), ({"k": "w"}, math.inf)]),
    ])
    fams = parse_prometheus(text)
    assert "shardckpt_empty" not in fams
    assert fams["shardckpt_x"]["samples"] == [({"root": nasty}, 1.5)]
    assert fams["shardckpt_x"]["help"] == "help with \\\\ and\\nnewline"
    odd = dict((labels["k"], v) for labels, v in fams["shardckpt_odd"]["samples"])
    assert math.isnan(odd["v"]) and odd["w"] == math.inf
    assert escape_label(nasty) == 'a \\"quoted\\" \\\\ back\\nslash'


# ------------------------------------------------------------------ the manager's side
def _state(n: int = 1000) -> dict[str, Any]:
    return {"w": torch.arange(float(n)), "step": 1}


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("shardckpt") and
            hasattr(r, "shardckpt")]


def test_metrics_textfile_after_save(tmp_path: Path) -> None:
    prom = tmp_path / "train.prom"
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, metrics_path=prom) as mgr:
        first = parse_prometheus(prom.read_text())  # written at construction, before any save
        assert value_of(first, "shardckpt_saves_total") == 0
        assert math.isnan(value_of(first, "shardckpt_last_save_step"))  # present (issue 26)
        before = time.time()
        info = mgr.save(7, _state(), metrics={"loss": 0.5}).wait()
        assert info is not None
    fams = parse_prometheus(prom.read_text())
    for name, fam in fams.items():
        assert name.startswith("shardckpt_"), name
        assert fam["type"] in ("gauge", "counter") and fam["help"], name
        assert (fam["type"] == "counter") == name.endswith("_total"), name
        for labels, _ in fam["samples"]:
            assert labels["root"] == root
    assert value_of(fams, "shardckpt_last_save_step") == 7
    assert value_of(fams, "shardckpt_last_save_bytes") == info.nbytes
    assert value_of(fams, "shardckpt_committed_bytes_total") == info.nbytes
    assert value_of(fams, "shardckpt_saves_total") == 1
    assert value_of(fams, "shardckpt_checkpoints_committed_total") == 1
    assert value_of(fams, "shardckpt_save_failures_total") == 0
    assert value_of(fams, "shardckpt_last_save_success") == 1
    assert value_of(fams, "shardckpt_world_size") == 1
    assert value_of(fams, "shardckpt_last_save_locations") == 1
    assert value_of(fams, "shardckpt_last_save_degraded") == 0
    write = value_of(fams, "shardckpt_last_save_write_seconds")
    stall = value_of(fams, "shardckpt_last_save_stall_seconds")
    assert 0 < write < 60 and 0 < stall < 60
    assert value_of(fams, "shardckpt_last_save_duration_seconds") >= write
    assert value_of(fams, "shardckpt_last_save_throughput_bytes_per_second") == \
        pytest.approx(info.nbytes / write)
    assert before <= value_of(fams, "shardckpt_last_save_timestamp_seconds") <= time.time()
    [(labels, one)] = fams["shardckpt_info"]["samples"]
    assert one == 1 and labels["version"] == shardckpt.__version__
    assert math.isnan(value_of(fams, "shardckpt_last_failure_step"))  # present, no failure
    assert [p.name for p in tmp_path.iterdir() if p.name != "run"] == ["train.prom"]  # no temp


def test_failed_save_counts_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    prom = tmp_path / "m.prom"
    events: list[shardckpt.SaveEvent] = []
    caplog.set_level(logging.INFO, logger="shardckpt")
    with shardckpt.CheckpointManager(str(tmp_path / "run"), metrics_path=str(prom),
                                     callbacks=[events.append]) as mgr:
        mgr.save(1, _state(), blocking=True)
        with pytest.raises(TypeError):
            mgr.save(2, {"bad": object()}, blocking=True)
        with pytest.raises(TypeError):  # async too: a bad state raises from save() itself
            mgr.save(3, {"bad": object()})
        fams = parse_prometheus(prom.read_text())  # already written when save() raised
        assert value_of(fams, "shardckpt_saves_total") == 3
        assert value_of(fams, "shardckpt_save_failures_total") == 2
        assert value_of(fams, "shardckpt_checkpoints_committed_total") == 1
        assert value_of(fams, "shardckpt_last_save_success") == 0
        assert value_of(fams, "shardckpt_last_failure_step") == 3
        assert value_of(fams, "shardckpt_last_save_step") == 1  # the last *committed* one
    assert [(e.step, e.ok) for e in events] == [(1, True), (2, False), (3, False)]
    assert events[1].error_type == "TypeError" and "bad" in (events[1].error or "")
    assert events[1].nbytes == 0 and events[1].gbps == 0
    warnings = [r for r in _records(caplog) if r.levelno == logging.WARNING]
    assert [r.shardckpt["step"] for r in warnings] == [2, 3]
    assert all(r.shardckpt["ok"] is False and r.shardckpt["event"] == "save_failed"
               for r in warnings)
    assert "FAILED" in warnings[0].getMessage()


def test_one_structured_info_record_per_save(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    root = "memory://operator:hunter2@obs-bucket/run"  # credentials must never be logged
    caplog.set_level(logging.DEBUG, logger="shardckpt")
    with shardckpt.CheckpointManager(root, async_save=True) as mgr:
        infos = [mgr.save(s, _state(2000), metrics={"loss": 1.0 / s}).wait() for s in (1, 2)]
        mgr.save(3, _state(), blocking=True)
    records = [r for r in _records(caplog) if r.levelno == logging.INFO]
    assert [r.shardckpt["step"] for r in records] == [1, 2, 3]
    assert all(r.name == "shardckpt.save" for r in records)
    for r, info in zip(records, infos):
        d = r.shardckpt
        assert d["event"] == "save" and d["ok"] is True and d["error"] is None
        assert d["bytes"] == info.nbytes
        assert d["locations"] == ["memory://obs-bucket/run"]
        assert d["world_size"] == 1 and d["degraded"] is False and d["blocking"] is False
        assert d["stall_s"] >= 0 and d["write_s"] > 0 and d["total_s"] >= d["write_s"]
        assert d["gbps"] == pytest.approx(info.nbytes / d["write_s"] / 1e9)
        assert d["metrics"] == {"loss": 1.0 / d["step"]}
        json.dumps(d)  # ready for a JSON log pipeline
        msg = r.getMessage()
        assert f"step {d['step']}" in msg and "stalled" in msg
    assert records[2].shardckpt["blocking"] is True
    # a blocking save stalls its caller for the whole save
    assert records[2].shardckpt["stall_s"] >= records[2].shardckpt["write_s"]
    for r in caplog.records:
        assert "hunter2" not in r.getMessage() and "hunter2" not in json.dumps(
            getattr(r, "shardckpt", None))
    # the library leaves handlers to the application
    assert logging.getLogger("shardckpt").handlers == []
    assert logging.getLogger("shardckpt.save").handlers == []


def test_callbacks_get_events_and_a_raising_one_breaks_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[shardckpt.SaveEvent] = []

    def broken(event: shardckpt.SaveEvent) -> None:
        raise RuntimeError("callback bug near s3://AKIAKEY:topsecret@bucket/x")

    caplog.set_level(logging.INFO, logger="shardckpt")
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, callbacks=(broken, seen.append)) as mgr:
        handle = mgr.save(5, _state(), metrics={"loss": 2.0}, tags=("pinned",))
        info = handle.wait()  # the callbacks ran before the handle resolved
        assert [e.step for e in seen] == [5]
        mgr.save(6, _state(), blocking=True)
        assert mgr.steps() == [5, 6]
    assert info is not None
    ev = seen[0]
    assert isinstance(ev, shardckpt.SaveEvent) and ev.ok and ev.nbytes == info.nbytes
    assert ev.locations == (root,) and ev.tags == ("pinned",) and ev.metrics == {"loss": 2.0}
    assert ev.throughput == pytest.approx(ev.nbytes / ev.write_s)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.step = 9  # type: ignore[misc]
    complaints = [r for r in caplog.records if "save callback" in r.getMessage()]
    assert len(complaints) == 2 and all(r.levelno == logging.WARNING for r in complaints)
    assert all("topsecret" not in r.getMessage() and r.exc_info is None for r in complaints)
    assert "RuntimeError" in complaints[0].getMessage()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        shardckpt.CheckpointManager(str(tmp_path / "a"), callbacks=[1])
    with pytest.raises(TypeError):
        shardckpt.CheckpointManager(str(tmp_path / "b"), callbacks=print)
    with pytest.raises(ValueError):
        shardckpt.CheckpointManager(str(tmp_path / "c"), metrics_path="s3://bucket/m.prom")


def test_unwritable_metrics_file_never_fails_a_save(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shardckpt")
    bad = tmp_path / "no" / "such" / "dir" / "m.prom"
    with shardckpt.CheckpointManager(str(tmp_path / "run"), metrics_path=bad) as mgr:
        mgr.save(1, _state(), blocking=True)
        assert mgr.steps() == [1]
    assert any("metrics file" in r.getMessage() for r in caplog.records)


def test_manifest_records_save_timing(tmp_path: Path) -> None:
    with shardckpt.CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.save(1, _state()).wait()
        mgr.save(2, _state(), blocking=True)
        t1, t2 = (mgr.manifest(s) for s in (1, 2))
    for m in (t1, t2):
        t = m.extra["timing"]
        assert t["called_unix_time"] <= t["ready_unix_time"] <= m.unix_time
    assert t1.extra["timing"]["blocking"] is False and t1.extra["timing"]["stall_s"] >= 0
    assert t2.extra["timing"]["blocking"] is True and t2.extra["timing"]["stall_s"] is None


# ------------------------------------------------------------------ two ranks
def _two_rank_target(rank: int, world_size: int, root: str, prom_dir: str) -> dict[str, Any]:
    events: list[Any] = []
    path = f"{prom_dir}/rank{rank}.prom"
    with shardckpt.CheckpointManager(root, metrics_path=path,
                                     callbacks=[events.append]) as mgr:
        mgr.save(1, {"w": torch.full((64,), float(rank))}, blocking=True)
        mgr.save(2, {"w": torch.full((64,), float(rank))}).wait()
    return {"events": [[e.step, e.ok, e.world_size, e.nbytes] for e in events]}


def test_only_rank_zero_observes(tmp_path: Path) -> None:
    from harness import run_ranks

    root, prom_dir = tmp_path / "run", tmp_path / "prom"
    prom_dir.mkdir()
    results = run_ranks(_two_rank_target, 2, str(root), str(prom_dir), timeout=120)
    nbytes = shardckpt.CheckpointManager(str(root)).info(2).nbytes
    assert results[0]["events"] == [[1, True, 2, results[0]["events"][0][3]], [2, True, 2, nbytes]]
    assert results[1]["events"] == []
    assert sorted(p.name for p in prom_dir.iterdir()) == ["rank0.prom"]
    fams = parse_prometheus((prom_dir / "rank0.prom").read_text())
    assert value_of(fams, "shardckpt_world_size") == 2
    assert value_of(fams, "shardckpt_last_save_bytes") == nbytes


# ------------------------------------------------------------------ shardckpt report
@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> str:
    from shardckpt.storage import open_location
    from shardckpt.verify.record import write_record

    root = str(tmp_path_factory.mktemp("report") / "run")
    with shardckpt.CheckpointManager(root) as mgr:
        for i, step in enumerate((10, 20, 30, 40)):
            mgr.save(step, {"w": torch.randn(500 * (i + 1))},
                     metrics={"loss": 1.0 / step, "nan": math.nan},
                     tags=("pinned",) if step == 20 else ("best",) if step == 30 else ()).wait()
        manifest = mgr.manifest(30)
    write_record(open_location(root), manifest, {"ok": True, "exit_code": 0, "nproc": 1}, None)
    return root


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_report_writes_a_png(history: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    import matplotlib.image

    out = tmp_path / "history.png"
    assert main(["report", history, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and captured.err == ""
    width, height = _png_size(out.read_bytes())
    assert width >= 400 and height >= 400
    assert matplotlib.image.imread(str(out)).shape[:2] == (height, width)


def test_report_html_embeds_the_png(history: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "history.html"
    assert main(["report", history, "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert m is not None
    assert _png_size(base64.b64decode(m.group(1))) == (doc["width"], doc["height"])
    assert doc["format"] == "html" and doc["out"] == str(out)
    assert [r["step"] for r in doc["steps"]] == [10, 20, 30, 40]
    assert doc["pinned"] == [20] and doc["metrics"] == ["loss"]
    assert doc["metrics_without_finite_values"] == ["nan"]
    assert doc["steps_with_timing"] == [10, 20, 30, 40]
    assert doc["verified"] == {"10": None, "20": None, "30": "ok", "40": None}
    by_step = {r["step"]: r for r in doc["steps"]}
    assert by_step[30]["tags"] == ["best"] and by_step[20]["pinned"] is True
    for r in doc["steps"]:
        assert r["nbytes"] > 0 and r["save_s"] >= r["write_s"] >= 0
        assert r["metrics"]["nan"] == "nan"
    assert "<td>best</td>" in page


def test_report_usage_errors(history: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv in (["report", history, "--out", str(tmp_path / "x.svg")],
                 ["report", history, "--out", str(tmp_path / "nodir" / "x.png")],
                 ["report", history, "--out", str(tmp_path / "x.png"), "--metric", "nope"],
                 ["report", str(empty), "--out", str(tmp_path / "x.png")],
                 ["report", history]):
        assert main(argv) == 64, argv
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, argv
    assert not (tmp_path / "x.png").exists()
