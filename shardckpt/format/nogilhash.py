"""XXH3-64 and XXH3-128 of large buffers without holding the GIL.

The ``xxhash`` binding hashes with the GIL held, so while one thread hashes a 4 MiB chunk
(0.4 ms), every other thread of the save waits for it: the file writers returning from their
system calls, the encoders, training's own threads. With 2 encoder threads and 2 writers on 2
cores, an incremental save that hashes 117 MB and writes 13 MB spent about 4 times the hashing's
own CPU time waiting for the GIL (the handoffs, not the hashing).

The same extension module exports xxHash's C entry points (``XXH3_64bits``, ``XXH3_128bits``);
called through ctypes, which releases the GIL for the call, the hash runs in parallel with the
other threads. It is the same code on the same bytes, so the values are the binding's; a check
on first use compares both on a known pattern, and where the symbols are missing (another build
of the binding), the check fails, or the buffer is one ctypes cannot address (read-only and not
``bytes``), the binding is used. Small buffers always use the binding: below :data:`MIN_BYTES`
the GIL is held too briefly to matter and the call costs more.

The caller keeps the buffer alive and unchanged for the call, as it does with the binding.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import xxhash

MIN_BYTES = 256 * 1024  # below this, the binding (a shorter call; the GIL held for < 25 us)


class _U128(ctypes.Structure):
    _fields_ = [("low64", ctypes.c_uint64), ("high64", ctypes.c_uint64)]


_lock = threading.Lock()
_fns: tuple[Any, Any] | None = None
_checked = False


def _load() -> tuple[Any, Any] | None:
    try:
        from xxhash import _xxhash  # the extension module itself

        lib = ctypes.CDLL(_xxhash.__file__)  # already loaded: the same handle, no new copy
        h64, h128 = lib.XXH3_64bits, lib.XXH3_128bits
    except (ImportError, OSError, AttributeError):
        return None
    h64.argtypes = h128.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    h64.restype, h128.restype = ctypes.c_uint64, _U128
    pattern = bytes(range(256)) * 1031  # odd length: the tail paths too
    buf = bytearray(pattern)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    r = h128(addr, len(buf))
    if f"{h64(addr, len(buf)):016x}" != xxhash.xxh3_64_hexdigest(pattern) or \
            f"{r.high64:016x}{r.low64:016x}" != xxhash.xxh3_128_hexdigest(pattern):
        return None
    return h64, h128


def _functions() -> tuple[Any, Any] | None:
    global _fns, _checked
    if not _checked:
        with _lock:
            if not _checked:
                _fns = _load()
                _checked = True
    return _fns


def available() -> bool:
    """Whether large buffers are hashed without the GIL here."""
    return _functions() is not None


def _address(data: Any) -> tuple[int, int, Any] | None:
    """(address, length, what keeps it alive) of a contiguous buffer, or None."""
    if isinstance(data, bytes):
        return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0, len(data), data
    try:
        view = data if isinstance(data, memoryview) else memoryview(data)
        if not view.c_contiguous:
            return None
        if view.readonly:
            return None
        if view.format not in ("B", "b", "c"):
            view = view.cast("B")
        return ctypes.addressof(ctypes.c_char.from_buffer(view)), view.nbytes, view
    except (TypeError, ValueError):
        return None


def xxh3_64_hex(data: Any) -> str:
    """``xxhash.xxh3_64_hexdigest(data)``, without the GIL for large buffers."""
    fns = _functions() if _nbytes(data) >= MIN_BYTES else None
    where = _address(data) if fns is not None else None
    if fns is None or where is None:
        return xxhash.xxh3_64_hexdigest(data)
    return f"{fns[0](where[0], where[1]):016x}"


def xxh3_128_hex(data: Any) -> str:
    """``xxhash.xxh3_128_hexdigest(data)``, without the GIL for large buffers."""
    fns = _functions() if _nbytes(data) >= MIN_BYTES else None
    where = _address(data) if fns is not None else None
    if fns is None or where is None:
        return xxhash.xxh3_128_hexdigest(data)
    r = fns[1](where[0], where[1])
    return f"{r.high64:016x}{r.low64:016x}"


def _nbytes(data: Any) -> int:
    n = getattr(data, "nbytes", None)
    return n if isinstance(n, int) else len(data)
