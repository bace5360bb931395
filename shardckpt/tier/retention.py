"""Local retention: which step directories of one node's path go. A pure function; no I/O.

The newest ``keep`` complete steps stay (complete: ``holdings.json`` written), and so does any
step being read or written. Everything else goes: older complete steps, and partial directories
(a save killed before its holdings were written) older than the newest complete step. A partial
directory newer than that may be a save in flight, and stays. The newest complete step is never
deleted (``keep`` is at least 1).
"""

from __future__ import annotations

from collections.abc import Iterable


def plan_local_retention(complete: Iterable[int], partial: Iterable[int], keep: int,
                         busy: Iterable[int] = ()) -> list[int]:
    """The steps to delete, ascending."""
    if type(keep) is not int or keep < 1:
        raise ValueError(f"keep must be a positive int, got {keep!r}")
    done = sorted(set(complete), reverse=True)
    kept = set(done[:keep]) | set(busy)
    newest = done[0] if done else None
    drop = {s for s in done if s not in kept}
    if newest is not None:
        drop |= {s for s in set(partial) - set(done) if s < newest and s not in kept}
    return sorted(drop)
