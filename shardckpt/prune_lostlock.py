"""A prune lock of ours that a failed release left behind (the store failed as the prune
ended): its renewals stopped and no one in this process holds it, so our own next prune of that
location removes it rather than waiting out its TTL (``PruneLockedError`` meanwhile would stop
the manager's background retention there). Never imports torch."""

from __future__ import annotations

import threading

from .storage import Location
from .storage.lease import LOCK_PATH, PruneLock, read_record

_mutex = threading.Lock()
_lost_locks: dict[str, set[str]] = {}  # location -> tokens of our prune locks not removed


def release_lock(location: Location, lock: PruneLock) -> None:
    """Release ``lock``; if its record could not be removed (the store failed), remember its
    token, so that our next prune of ``location`` removes it instead of waiting for it."""
    try:
        lock.release()
    except BaseException:
        with _mutex:
            _lost_locks.setdefault(location.display, set()).add(lock.record.token)
        raise


def drop_lost_locks(location: Location) -> None:
    """Remove a prune lock of ours that a failed release left at ``location``: its renewals
    stopped, no one in this process holds it, and it must not block our own later prunes for
    its whole TTL. Another holder's lock is never touched (read, compare token, remove)."""
    with _mutex:
        tokens = set(_lost_locks.get(location.display, ()))
    if not tokens:
        return
    current = read_record(location, LOCK_PATH)
    if current is not None and current.token in tokens:
        location.remove(LOCK_PATH)
    with _mutex:  # gone, or someone else's now: either way not ours to remove any more
        _lost_locks.pop(location.display, None)


__all__ = ["drop_lost_locks", "release_lock"]
