"""What ``benchmarks/throughput.py`` makes of its repetitions: medians per phase, the ratios the
targets are set on (from the medians, and paired per repetition), the targets, and the notes
that say how to read the figures."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from shardckpt import knobs

from common.rounds import median
from throughput_phases import ALL_PHASES, ASYNC_PHASES

if TYPE_CHECKING:
    from throughput_phases.bench import Bench


#: name, (phase, key) over (phase, key), how to read it. Throughput ratios put the times the
#: other way round: X GB/s over Y GB/s is Y's time over X's.
RATIOS = [
    ("async_stall_over_dcp_async_stall", ("shardckpt_async", "stall_s"),
     ("dcp_async_save", "stall_s"),
     "shardckpt async stall / dcp.async_save (thread) stall; lower is better"),
    ("async_stall_over_dcp_async_process_stall", ("shardckpt_async", "stall_s"),
     ("dcp_async_save_process", "stall_s"),
     "shardckpt async stall / dcp.async_save (process) stall; lower is better"),
    ("async_stall_over_memcpy", ("shardckpt_async", "stall_s"), ("memcpy", "time_s"),
     "shardckpt async stall / copy into preallocated buffers; lower is better"),
    ("dcp_async_stall_over_memcpy", ("dcp_async_save", "stall_s"), ("memcpy", "time_s"),
     "for reference"),
    ("blocking_save_throughput_over_raw_write", ("raw_write", "time_s"),
     ("shardckpt_blocking", "time_s"),
     "shardckpt blocking save GB/s / raw fsynced write GB/s; higher is better"),
    ("blocking_save_throughput_over_dcp_save", ("dcp_save", "time_s"),
     ("shardckpt_blocking", "time_s"),
     "shardckpt blocking save GB/s / dcp.save GB/s; higher is better"),
    ("blocking_save_time_over_async_save_and_wait", ("shardckpt_blocking", "time_s"),
     ("shardckpt_async", "time_s"),
     "shardckpt blocking save time / async save + wait() time; lower is better"),
    ("async_commit_throughput_over_raw_write", ("raw_write", "time_s"),
     ("shardckpt_async", "commit_s"), "for reference"),
    ("dcp_save_throughput_over_raw_write", ("raw_write", "time_s"), ("dcp_save", "time_s"),
     "for reference"),
    ("load_throughput_over_dcp_load", ("dcp_load", "time_s"), ("shardckpt_load", "time_s"),
     "shardckpt load GB/s / dcp.load (+ set_state_dict) GB/s; higher is better"),
    ("load_throughput_over_raw_read", ("raw_read", "time_s"), ("shardckpt_load", "time_s"),
     "shardckpt load GB/s / raw read GB/s; higher is better"),
]
RSS_RATIO = "async_peak_rss_over_state_plus_budget"
RSS_MEANING = ("max over ranks of (bytes the manager keeps between saves, measured across its "
               "first save + peak RSS increase during this async save) / (rank state bytes + "
               "memory budget); lower is better")

#: name, ratio, op, threshold, the target as the issue set it.
TARGETS = [
    ("async stall vs dcp.async_save", "async_stall_over_dcp_async_stall", "<=", 0.2,
     "stall <= 0.2x dcp.async_save stall"),
    ("async stall vs memcpy", "async_stall_over_memcpy", "<=", 3.0,
     "stall <= 3x a copy into preallocated buffers"),
    ("blocking save vs raw write", "blocking_save_throughput_over_raw_write", ">=", 0.9,
     "blocking save >= 0.9x raw fsynced write"),
    ("blocking save vs dcp.save", "blocking_save_throughput_over_dcp_save", ">=", 1.2,
     "blocking save >= 1.2x dcp.save"),
    ("blocking save vs async save + wait", "blocking_save_time_over_async_save_and_wait", "<=",
     1.1, "blocking save <= 1.1x (async save + wait)"),
    ("load vs dcp.load", "load_throughput_over_dcp_load", ">=", 1.2, "load >= 1.2x dcp.load"),
    ("async peak RSS", RSS_RATIO, "<=", 1.1,
     "peak RSS during async save <= rank state + budget + 10%"),
]

Reps = list[dict[str, dict[str, Any]]]


def summarize(bench: Bench, reps: Reps) -> dict[str, Any]:
    """``medians`` (per phase), ``ratios`` and ``targets`` of the timed repetitions ``reps``.

    Also adds ``async_save_footprint_bytes_per_rank`` to the RSS of each async shardckpt save.
    """
    medians = phase_medians(bench, reps)
    ratios = {name: {"value": _ratio(medians.get(a[0], {}).get(a[1]),
                                     medians.get(b[0], {}).get(b[1])),
                     "per_rep": _paired(reps, a, b), "meaning": how}
              for name, a, b, how in RATIOS}
    per_rep = rss_over_budget(bench, reps)
    ratios[RSS_RATIO] = {"value": median(per_rep), "per_rep": per_rep, "meaning": RSS_MEANING}
    targets = []
    for name, metric, op, thr, text in TARGETS:
        v = ratios[metric]["value"]
        ok = None if v is None else (v <= thr if op == "<=" else v >= thr)
        targets.append({"name": name, "metric": metric, "value": v, "op": op, "threshold": thr,
                        "pass": ok, "target": text})
    return {"medians": medians, "ratios": ratios, "targets": targets}


def phase_medians(bench: Bench, reps: Reps) -> dict[str, dict[str, Any]]:
    """Per phase, medians over the repetitions where it succeeded (or its ``error``)."""
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
    return medians


def rss_over_budget(bench: Bench, reps: Reps) -> list[float]:
    """Per repetition with a successful async shardckpt save: the worst rank's (bytes the manager
    holds between saves + this save's peak RSS increase) / (rank state + memory budget).

    Records the numerator per rank as ``async_save_footprint_bytes_per_rank`` in that save's RSS.
    """
    out = []
    held = bench.held or [0] * bench.world
    for r in reps:
        x = r.get("shardckpt_async")
        if x and "error" not in x:
            # what the manager holds between saves + what this save added on top of that
            extra = [inc + (0 if x["rss"].get("first_save") else h) for inc, h in
                     zip(x["rss"]["peak_increase_bytes_per_rank"], held)]
            x["rss"]["async_save_footprint_bytes_per_rank"] = extra
            out.append(max(
                e / (rb + bench.budget_bytes) for e, rb in zip(extra, bench.all_rank_bytes)))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _paired(reps: Reps, a: tuple[str, str], b: tuple[str, str]) -> list[float | None]:
    """The ratio within each repetition where both phases succeeded."""
    return [_ratio(r[a[0]][a[1]], r[b[0]][b[1]]) for r in reps
            if a[0] in r and b[0] in r and "error" not in r[a[0]] and "error" not in r[b[0]]]


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
        "shardckpt_async runs the manager's default snapshot mode, eager: every tensor is "
        "copied inside save() (the guarantee dcp.async_save gives), so its stall is one copy of "
        "the rank's state into reused staging buffers (from 2 MiB on with streaming stores, "
        "where config.stream_copy says available: engine/streamcopy.py); shardckpt_blocking "
        "writes from the live "
        "tensors through aligned bounce buffers, copied by the encoder threads ahead of the "
        "writes",
        "dcp_* times include get_state_dict (and dcp_load includes set_state_dict), which "
        "shardckpt does inside save/load; get_state_dict_s is reported separately",
        "raw_write/raw_read move the rank's exact state bytes (copied into one flat CPU buffer) "
        "to/from one file per rank in io_chunk_bytes writes; raw_write fsyncs the file and its "
        "directory when fsync is on",
        "memcpy copies every local tensor into preallocated, pre-faulted CPU buffers with "
        "Tensor.copy_ (one thread per rank under torchrun's OMP_NUM_THREADS=1; plain stores)",
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

