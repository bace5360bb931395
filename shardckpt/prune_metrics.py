"""The outcome of ``shardckpt prune`` in a Prometheus textfile, so that a failing cron job shows.

``shardckpt prune ROOT ... --metrics-file /var/lib/node_exporter/textfile/prune-run1.prom``
replaces that file after every run that is not a dry run (success or failure) with::

    shardckpt_prune_last_success{root="/nvme/run1"} 1
    shardckpt_prune_last_run_timestamp_seconds{root="/nvme/run1"} 1.7653e+09
    shardckpt_prune_last_success_timestamp_seconds{root="/nvme/run1"} 1.7653e+09
    shardckpt_prune_last_exit_code{root="/nvme/run1"} 0
    shardckpt_prune_last_duration_seconds{root="/nvme/run1"} 0.41
    shardckpt_prune_last_deleted{root="/nvme/run1",location="/nvme/run1"} 3
    shardckpt_prune_last_reaped{root="/nvme/run1",location="/nvme/run1"} 0

``last_success_timestamp_seconds`` is carried over from the file's previous content when a run
fails (0 if no run has succeeded yet), so that "no successful prune for a day" is one alert
rule, which also fires for a root whose pruning never worked. Use one file per root (the
training job's own textfile is written by the job and must not be shared). No torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

from .textfile import escape_label, render_textfile, write_textfile

_LAST_OK = "shardckpt_prune_last_success_timestamp_seconds"


def utc_now(now: float) -> str:
    """ISO 8601 UTC with milliseconds: the ``time`` of each ``prune --json`` line."""
    return datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds")


def _previous_success(path: str, root: str) -> float | None:
    """The last success time stamp that ``path`` holds for ``root``, if any."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(1 << 20)
    except (OSError, UnicodeDecodeError):
        return None
    pattern = re.compile(re.escape(f'{_LAST_OK}{{root="{escape_label(root)}"}}') + r" (\S+)")
    found = pattern.search(text)
    if found is None:
        return None
    try:
        value = float(found.group(1))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def prune_metrics_text(root: str, ok: bool, exit_code: int, started: float, finished: float,
                       per_location: Sequence[tuple[str, int, int]],
                       last_success: float | None) -> str:
    """The textfile for one run. ``per_location``: (location, deleted, reaped) of each location
    that was pruned."""
    lab = {"root": root}

    def one(value: float | None) -> list[tuple[Mapping[str, str], float]]:
        return [] if value is None else [(lab, value)]

    return render_textfile([
        ("shardckpt_prune_last_success", "gauge", "1 if the last prune of this root succeeded "
         "(exit 0), 0 if it failed.", one(int(ok))),
        ("shardckpt_prune_last_run_timestamp_seconds", "gauge", "Unix time the last prune of "
         "this root ended.", one(finished)),
        (_LAST_OK, "gauge", "Unix time the last successful prune of this root ended (0: "
         "none yet).",
         one(last_success)),
        ("shardckpt_prune_last_exit_code", "gauge", "Exit code of the last prune of this root.",
         one(exit_code)),
        ("shardckpt_prune_last_duration_seconds", "gauge", "How long the last prune took.",
         one(max(0.0, finished - started))),
        ("shardckpt_prune_last_deleted", "gauge", "Committed checkpoints the last prune "
         "deleted, per location.", [({**lab, "location": loc}, n) for loc, n, _ in per_location]),
        ("shardckpt_prune_last_reaped", "gauge", "Uncommitted or moved-aside step directories "
         "the last prune removed, per location.",
         [({**lab, "location": loc}, n) for loc, _, n in per_location]),
    ])


def write_prune_metrics(path: str, root: str, exit_code: int, started: float, finished: float,
                        per_location: Sequence[tuple[str, int, int]]) -> None:
    """Replace ``path`` (atomically, mode 0644) with the outcome of one prune run."""
    ok = exit_code == 0
    # 0 when no prune of this root has succeeded yet: "time() - last success > N" then fires
    last = finished if ok else (_previous_success(path, root) or 0.0)
    write_textfile(path, prune_metrics_text(root, ok, exit_code, started, finished,
                                            per_location, last))


__all__ = ["prune_metrics_text", "utc_now", "write_prune_metrics"]
