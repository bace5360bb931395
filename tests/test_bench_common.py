"""The shared benchmark pieces in ``benchmarks/common/`` and the split ``benchmarks/throughput.py``.

The pieces are what every benchmark script builds on (machine description, RSS of a process
tree, page-cache eviction, interleaved rounds, JSON output, one timed phase over ranks); the
last test runs ``throughput.py`` end to end at a tiny size and checks its JSON document.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from harness import run_ranks, run_torchrun

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))  # spawned ranks inherit sys.path, so they can import it too
from common import machine, output, pagecache, rounds  # noqa: E402
from common.rss import RssSampler, tree_rss_bytes  # noqa: E402

MB = 1 << 20


def test_the_light_modules_load_without_torch() -> None:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "import common.output, common.rounds, common.rss, common.pagecache, common.machine; "
            "assert 'torch' not in sys.modules and 'shardckpt' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(BENCH)], check=True, timeout=60)


# ------------------------------------------------------------------------------ rounds
def test_interleaved_rounds_rotate_the_order_each_round() -> None:
    calls: list[tuple[str, int]] = []

    def run(name: str, rep: int) -> float:
        calls.append((name, rep))
        return {"a": 1.0, "b": 2.0, "c": 3.0}[name] + rep

    got = rounds.interleaved_rounds(["a", "b", "c"], 3, run)
    assert [n for n, _ in calls] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert got == {"a": [1.0, 2.0, 3.0], "b": [2.0, 3.0, 4.0], "c": [3.0, 4.0, 5.0]}
    assert rounds.medians(got) == {"a": 2.0, "b": 3.0, "c": 4.0}
    order: list[str] = []
    rounds.interleaved_rounds(["x", "y"], 3, lambda n, r: order.append(n))
    assert order == ["x", "y", "y", "x", "x", "y"]  # two variants alternate
    assert rounds.rotate(["x", "y"], 1) == ["y", "x"] and rounds.rotate([], 5) == []


def test_median_ignores_missing_values() -> None:
    assert rounds.median([3.0, None, 1.0, 2.0]) == 2.0
    assert rounds.median([None, None]) is None
    assert rounds.median([]) is None


# ------------------------------------------------------------------------------ RSS
def test_rss_sampler_sees_the_process_and_its_children() -> None:
    # the child fills 64 MiB, says so, and waits for stdin to close
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; b = b'x' * (64 << 20); print('ready', flush=True); "
                               "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        with RssSampler() as rss:
            grown = b"y" * (64 * MB)  # written, so every page is resident
        assert rss.peak - rss.before >= 48 * MB, (rss.before, rss.peak)
        assert rss.children_peak >= 48 * MB
        assert rss.tree_peak >= rss.before + rss.children_peak - 8 * MB
        assert rss.samples >= 1
        assert tree_rss_bytes() >= 96 * MB
        del grown
    finally:
        child.kill()
        child.communicate()


# ------------------------------------------------------------------------------ page cache
def test_page_cache_counts_resident_bytes_of_files_and_directories(tmp_path: Path) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"a" * (3 * page + 1))  # just written: in the page cache
    (tmp_path / "sub" / "b.bin").write_bytes(b"b" * page)
    (tmp_path / "empty").write_bytes(b"")
    assert sorted(pagecache.files_under(str(tmp_path))) == sorted(
        str(p) for p in (tmp_path / "a.bin", tmp_path / "sub" / "b.bin", tmp_path / "empty"))
    assert pagecache.resident_bytes([str(tmp_path / "a.bin")]) == 4 * page
    assert pagecache.resident_bytes([str(tmp_path)]) == 5 * page
    off = pagecache.PageCache(enabled=False)
    assert off.method == "none" and "not dropped" in off.note
    assert off.evict([str(tmp_path)]) == 5 * page  # nothing evicted


def test_page_cache_falls_back_to_fadvise_when_drop_caches_is_denied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied() -> None:
        raise PermissionError(13, "Permission denied", "/proc/sys/vm/drop_caches")

    monkeypatch.setattr(pagecache, "_drop_caches", denied)
    advised: list[list[str]] = []
    monkeypatch.setattr(pagecache, "_fadvise_out", advised.append)
    cache = pagecache.PageCache(enabled=True)
    assert cache.method == "fadvise"
    assert "drop_caches denied" in cache.note and "Permission denied" in cache.note
    f = tmp_path / "x.bin"
    f.write_bytes(b"x" * 10)
    # the eviction itself is faked here: the file just written is still resident (its page)
    assert cache.evict([str(f)]) == os.sysconf("SC_PAGE_SIZE")
    assert advised == [[str(f)]]


def test_page_cache_uses_drop_caches_where_it_may(monkeypatch: pytest.MonkeyPatch) -> None:
    dropped: list[int] = []
    monkeypatch.setattr(pagecache, "_drop_caches", lambda: dropped.append(1))
    cache = pagecache.PageCache(enabled=True)
    assert cache.method == "drop_caches" and "drop_caches" in cache.note
    cache.evict([])
    assert dropped == [1, 1]  # once to find out, once per evict


# ------------------------------------------------------------------------------ machine
def test_machine_info_describes_host_disk_and_code(tmp_path: Path) -> None:
    info = machine.machine_info(str(tmp_path), fsync=False)
    assert list(info) == ["hostname", "platform", "python", "cpu_count", "cpu_affinity",
                          "cpu_model", "ram_bytes", "torch", "torch_threads_per_rank",
                          "shardckpt", "cuda", "gpu", "disk_path", "disk", "fsync",
                          "loadavg_at_start"]
    assert info["fsync"] is False and info["ram_bytes"] > 0 and len(info["loadavg_at_start"]) == 3
    assert info["disk"]["mount_point"] and info["disk"]["free_bytes"] > 0
    assert "fsync" not in machine.machine_info(str(tmp_path))
    git = machine.git_info()
    assert git["commit"] and set(git) == {"commit", "package_dirty_files", "package_diff_sha1",
                                          "note"}


# ------------------------------------------------------------------------------ output
def test_write_outputs_keeps_the_json_when_the_figure_fails(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    doc = {"a": 1, "path": tmp_path}  # a Path is written as its str
    drawn: list[tuple[dict[str, Any], str]] = []
    text = output.write_outputs(doc, out=str(tmp_path / "r.json"), plot=str(tmp_path / "r.png"),
                                draw=lambda d, p: drawn.append((d, p)))
    assert drawn == [(doc, str(tmp_path / "r.png"))]
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1, "path": str(tmp_path)}
    assert json.loads(capfd.readouterr().out) == json.loads(text)

    def broken(d: dict[str, Any], p: str) -> None:
        raise ImportError("no matplotlib")

    output.write_outputs({"b": 2}, out=str(tmp_path / "s.json"), plot="x.png", draw=broken)
    captured = capfd.readouterr()
    assert json.loads(captured.out) == {"b": 2}
    assert "plot failed: ImportError: no matplotlib" in captured.err
    assert json.loads((tmp_path / "s.json").read_text()) == {"b": 2}


# ------------------------------------------------------------------------------ phase (2 ranks)
def measured_phases(rank: int, world: int) -> dict[str, Any]:
    from common.phase import measure_phase

    def fails_on_rank_1() -> dict[str, float]:
        if rank == 1:
            raise ValueError("boom on 1")
        return {"time_s": 0.5, "stall_s": 0.1}

    failed = measure_phase("p", fails_on_rank_1, keys=["time_s", "stall_s"],
                           total_bytes=10**9, rss_reference=0)
    ok = measure_phase("q", lambda: {"time_s": 1.0 + rank, "stall_s": 0.25 * (rank + 1)},
                       keys=["time_s", "stall_s"], total_bytes=2 * 10**9, rss_reference=0)
    return {"failed": failed.result, "failed_error": failed.error, "ok": ok.result}


def test_measure_phase_takes_the_max_over_ranks_and_reports_a_rank_that_failed() -> None:
    r0, r1 = run_ranks(measured_phases, 2, timeout=120)
    ok = r0["ok"]
    assert ok == r1["ok"]
    assert ok["time_s"] == 2.0 and ok["time_s_per_rank"] == [1.0, 2.0]
    assert ok["stall_s"] == 0.5 and ok["stall_s_per_rank"] == [0.25, 0.5]
    assert ok["gbps"] == 1.0 and ok["commit_s"] == 2.0 and "error" not in ok
    assert all(len(v) == 2 for k, v in ok["rss"].items() if k.endswith("_per_rank"))
    assert ok["rss"]["peak_abs_bytes"] >= max(ok["rss"]["before_bytes_per_rank"])
    for r in (r0, r1):
        failed = r["failed"]
        assert failed["failed_ranks"] == [1] and failed["gbps"] is None
        assert failed["stall_s_per_rank"] == [0.1, None] and failed["stall_s"] == 0.1
    assert r0["failed"]["error"] == "failed on rank(s) [1]" and r0["failed_error"] is None
    assert r1["failed"]["error"] == r1["failed_error"] == "ValueError: boom on 1"


# ------------------------------------------------------------------------------ throughput.py
DOC_KEYS = ["benchmark", "created", "command", "git", "machine", "config", "cache", "medians",
            "ratios", "targets", "errors", "warmup", "results", "notes", "wall_s"]


def test_throughput_benchmark_runs_end_to_end_with_its_documented_keys(tmp_path: Path) -> None:
    phases = ["memcpy", "raw_write", "shardckpt_async", "dcp_save", "dcp_async_save", "raw_read",
              "shardckpt_load", "dcp_load"]
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    proc = run_torchrun(BENCH / "throughput.py", 2, [
        "--size-gb", "0.005", "--width", "256", "--reps", "2", "--warmup-reps", "0",
        "--dir", str(tmp_path / "ck"), "--no-fsync", "--no-drop-caches",
        "--phases", ",".join(phases), "--out", str(out), "--plot", str(png)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)  # stdout holds the document alone
    assert doc == json.loads(out.read_text())
    assert list(doc) == DOC_KEYS
    assert doc["errors"] == {} and doc["config"]["phases"] == phases
    assert list(doc["results"]) == phases and all(len(v) == 2 for v in doc["results"].values())
    assert [sorted(o) for o in doc["config"]["order_per_rep"]] == [sorted(phases)] * 2
    assert doc["config"]["order_per_rep"][0] != doc["config"]["order_per_rep"][1]  # rotated
    assert doc["medians"]["shardckpt_load"]["verified"] is True
    assert doc["medians"]["dcp_load"]["verified"] is True
    assert doc["cache"]["method"] == "none" and doc["machine"]["fsync"] is False
    assert len(doc["targets"]) == 7 and doc["ratios"]["async_stall_over_memcpy"]["value"] > 0
    assert doc["ratios"]["async_stall_over_dcp_async_process_stall"]["value"] is None  # not run
    assert all(r["rss"]["async_save_footprint_bytes_per_rank"]
               for r in doc["results"]["shardckpt_async"])
    assert doc["config"]["manager_held_bytes_per_rank"] is not None
    assert png.read_bytes().startswith(b"\x89PNG")


def test_cli_startup_benchmark_runs_and_reports_the_targets() -> None:
    import json
    import subprocess

    done = subprocess.run([sys.executable, str(BENCH / "cli_startup.py"), "--steps", "2",
                           "--reps", "1"], capture_output=True, text=True, timeout=300,
                          cwd=str(BENCH))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert set(doc["seconds"]) == {"python_pass", "help", "ls", "show", "prune_dry_run"}
    assert doc["ratio_to_python_pass"]["python_pass"] == 1.0
    assert all(v and v > 0 for v in doc["peak_rss_bytes"].values())
    assert set(doc["targets"]) == {"help_within_few_times_python_pass", "ls_under_1s",
                                   "ls_peak_rss_under_100MB"}
