"""Retention run in the background: one worker thread, one prune at a time, never blocking
the training loop that asked for it."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .errors import PruneLockedError


class BackgroundPrune:
    """Runs ``run`` on one worker thread, one call at a time, never blocking the caller.

    A :meth:`request` made while a run is in progress queues exactly one more (so the last
    request is always followed by a full run); more requests meanwhile coalesce into it. A run
    that finds another prune holding the lock is skipped (the next request tries again); other
    errors become a warning and :attr:`last_error`, never an exception in the caller.
    """

    def __init__(self, run: Callable[[], object], name: str = "shardckpt-retention") -> None:
        self._run, self._name = run, name
        self._lock = threading.Lock()
        self._queued = False
        self._pool: ThreadPoolExecutor | None = None
        self.last_error: BaseException | None = None

    def request(self) -> None:
        with self._lock:
            if self._queued:
                return
            self._queued = True
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
            self._pool.submit(self._job)

    def _job(self) -> None:
        with self._lock:
            self._queued = False
        try:
            self._run()
        except PruneLockedError:
            pass  # another prune (cron, a second job) is at it right now
        except Exception as exc:
            self.last_error = exc
            warnings.warn(f"background retention failed: {type(exc).__name__}: {exc}",
                          RuntimeWarning, stacklevel=1)

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
