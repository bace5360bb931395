"""What ``benchmarks/throughput.py`` makes of its repetitions: medians per phase, the ratios the
targets are set on (from the medians, and paired per repetition), the targets, and the notes
that say how to read the figures."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from shardckpt import knobs

from common.rounds import median
from throughput_phases import ALL_PHASES, ASYNC_PHASES

if TYPE_CHECKING:
    from throughput_phases.bench import Bench


def summarize(bench: Bench, reps: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """``medians`` (per phase), ``ratios`` and ``targets`` of the timed repetitions ``reps``.

    Also adds ``async_save_footprint_bytes_per_rank`` to the RSS of each async shardckpt save.
    """
    medians: dict[str, dict[str, Any]] = {}
    phases = [p for p in ALL_PHASES if any(p in r for r in reps)]
    for p in phases:
        ok = [r[p] for r in reps if p in r and "error" not in r[p]]
        if not ok:
            medians[p] = {"error": bench.errors.get(p, "no successful repetition")}
            continue
        m: dict[str, Any] = {"time_s": median([x["time_s"] for x in ok]), "n": len(ok)}
        m["gbps"] = bench.total_bytes / 1e9 / m["time_s"] if m["time_s"] else None
        if p in ASYNC_PHASES:
            m["stall_s"] = median([x["stall_s"] for x in ok])
            m["commit_s"] = m["time_s"]
        if p.startswith("dcp_") and "get_state_dict_s" in ok[0]:
            m["get_state_dict_s"] = median([x.get("get_state_dict_s") for x in ok])
        m["rss_peak_increase_bytes"] = median([x["rss"]["peak_increase_bytes"] for x in ok])
        m["rss_peak_abs_bytes"] = median([x["rss"]["peak_abs_bytes"] for x in ok])
        m["rss_peak_over_reference_bytes"] = median(
            [max(x["rss"]["peak_over_reference_bytes_per_rank"]) for x in ok])
        if "resident_bytes_before" in ok[0]:
            m["resident_bytes_before"] = max(x["resident_bytes_before"] for x in ok)
        if "verified" in ok[0]:
            m["verified"] = all(x["verified"] for x in ok)
        medians[p] = m

    def med(p: str, k: str) -> float | None:
        return medians.get(p, {}).get(k)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def paired(fa: Callable[[dict], float | None], fb: Callable[[dict], float | None],
               pa: str, pb: str) -> list[float | None]:
        out = []
        for r in reps:
            if pa in r and pb in r and "error" not in r[pa] and "error" not in r[pb]:
                out.append(ratio(fa(r[pa]), fb(r[pb])))
        return out

    def t(x: dict) -> float:
        return x["time_s"]

    def s(x: dict) -> float:
        return x["stall_s"]

    budget_ratio_per_rep = []
    held = bench.held or [0] * bench.world
    for r in reps:
        x = r.get("shardckpt_async")
        if x and "error" not in x:
            # what the manager holds between saves + what this save added on top of that
            extra = [inc + (0 if x["rss"].get("first_save") else h) for inc, h in
                     zip(x["rss"]["peak_increase_bytes_per_rank"], held)]
            x["rss"]["async_save_footprint_bytes_per_rank"] = extra
            budget_ratio_per_rep.append(max(
                e / (rb + bench.budget_bytes) for e, rb in zip(extra, bench.all_rank_bytes)))
    spec = [
        # name, value (ratio of medians), per-rep paired ratios, how read
        ("async_stall_over_dcp_async_stall",
         ratio(med("shardckpt_async", "stall_s"), med("dcp_async_save", "stall_s")),
         paired(s, s, "shardckpt_async", "dcp_async_save"),
         "shardckpt async stall / dcp.async_save (thread) stall; lower is better"),
        ("async_stall_over_dcp_async_process_stall",
         ratio(med("shardckpt_async", "stall_s"), med("dcp_async_save_process", "stall_s")),
         paired(s, s, "shardckpt_async", "dcp_async_save_process"),
         "shardckpt async stall / dcp.async_save (process) stall; lower is better"),
        ("async_stall_over_memcpy",
         ratio(med("shardckpt_async", "stall_s"), med("memcpy", "time_s")),
         paired(s, t, "shardckpt_async", "memcpy"),
         "shardckpt async stall / copy into preallocated buffers; lower is better"),
        ("dcp_async_stall_over_memcpy",
         ratio(med("dcp_async_save", "stall_s"), med("memcpy", "time_s")),
         paired(s, t, "dcp_async_save", "memcpy"), "for reference"),
        ("blocking_save_throughput_over_raw_write",
         ratio(med("raw_write", "time_s"), med("shardckpt_blocking", "time_s")),
         paired(t, t, "raw_write", "shardckpt_blocking"),
         "shardckpt blocking save GB/s / raw fsynced write GB/s; higher is better"),
        ("blocking_save_throughput_over_dcp_save",
         ratio(med("dcp_save", "time_s"), med("shardckpt_blocking", "time_s")),
         paired(t, t, "dcp_save", "shardckpt_blocking"),
         "shardckpt blocking save GB/s / dcp.save GB/s; higher is better"),
        ("async_commit_throughput_over_raw_write",
         ratio(med("raw_write", "time_s"), med("shardckpt_async", "commit_s")),
         paired(t, t, "raw_write", "shardckpt_async"), "for reference"),
        ("dcp_save_throughput_over_raw_write",
         ratio(med("raw_write", "time_s"), med("dcp_save", "time_s")),
         paired(t, t, "raw_write", "dcp_save"), "for reference"),
        ("load_throughput_over_dcp_load",
         ratio(med("dcp_load", "time_s"), med("shardckpt_load", "time_s")),
         paired(t, t, "dcp_load", "shardckpt_load"),
         "shardckpt load GB/s / dcp.load (+ set_state_dict) GB/s; higher is better"),
        ("load_throughput_over_raw_read",
         ratio(med("raw_read", "time_s"), med("shardckpt_load", "time_s")),
         paired(t, t, "raw_read", "shardckpt_load"),
         "shardckpt load GB/s / raw read GB/s; higher is better"),
        ("async_peak_rss_over_state_plus_budget",
         median(budget_ratio_per_rep), budget_ratio_per_rep,
         "max over ranks of (bytes the manager keeps between saves, measured across its first "
         "save + peak RSS increase during this async save) / (rank state bytes + memory "
         "budget); lower is better"),
    ]
    ratios = {name: {"value": v, "per_rep": per, "meaning": how} for name, v, per, how in spec}

    def target(name: str, metric: str, op: str, thr: float, text: str) -> dict[str, Any]:
        v = ratios[metric]["value"]
        ok = None if v is None else (v <= thr if op == "<=" else v >= thr)
        return {"name": name, "metric": metric, "value": v, "op": op, "threshold": thr,
                "pass": ok, "target": text}

    targets = [
        target("async stall vs dcp.async_save", "async_stall_over_dcp_async_stall", "<=", 0.2,
               "stall <= 0.2x dcp.async_save stall"),
        target("async stall vs memcpy", "async_stall_over_memcpy", "<=", 3.0,
               "stall <= 3x a copy into preallocated buffers"),
        target("blocking save vs raw write", "blocking_save_throughput_over_raw_write", ">=", 0.9,
               "blocking save >= 0.9x raw fsynced write"),
        target("blocking save vs dcp.save", "blocking_save_throughput_over_dcp_save", ">=", 1.2,
               "blocking save >= 1.2x dcp.save"),
        target("load vs dcp.load", "load_throughput_over_dcp_load", ">=", 1.2,
               "load >= 1.2x dcp.load"),
        target("async peak RSS", "async_peak_rss_over_state_plus_budget", "<=", 1.1,
               "peak RSS during async save <= rank state + budget + 10%"),
    ]
    return {"medians": medians, "ratios": ratios, "targets": targets}


def knob_values() -> dict[str, Any]:
    """Every shardckpt knob's value in this process, by environment variable."""
    out: dict[str, Any] = {}
    for k in knobs.ALL_KNOBS:
        try:
            out[k.env] = k.get()
        except ValueError as exc:
            out[k.env] = f"invalid: {exc}"
    return out


