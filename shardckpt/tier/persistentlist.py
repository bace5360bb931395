"""The persistent tier's steps as a resume from the local tier needs them: off its critical path.

A load across tiers must know whether the persistent tier holds a valid step newer than the best
local one (it then wins), and, if every newer candidate fails, which valid persistent steps to
fall back to. Listing and validating the persistent tier (every manifest read, on an object
store) costs more than a local restore, yet the answer almost never changes the choice: local
saves are the more frequent ones. So :class:`PersistentSteps`:

* starts, on rank 0 alone, a listing of the step directory *names* of the manager's locations
  (a probe and one listing each, no manifest read) on a thread, as soon as the load begins: it
  runs while every rank surveys its node's holdings. (The store's client was made already:
  :func:`warm_up` listed the names once while the manager was constructed);
* :meth:`~PersistentSteps.newer_than` (collective): the valid persistent steps newer than a
  given step. Only when some listed name is newer (or the names cannot be listed: a location
  unreachable, say) does rank 0 list and validate the tier in full, as ``manager.steps()`` does
  (with its warnings); otherwise no manifest is read and the answer is empty;
* :meth:`~PersistentSteps.all` (collective): every valid persistent step (the full listing,
  once), for the fallback after a candidate failed.

Every rank gets the same answer from rank 0 (one broadcast per question); a listing that fails
raises on every rank alike. The decision is the same as listing everything first: a name that
is not newer than the best local step cannot win over it, and the fallback lists in full.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..errors import ShardckptError
from ..storage import Location
from ..storage.probe import Unreachable, reachable_all


def step_names(locations: Sequence[Location]) -> set[int]:
    """The steps that have a directory at any of ``locations`` (names only: a directory may
    be uncommitted, corrupt or retired). ``ShardckptError`` if a location is unreachable or
    cannot be listed: the caller then lists in full."""
    names: set[int] = set()
    for loc in reachable_all(list(locations)):
        if isinstance(loc, Unreachable):
            raise ShardckptError(f"{loc.display}: unreachable: {loc.why}")
        names.update(loc.list_step_dirs())
    return names


def warm_up(locations: Sequence[Location]) -> threading.Thread | None:
    """List the step names of the remote ``locations`` once, on a daemon thread, and forget the
    answer: the store's client (s3fs: its session and event loop, botocore's service model;
    most of a first request's second or so) is then made while the manager is constructed,
    beside the local tier's collectives, not on a resume's critical path. Failures are
    ignored (the load lists again, and reports them). None if every location is local."""
    if all(loc.is_local for loc in locations):
        return None

    def run() -> None:
        with contextlib.suppress(Exception):
            step_names(locations)

    thread = threading.Thread(target=run, name="shardckpt-warm", daemon=True)
    thread.start()
    return thread


class KnownSteps:
    """Persistent steps already listed and validated by the caller (a plain list)."""

    def __init__(self, steps: Sequence[int]) -> None:
        self._steps = sorted({int(s) for s in steps})

    def newer_than(self, step: int) -> list[int]:
        return [s for s in self._steps if s > step]

    def all(self) -> list[int]:
        return list(self._steps)

    def close(self) -> None:
        pass


class PersistentSteps:
    """A manager's persistent steps, listed lazily by rank 0 (see the module). Every rank of
    ``comm`` constructs it at the start of the load and calls the same methods in the same
    order; :meth:`close` (every rank) ends rank 0's listing thread."""

    def __init__(self, manager: Any, comm: Any, after: threading.Thread | None = None) -> None:
        self._manager, self._comm = manager, comm
        self._all: list[int] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._names: Future[set[int]] | None = None
        if comm.rank == 0:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardckpt-plist")
            self._names = self._pool.submit(_names_after, after, list(manager.locations))

    def newer_than(self, step: int) -> list[int]:
        """Collective: the valid persistent steps newer than ``step``, ascending."""
        if self._all is not None:
            return [s for s in self._all if s > step]
        doc: Any = None
        if self._comm.rank == 0:
            assert self._names is not None
            try:
                names = self._names.result()
            except Exception:  # unreachable or unlistable somewhere: the full listing says
                names = None
            doc = {"full": names is None or any(s > step for s in names)}
        doc = self._comm.broadcast_json(doc, "load: is a persistent step newer")
        if not doc["full"]:
            return []
        return [s for s in self.all() if s > step]

    def all(self) -> list[int]:
        """Collective: every valid persistent step, ascending (listed in full once)."""
        if self._all is None:
            self._all = sorted(full_listing(self._manager, self._comm))
        return list(self._all)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _names_after(warming: threading.Thread | None, locations: list[Location]) -> set[int]:
    if warming is not None:  # the client it makes is the one to use: one at a time
        warming.join()
    return step_names(locations)


def full_listing(manager: Any, comm: Any) -> list[int]:
    """The persistent tier's committed steps (``manager.steps()``: every manifest validated),
    listed by rank 0 alone (one listing of the store per job, not one per rank) and sent to
    every rank; a listing that fails raises on every rank alike."""
    listed: Any = None
    if comm.rank == 0:
        try:
            listed = manager.steps()
        except Exception as exc:
            listed = {"error": f"{type(exc).__name__}: {exc}"}
    listed = comm.broadcast_json(listed, "load: persistent steps")
    if isinstance(listed, dict):
        raise ShardckptError(f"load: listing the persistent tier failed on rank 0: "
                             f"{listed['error']}")
    return [int(s) for s in listed]
