"""Retention run in the background: one worker thread, one prune at a time, never blocking
the training loop that asked for it."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .errors import PruneLockedError
from .warnsite import Site, user_site, warn_user

logger = logging.getLogger("shardckpt.retention")
_totals = {"failures": 0}  # location prunes of background retention that failed, this process
_totals_lock = threading.Lock()


def retention_failures() -> int:
    """Location prunes of background retention that failed in this process (every manager),
    warned or not: for a metrics counter (like ``audit.write_failures``)."""
    with _totals_lock:
        return _totals["failures"]


def _cause(where: str, exc: BaseException) -> tuple[str, str, str]:
    """A failure's cause, for "warn once per cause": numbers (steps, times) do not count."""
    return where, type(exc).__name__, re.sub(r"\d+", "N", str(exc))


class BackgroundPrune:
    """Runs ``run`` on one worker thread, one call at a time, never blocking the caller.

    A :meth:`request` made while a run is in progress queues exactly one more (so the last
    request is always followed by a full run); more requests meanwhile coalesce into it.

    A run's failure never reaches the caller, and never stops later runs: each request prunes
    every location again. A location whose prune fails (``run`` raises; the error's
    ``failures`` lists ``(location, error)`` per location, see :mod:`.prune_all`) is counted in
    :attr:`failures` (runs) and :attr:`failures_by_location`, kept in :attr:`last_error`, and
    warned about (``RuntimeWarning``) once per distinct cause (location, error type, message
    with numbers ignored) while it keeps failing that way: a new cause, or the same one after a
    run in which it did not occur, warns again. A location held by another prune (cron, a
    second job: :class:`PruneLockedError`) is skipped quietly, counted in :attr:`locked`; the
    next request tries again. The warning names the ``save()`` call that requested the run.
    After a run in which some location failed, ``on_failure()`` is called on the worker thread
    (to publish the count at once, see :func:`retention_failures`); its errors are logged.
    """

    def __init__(self, run: Callable[[], object], name: str = "shardckpt-retention",
                 on_failure: Callable[[], object] | None = None) -> None:
        self._run, self._name, self._on_failure = run, name, on_failure
        self._lock = threading.Lock()
        self._queued = False
        self._pool: ThreadPoolExecutor | None = None
        self._site: Site | None = None
        self._warned: set[tuple[str, str, str]] = set()
        self.last_error: BaseException | None = None
        self.failures = 0  # runs in which some location failed
        self.failures_by_location: dict[str, int] = {}
        self.locked = 0  # location prunes skipped: another prune held the lock

    def request(self) -> None:
        site = user_site()  # None on the save thread: then the last save() call (warnsite.py)
        with self._lock:
            self._site = site or self._site
            if self._queued:
                return
            self._queued = True
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
            self._pool.submit(self._job)

    def _job(self) -> None:
        with self._lock:
            self._queued = False
            site = self._site
        try:
            self._run()
        except Exception as exc:
            self._failed(exc, site)
        else:
            self._warned.clear()

    def _failed(self, exc: Exception, site: Site | None) -> None:
        failures = getattr(exc, "failures", None) or [("", exc)]
        causes: set[tuple[str, str, str]] = set()
        real = False
        for where, err in failures:
            if isinstance(err, PruneLockedError):
                self.locked += 1
                continue
            real = True
            self.last_error = err
            self.failures_by_location[where] = self.failures_by_location.get(where, 0) + 1
            with _totals_lock:
                _totals["failures"] += 1
            cause = _cause(where, err)
            causes.add(cause)
            if cause not in self._warned:
                warn_user(f"background retention failed: {type(err).__name__}: {err} (later "
                          f"prunes go on; this cause is not repeated while it lasts)",
                          RuntimeWarning, site)
        self.failures += real
        self._warned = causes
        if real and self._on_failure is not None:
            try:
                self._on_failure()
            except Exception:  # a broken hook must not stop later prunes
                logger.exception("shardckpt: %s: on_failure raised (ignored)", self._name)

    def close(self, timeout: float | None = None) -> bool:
        """Wait for the running and queued runs (at most ``timeout`` s), then stop the thread.

        False if a run was still going at the timeout (the thread goes on with it, then stops).
        """
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is None:
            return True
        if timeout is None:
            pool.shutdown(wait=True)
            return True
        last = pool.submit(lambda: None)  # one worker, runs in order: done once the rest are
        pool.shutdown(wait=False)
        try:
            last.result(timeout)
        except TimeoutError:
            return False
        return True
