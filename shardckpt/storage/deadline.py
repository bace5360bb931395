"""A bound on every call to a remote location, derived from the reachability probe.

A client library talking to an endpoint that died mid-upload retries on its own (botocore and
s3fs each a few times, with backoff, per request), and every request of a save does so in turn:
a dead replica could hold a save, and through it the next ``save()``, for half a minute. So each
remote call runs on a daemon thread, and the caller waits for it in slices of
``SHARDCKPT_CONNECT_TIMEOUT`` seconds. After each slice without an answer, the endpoint is
probed (:func:`~.probe.probe`: one ``HEAD /``, bounded): an endpoint that still answers is only
slow (a large part upload on a slow link), and the wait goes on; one that does not is *given up*:
it is recorded as down (:func:`~.probe.mark_down`), the call raises ``StorageError``, and every
later call to that location fails at once for ``SHARDCKPT_UNREACHABLE_TTL`` seconds, so the rest
of the save, and the next save, skip it. ``min_replicas`` then decides, as for any failed
location. (The abandoned call finishes or fails on its own thread; its result is dropped.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .. import knobs
from ..errors import StorageError
from .base import Location
from .probe import down_reason, mark_down, probe

T = TypeVar("T")


def given_up(location: Location, why: str) -> StorageError:
    return StorageError(f"{location.display}: unreachable, given up for now: {why}")


def check_up(location: Location) -> None:
    """Raise at once if ``location`` was given up (or found unreachable) recently."""
    why = down_reason(location)
    if why is not None:
        raise given_up(location, why)


def bounded(location: Location, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, given up when ``location`` stops answering (see the module)."""
    check_up(location)
    result: list[Any] = []
    error: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as exc:
            error.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name="shardckpt-remote-call").start()
    slice_s = float(knobs.CONNECT_TIMEOUT_S.get())
    while not done.wait(slice_s):
        why = probe(location)
        if why is not None and not done.is_set():
            mark_down(location, why)
            raise given_up(location, why)
    if error:
        raise error[0]
    return result[0]
