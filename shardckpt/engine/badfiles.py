"""Files that a read in this process found corrupt (a checksum mismatch): an incremental save
never takes a base whose bytes live in one of them, so that a job that could not load its
checkpoint (and started again from the same frozen weights) writes them anew instead of
referencing the damaged copy (issue 30, found in a user trial).

A read-once load (:mod:`.readonce`) reads a span on one rank for several: the ranks share what
they noted in the same gather that agrees on the reads' failures, so every rank of the job notes
the same files and no rank of a later save bases on bytes another rank found corrupt. (The base
*step* is chosen by rank 0 alone; whether a chunk may be referenced is decided on each rank
from these notes, so they must agree.)"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_bad: set[tuple[str, str]] = set()


def note_bad(where: str, relpath: str) -> None:
    """``relpath`` at the location displayed as ``where`` failed its checksums."""
    with _lock:
        _bad.add((where, relpath))


def is_bad(where: str, relpath: str) -> bool:
    with _lock:
        return (where, relpath) in _bad


def forget(where: str, relpath: str) -> None:
    """A repair rewrote the file: it may be used again."""
    with _lock:
        _bad.discard((where, relpath))


def forget_step(where: str, step_dir: str) -> None:
    """A new save of the step is being written there (its old directory was cleared or moved
    aside first): what was noted of the old files no longer applies."""
    with _lock:
        _bad.difference_update({p for p in _bad if p[0] == where
                                and p[1].startswith(step_dir + "/")})


def noted(limit: int = 4096) -> list[list[str]]:
    """What this process noted, as ``[where, relpath]`` pairs (sorted; at most ``limit``): what
    a read-once load shares with its peers (:mod:`.readonce`)."""
    with _lock:
        return [list(p) for p in sorted(_bad)[:limit]]


def note_all(pairs: object) -> None:
    """Note every well-formed ``[where, relpath]`` pair of ``pairs`` (a peer's :func:`noted`)."""
    if not isinstance(pairs, list):
        return
    with _lock:
        _bad.update((p[0], p[1]) for p in pairs if isinstance(p, list) and len(p) == 2
                    and all(isinstance(x, str) for x in p))
