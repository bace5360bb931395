"""Files that a read in this process found corrupt (a checksum mismatch): an incremental save
never takes a base whose bytes live in one of them, so that a job that could not load its
checkpoint (and started again from the same frozen weights) writes them anew instead of
referencing the damaged copy (issue 30, found in a user trial)."""

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
