"""Thread priority on Linux, where a thread has its own nice value and threads it starts
inherit it."""

from __future__ import annotations

import os
import sys
import threading


def lower_thread_priority(nice: int) -> int | None:
    """Set the calling thread's nice value to ``nice`` if that lowers its priority (never raises
    it: that needs privileges). Returns the value in effect, or None where threads have no nice
    value of their own (not Linux) or it cannot be read."""
    if sys.platform != "linux" or not hasattr(os, "setpriority"):
        return None
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if nice > current:
            os.setpriority(os.PRIO_PROCESS, tid, min(nice, 19))
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:  # a sandbox without setpriority: run at the inherited priority
        return None