def notes(bench: Bench) -> list[str]:
    """Sentences for the document saying how its figures were made."""
    n = [
        "time_s is the max over ranks of each rank's time between barriers; GB/s = total state "
        "bytes (all ranks, 1e9 B/GB) / time_s",
        "async phases: stall_s = time the save call blocks; commit_s = time_s = call start to "
        "committed (wait()/result() returned)",
        "dcp_* times include get_state_dict (and dcp_load includes set_state_dict), which "
        "shardckpt does inside save/load; get_state_dict_s is reported separately",
        "raw_write/raw_read move the rank's exact state bytes (copied into one flat CPU buffer) "
        "to/from one file per rank in io_chunk_bytes writes; raw_write fsyncs the file and its "
        "directory when fsync is on",
        "memcpy copies every local tensor into preallocated, pre-faulted CPU buffers (one thread "
        "per rank under torchrun's OMP_NUM_THREADS=1)",
        "loads: the state is zeroed (untimed) before each load and compared with the saved "
        "values after it (verified)",
        "rss: sampled every ~5 ms per rank; gc + malloc_trim(0) run (untimed) before and after "
        "every phase so freed heap pages neither hide nor inflate a phase's growth; "
        "peak_increase = peak during the phase - RSS just before it; peak_over_reference = "
        "peak - RSS after setup, before the CheckpointManager existed (drifts if anything "
        "leaks); manager_held_bytes = RSS growth across the manager's first save (buffers it "
        "keeps); the async target uses held + peak_increase",
        "the RSS sampler thread and the 2-core machine mean the benchmark itself competes with "
        "the background writer threads for the GIL and CPU",
    ]
    if bench.args.compression:
        n.append(f"shardckpt uses compression {bench.args.compression}; DCP writes raw bytes")
    if torch.cuda.is_available():
        n.append("CUDA: model on GPU; memcpy is device->pinned host; raw phases use host buffers "
                 "(no device transfer)")
    return n

