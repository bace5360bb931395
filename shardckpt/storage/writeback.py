"""Start the disk write of a file's buffered bytes early (Linux ``sync_file_range``).

Bytes written through the page cache reach the disk when the kernel gets to them, at the latest
at the file's ``fsync``. A shard file of many small chunks (an incremental save of a
fine-tuning state: adapters and their optimizer moments) is written through the page cache
(storage/direct.py ``DIRECT_WRITE_MIN``), so its whole content waited for the ``fsync`` at the
commit, after the last byte: on the benchmark machine's virtual disk about 7 ms per 6.5 MB file,
all of it on the save's critical path. :func:`start_writeback` asks the kernel to begin writing a
range now (``SYNC_FILE_RANGE_WRITE``: it queues the writes and returns; no data is made durable
by it, and nothing is waited for but a full request queue), so the disk works while the save
goes on hashing and encoding, and the ``fsync`` at the commit, which is what makes the file
durable, as before, finds little left to do.

Called through ctypes (the GIL is released). Where the call does not exist (not Linux), fails
or ``SHARDCKPT_FSYNC=0``, it does nothing: the ``fsync`` at the commit writes everything, as
before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from typing import Any

SYNC_FILE_RANGE_WRITE = 2
KICK_BYTES = 1 << 20  # start writing back once this many buffered bytes are waiting

_lock = threading.Lock()
_fn: Any = None
_loaded = False


def _load() -> Any:
    global _fn, _loaded
    with _lock:
        if not _loaded:
            _loaded = True
            if sys.platform.startswith("linux"):
                try:
                    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                                       use_errno=True)
                    fn = libc.sync_file_range
                    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                   ctypes.c_uint]
                    fn.restype = ctypes.c_int
                    _fn = fn
                except (OSError, AttributeError):
                    _fn = None
    return _fn


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing ``length`` bytes of ``fd`` from ``offset`` to the disk;
    whether it took the request (False: nothing happened, the ``fsync`` will do it all)."""
    fn = _fn if _loaded else _load()
    if fn is None or length <= 0:
        return False
    return fn(fd, offset, length, SYNC_FILE_RANGE_WRITE) == 0
