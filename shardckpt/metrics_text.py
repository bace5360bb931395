"""The training job's Prometheus textfile: what ``CheckpointManager(metrics_path=...)`` writes.

``CheckpointManager(..., metrics_path="/var/lib/node_exporter/textfile/train.prom")`` keeps a
file in the text exposition format of node_exporter's textfile collector, replaced atomically
after every save attempt, and first when the manager starts: every family is present from then
on (counters at 0, the times of events that have not happened yet at 0, other values at NaN), so
that alerts need no ``absent()``. ``shardckpt_last_save_success`` describes the last attempt;
``shardckpt_last_commit_timestamp_seconds`` and ``shardckpt_last_commit_step`` the last commit.
Counters count the saves of this manager (they start again at 0 with the process, as Prometheus
counters may); ``shardckpt_audit_write_failures_total`` and
``shardckpt_retention_failures_total`` count for the whole process. A background retention
failure rewrites the file at once, not only at the next save. Every sample carries a ``root``
label (the redacted checkpoint root), so that several jobs can share one textfile directory.

Rendering only (no I/O, no torch): :class:`.observe.SaveObserver` keeps the totals and writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .audit import write_failures
from .prune_background import retention_failures
from .textfile import render_textfile

Samples = list[tuple[Mapping[str, str], float]]


@dataclass
class SaveTotals:
    """What one manager's save attempts add up to (rank 0), as the textfile shows it."""

    saves: int = 0
    failures: int = 0
    failures_in_a_row: int = 0  # since the last commit (on_error="warn" goes on through them)
    committed: int = 0
    degraded: int = 0
    bytes: int = 0
    stall_s: float = 0.0
    write_s: float = 0.0
    # observe.SaveEvent or None (not imported: observe imports this module)
    last_ok: Any = None  # the last commit
    last_failed: Any = None  # the last failed attempt
    last: Any = None  # the last attempt


def job_metrics_text(t: SaveTotals, *, root: str, world_size: int, started: float,
                     version: str) -> str:
    """The textfile for ``t``: every family, whatever has happened yet. ``root``: the redacted
    root (the ``root`` label); ``started``: the manager's start, a Unix time."""
    lab = {"root": root}
    ok, bad, last = t.last_ok, t.last_failed, t.last
    nan = float("nan")

    def one(value: float) -> Samples:
        return [(lab, value)]

    def of_ok(attr: str, never: float = nan) -> Samples:
        return one(never if ok is None else getattr(ok, attr))

    families: list[tuple[str, str, str, Samples]] = [
        ("shardckpt_info", "gauge", "Always 1; labels name the checkpoint root and the "
         "shardckpt version.", [({**lab, "version": version}, 1)]),
        ("shardckpt_world_size", "gauge", "Ranks of the job that saves.", one(world_size)),
        ("shardckpt_start_timestamp_seconds", "gauge", "Unix time the manager started (for "
         "staleness alerts before the first commit).", one(started)),
        ("shardckpt_saves_total", "counter", "Save attempts finished (committed or failed) "
         "by this process.", one(t.saves)),
        ("shardckpt_save_failures_total", "counter", "Save attempts that failed.",
         one(t.failures)),
        ("shardckpt_save_failures_in_a_row", "gauge", "Save attempts that failed since the "
         "last commit (0 after a commit).", one(t.failures_in_a_row)),
        ("shardckpt_checkpoints_committed_total", "counter", "Checkpoints committed.",
         one(t.committed)),
        ("shardckpt_degraded_saves_total", "counter", "Checkpoints committed while some "
         "location missed them (min_replicas allowed it).", one(t.degraded)),
        ("shardckpt_committed_bytes_total", "counter", "Bytes of the committed checkpoints "
         "(sum of their sizes).", one(t.bytes)),
        ("shardckpt_save_stall_seconds_total", "counter", "Time save() blocked the training "
         "loop, summed over all attempts.", one(t.stall_s)),
        ("shardckpt_save_write_seconds_total", "counter", "Time from snapshot to commit (or "
         "failure), summed over all attempts.", one(t.write_s)),
        ("shardckpt_last_save_success", "gauge", "1 if the most recent save attempt "
         "committed, 0 if it failed; NaN before the first attempt.",
         one(nan if last is None else int(last.ok))),
        ("shardckpt_last_commit_timestamp_seconds", "gauge", "Unix time of the last commit "
         "(0: none yet).", of_ok("unix_time", 0.0)),
        ("shardckpt_last_commit_step", "gauge", "Step of the last committed checkpoint (NaN: "
         "none yet).", of_ok("step")),
        ("shardckpt_last_save_step", "gauge", "Step of the last committed checkpoint (same "
         "as shardckpt_last_commit_step).", of_ok("step")),
        ("shardckpt_last_save_bytes", "gauge", "Size in bytes of the last committed "
         "checkpoint.", of_ok("nbytes")),
        ("shardckpt_last_save_stall_seconds", "gauge", "Time save() blocked the caller for "
         "the last committed checkpoint.", of_ok("stall_s")),
        ("shardckpt_last_save_write_seconds", "gauge", "Time from snapshot to commit of the "
         "last committed checkpoint.", of_ok("write_s")),
        ("shardckpt_last_save_duration_seconds", "gauge", "Time from the save() call to the "
         "commit of the last committed checkpoint.", of_ok("total_s")),
        ("shardckpt_last_save_throughput_bytes_per_second", "gauge", "Bytes per second of "
         "the last committed checkpoint's write (bytes / write seconds).",
         of_ok("throughput")),
        ("shardckpt_last_save_timestamp_seconds", "gauge", "Unix time of the last commit "
         "(same as shardckpt_last_commit_timestamp_seconds).", of_ok("unix_time", 0.0)),
        ("shardckpt_last_save_locations", "gauge", "Locations that committed the last "
         "checkpoint.", one(0 if ok is None else len(ok.locations))),
        ("shardckpt_last_save_degraded", "gauge", "1 if some location missed the last "
         "committed checkpoint.", one(0 if ok is None else int(ok.degraded))),
        ("shardckpt_last_failure_step", "gauge", "Step of the last failed save attempt (NaN: "
         "none).", one(nan if bad is None else bad.step)),
        ("shardckpt_last_failure_timestamp_seconds", "gauge", "Unix time of the last failed "
         "save attempt (0: none).", one(0.0 if bad is None else bad.unix_time)),
        ("shardckpt_audit_write_failures_total", "counter", "Audit records this process could "
         "not write (each warned about; issue 32).", one(write_failures())),
        ("shardckpt_retention_failures_total", "counter", "Location prunes of background "
         "retention that failed in this process, every manager's (each cause is warned about "
         "once while it lasts).",
         one(retention_failures())),
    ]
    return render_textfile(families)


__all__ = ["SaveTotals", "job_metrics_text"]
