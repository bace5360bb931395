"""Finish the saves still in flight when the interpreter exits without ``close()``.

A script that calls ``save()`` and simply ends would otherwise lose that save: at exit, Python
first runs the hooks registered with ``threading._register_atexit`` (one of them, from
``concurrent.futures``, forbids every new ``submit`` and joins the pool threads), then the
non-daemon threads are joined, and only then the :mod:`atexit` functions run. The background save
submits work to thread pools of its own (encoders, file writers, retention), so it must finish
before the ``concurrent.futures`` hook: an :mod:`atexit` function would run too late. The hook
here is registered on that same list *after* ``concurrent.futures.thread`` (imported below), and
the list runs in reverse, so it runs first.

Objects are tracked through a :class:`weakref.WeakSet`: a manager dropped by its user can still be
garbage collected. Each object's ``_finish_at_exit(timeout)`` is called with what is left of
``SHARDCKPT_EXIT_WAIT_S`` (one budget for all of them).
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (registers its exit hook before ours, see above)
import functools
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

from . import knobs
from .errors import ShardckptError

logger = logging.getLogger("shardckpt")


class FinishesAtExit(Protocol):
    def _finish_at_exit(self, timeout: float) -> None: ...

    def _before_teardown(self, group: Any) -> None: ...


_tracked: weakref.WeakSet[FinishesAtExit] = weakref.WeakSet()
_lock = threading.Lock()
_registered = False


def track(obj: FinishesAtExit) -> None:
    """Have ``obj._finish_at_exit`` called at interpreter exit, unless it is untracked first."""
    global _registered
    if "torch.distributed" in sys.modules:
        from torch.distributed import is_available, is_initialized

        if is_available() and is_initialized():
            guard_teardown()
    with _lock:
        _tracked.add(obj)
        if _registered:
            return
        _registered = True
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError("threading._register_atexit is not available")
        register(_at_exit)
    except RuntimeError as exc:  # shutdown already under way, or a Python without the hook
        logger.warning("shardckpt: %s; saves in flight at exit are waited for by an atexit "
                       "function instead, which may be too late for them", exc)
        atexit.register(_at_exit)


def guard_teardown() -> None:
    """Wrap ``torch.distributed.destroy_process_group`` (once per process): before a teardown
    that destroys every group (no argument) or a manager's own group, each tracked object's
    ``_before_teardown(group)`` finishes the saves in flight, while the private group they run
    on still exists. A save that cannot commit then is logged with its cause, the groups are
    destroyed all the same, and the teardown raises: the process exits non-zero, never quietly
    losing the last checkpoint. Code that bound the function before shardckpt was imported
    (``from torch.distributed import destroy_process_group``) bypasses the wrapper: call
    ``mgr.close()`` first there."""
    import torch.distributed as dist

    if getattr(dist.destroy_process_group, "_shardckpt_guard", False):
        return
    original = dist.destroy_process_group

    @functools.wraps(original)
    def destroy_process_group(group: Any = None) -> None:
        with _lock:
            objs = list(_tracked)
        failed: list[BaseException] = []
        for obj in objs:
            try:
                obj._before_teardown(group)
            except Exception as exc:
                logger.error("shardckpt: a save in flight when destroy_process_group() was "
                             "called could not be committed: %s: %s", type(exc).__name__, exc)
                failed.append(exc)
        original(group)
        if failed:
            raise ShardckptError(f"destroy_process_group(): a save in flight could not be "
                                 f"committed: {type(failed[0]).__name__}: {failed[0]}") \
                from failed[0]

    destroy_process_group._shardckpt_guard = True  # type: ignore[attr-defined]
    dist.destroy_process_group = destroy_process_group
    c10d = getattr(dist, "distributed_c10d", None)
    if c10d is not None and c10d.destroy_process_group is original:
        c10d.destroy_process_group = destroy_process_group


def untrack(obj: FinishesAtExit) -> None:
    with _lock:
        _tracked.discard(obj)


def wait_for_saves(where: str, handles: Sequence[Any], timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``handles`` (``SaveHandle``), logging what happens.

    True if every save finished (committed or failed: a failure not yet reported to the user is
    logged as an error). False, with an error logged, if one was still in flight at the timeout.
    """
    busy = [h.step for h in handles if not h.done()]
    if busy:
        logger.warning("shardckpt: the CheckpointManager of %s was not closed: waiting up to "
                       "%.0f s (SHARDCKPT_EXIT_WAIT_S) at exit for the save of step %s",
                       where, timeout, ", ".join(map(str, busy)))
    deadline = time.monotonic() + timeout
    for h in handles:
        reported = h.error_reported
        try:
            h.wait(max(0.0, deadline - time.monotonic()))
        except BaseException as exc:
            if not h.done():
                logger.error("shardckpt: the save of step %d at %s is still in flight after "
                             "waiting %.0f s (SHARDCKPT_EXIT_WAIT_S) at exit: it may never be "
                             "committed", h.step, where, timeout)
                return False
            if not reported:
                logger.error("shardckpt: the save of step %d at %s failed (found at exit, "
                             "the manager was not closed): %s: %s", h.step, where,
                             type(exc).__name__, exc)
        else:
            if h.step in busy:
                logger.warning("shardckpt: the save of step %d at %s committed at exit",
                               h.step, where)
    return True


def _forget_in_child() -> None:
    """After a fork: a child (a DataLoader worker) runs the exit hooks too when it ends, but the
    tracked managers and their groups are its parent's, with threads that do not exist in it
    (finishing them there would join those threads and abort). The child forgets them."""
    global _lock, _tracked
    _lock = threading.Lock()
    _tracked = weakref.WeakSet()


os.register_at_fork(after_in_child=_forget_in_child)


def _at_exit() -> None:
    with _lock:
        objs = list(_tracked)
        _tracked.clear()
    try:
        budget = float(knobs.EXIT_WAIT_S.get())
    except ValueError as exc:
        logger.error("shardckpt: %s; waiting the default %d s at exit", exc,
                     knobs.EXIT_WAIT_S.default)
        budget = float(knobs.EXIT_WAIT_S.default)
    deadline = time.monotonic() + budget
    for obj in objs:
        try:
            obj._finish_at_exit(max(0.0, deadline - time.monotonic()))
        except Exception:  # one object's failure must not stop the others from finishing
            logger.exception("shardckpt: finishing %r at exit failed", obj)


__all__ = ["guard_teardown", "track", "untrack", "wait_for_saves"]
