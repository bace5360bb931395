"""The write path's thread pools, kept between saves.

Each save used to start its encoder and file-writer threads and join them at the end: six
thread starts and joins per save, on the save's critical path (a start waits for the new thread
to be scheduled), which is most of a small incremental save's fixed cost on a busy 2-core host.
The pools are now kept per calling thread (a manager's save thread, or each rank's thread in a
job run in threads), kind, size and priority (``nice``: the threads of a background save run at
a lower priority, set once by the pool's initializer), and reused by the next save.

A pool in use is never shut down; at most :data:`KEEP` idle pools are kept (the oldest idle
ones are shut down first). A forked child forgets its parent's pools (their threads do not
exist there). Idle workers exit at interpreter exit, as every ``ThreadPoolExecutor``'s do.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .priority import lower_thread_priority

KEEP = 8
Key = tuple[int, str, int, int]

_lock = threading.Lock()
_pools: OrderedDict[Key, ThreadPoolExecutor] = OrderedDict()
_users: dict[Key, int] = {}


@contextlib.contextmanager
def pool(kind: str, workers: int, nice: int = 0) -> Iterator[ThreadPoolExecutor]:
    """A pool of ``workers`` threads for this thread's use while the block runs."""
    key = (threading.get_ident(), kind, workers, nice)
    with _lock:
        found = _pools.get(key)
        if found is None:
            init: dict[str, Any] = {"initializer": lower_thread_priority,
                                    "initargs": (nice,)} if nice > 0 else {}
            found = _pools[key] = ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix=f"shardckpt-{kind}", **init)
        _pools.move_to_end(key)
        _users[key] = _users.get(key, 0) + 1
    try:
        yield found
    finally:
        with _lock:
            _users[key] -= 1
            if not _users[key]:
                del _users[key]
            idle = [k for k in _pools if k not in _users]
            drop = [_pools.pop(k) for k in idle[:max(0, len(idle) - KEEP)]]
        for p in drop:
            p.shutdown(wait=False)


def kept() -> int:
    """Pools kept now (for tests)."""
    with _lock:
        return len(_pools)


def _forget() -> None:
    global _lock
    _lock = threading.Lock()
    _pools.clear()
    _users.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget)
