"""One timed phase on every rank: between barriers, max over the ranks, with its RSS.

Every rank calls ``measure_phase`` for the same phases in the same order (it holds barriers and
all-gathers). A phase that raises on some rank is reported, on every rank alike, instead of
ending the run, so the other phases still get measured.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from .distributed import gather_floats, sync_device
from .output import log
from .rss import RssSampler, gc_collect, rss_bytes


@dataclass
class Measured:
    """What ``measure_phase`` found.

    ``result`` is JSON-ready and the same on every rank (but for the text of ``error``: the
    exception on the rank that raised, "failed on rank(s) [...]" on the others);
    ``rss_before``/``rss_after`` are this
    rank's RSS just before the phase and after it (after ``gc_collect``); ``error`` this rank's
    exception as ``"Type: message"``, if it raised.
    """

    result: dict[str, Any]
    rss_before: int
    rss_after: int
    error: str | None


def measure_phase(name: str, fn: Callable[[], dict[str, float]], *, keys: Sequence[str],
                  total_bytes: int, rss_reference: int,
                  before: Callable[[], None] | None = None) -> Measured:
    """Run ``fn`` on every rank between barriers and gather its times and memory.

    ``before()`` runs first, untimed. Then garbage is collected and freed heap returned to the OS
    (``gc_collect``), the ranks meet at a barrier, and ``fn()`` runs under an ``RssSampler``.
    ``fn`` returns the seconds it measured itself, under names from ``keys`` (always including
    ``time_s``; when it returns no ``time_s``, the wall time of the call is used). ``keys`` must
    be the same on every rank, whatever ``fn`` returned, so the gathers line up.

    ``result`` holds, for each key ``k``: ``k`` (the max over the ranks, None if no rank has it)
    and ``k_per_rank``; ``gbps`` (``total_bytes`` / 1e9 / ``time_s``); ``commit_s`` (= ``time_s``)
    when ``stall_s`` is a key; ``rss`` (bytes per rank: ``before``, ``peak``, ``peak_increase``,
    ``peak_over_reference`` (peak - ``rss_reference``), ``after_trim``; and the maxima
    ``peak_increase_bytes``, ``peak_abs_bytes``, ``children_peak_bytes``). If ``fn`` raised on
    any rank: ``gbps`` is None, ``error`` a message and ``failed_ranks`` the ranks.
    """
    if before is not None:
        before()
    gc_collect()
    dist.barrier()
    err = None
    times: dict[str, float] = {}
    rank = dist.get_rank()
    with RssSampler() as rss:
        t0 = time.perf_counter()
        try:
            times = fn()
        except Exception as exc:  # report, keep the other phases going
            err = f"{type(exc).__name__}: {exc}"
            log(f"{name} failed on rank {rank}: {traceback.format_exc()}", all_ranks=True)
        sync_device()
        times.setdefault("time_s", time.perf_counter() - t0)
    keys = list(keys)
    row = [float(times.get(k, float("nan"))) for k in keys] + [
        float(rss.before), float(rss.peak), float(rss.children_peak),
        float(rss.peak - rss_reference), 1.0 if err else 0.0]
    rows = gather_floats(row)
    out: dict[str, Any] = {}
    for i, k in enumerate(keys):
        per_rank = [r[i] if r[i] == r[i] else None for r in rows]  # NaN -> None
        finite = [v for v in per_rank if v is not None]
        out[k] = max(finite) if finite else None
        out[k + "_per_rank"] = per_rank
    out["gbps"] = total_bytes / 1e9 / out["time_s"] if out["time_s"] else None
    if "stall_s" in out:
        out["commit_s"] = out["time_s"]
    n = len(keys)
    out["rss"] = {
        "before_bytes_per_rank": [int(r[n]) for r in rows],
        "peak_bytes_per_rank": [int(r[n + 1]) for r in rows],
        "peak_increase_bytes_per_rank": [int(r[n + 1] - r[n]) for r in rows],
        "peak_increase_bytes": int(max(r[n + 1] - r[n] for r in rows)),
        "peak_over_reference_bytes_per_rank": [int(r[n + 3]) for r in rows],
        "peak_abs_bytes": int(max(r[n + 1] for r in rows)),
        "children_peak_bytes": int(max(r[n + 2] for r in rows)),
    }
    gc_collect()
    after = rss_bytes()
    out["rss"]["after_trim_bytes_per_rank"] = [int(r[0]) for r in gather_floats([after])]
    failed = [i for i, r in enumerate(rows) if r[-1]]
    if failed:
        out["gbps"] = None
        out["error"] = err or f"failed on rank(s) {failed}"
        out["failed_ranks"] = failed
    dist.barrier()
    return Measured(out, rss.before, after, err)
