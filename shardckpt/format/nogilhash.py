"""XXH3-64 and XXH3-128 of buffers without a GIL handoff per call.

The ``xxhash`` binding releases the GIL around buffers from about 64 KiB up and holds it below.
Releasing it is what costs: a thread that let the GIL go must win it back, and while another
thread runs Python (the other file writer, an encoder between tasks, training's own threads),
that takes up to the switch interval. On a busy 2-core host a 76 KiB chunk took over 1 ms to
hash through the binding instead of 4 us; an incremental save of a fine-tuning state (hundreds
of changed adapter chunks of 64-256 KiB, each hashed two or three times) spent most of its time
there. Large buffers are the other way round: hashing 4 MiB (0.3 ms) with the GIL held stalls
every other thread of the save.

The same extension module exports xxHash's C entry points (``XXH3_64bits``, ``XXH3_128bits``).
Called through ctypes they give the binding's values on the same bytes: from :data:`MIN_BYTES`
up through a ``CDLL`` handle, which releases the GIL for the call (it runs in parallel with the
other threads); from :data:`HELD_MIN` up through a ``PyDLL`` handle, which keeps it (no
handoff). A check on first use compares both with the binding on a known pattern; where the
symbols are missing (another build of the binding), the check fails, or the buffer is one
ctypes cannot address (read-only and not ``bytes``), the binding is used, and below
:data:`HELD_MIN` always (a shorter call, with the GIL held).

The caller keeps the buffer alive and unchanged for the call, as it does with the binding.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import xxhash

MIN_BYTES = 256 * 1024  # from here up, hashed without the GIL (below, held for < 25 us)
HELD_MIN = 16 * 1024  # from here up to MIN_BYTES, the C entry points with the GIL held


class _U128(ctypes.Structure):
    _fields_ = [("low64", ctypes.c_uint64), ("high64", ctypes.c_uint64)]


_lock = threading.Lock()
_fns: tuple[Any, Any, Any, Any] | None = None  # 64, 128 released; 64, 128 held
_checked = False


def _load() -> tuple[Any, Any, Any, Any] | None:
    fns: list[Any] = []
    try:
        from xxhash import _xxhash  # the extension module itself

        # already loaded: the same library, no new copy; CDLL calls release the GIL, PyDLL not
        for lib in (ctypes.CDLL(_xxhash.__file__), ctypes.PyDLL(_xxhash.__file__)):
            fns += [lib.XXH3_64bits, lib.XXH3_128bits]
    except (ImportError, OSError, AttributeError):
        return None
    pattern = bytes(range(256)) * 1031  # odd length: the tail paths too
    buf = bytearray(pattern)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    want64, want128 = xxhash.xxh3_64_hexdigest(pattern), xxhash.xxh3_128_hexdigest(pattern)
    for h64, h128 in (fns[:2], fns[2:]):
        h64.argtypes = h128.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        h64.restype, h128.restype = ctypes.c_uint64, _U128
        r = h128(addr, len(buf))
        if f"{h64(addr, len(buf)):016x}" != want64 or \
                f"{r.high64:016x}{r.low64:016x}" != want128:
            return None
    return fns[0], fns[1], fns[2], fns[3]


def _functions() -> tuple[Any, Any, Any, Any] | None:
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


def _entry(data: Any, which: int) -> tuple[Any, tuple[int, int, Any]] | None:
    """The C entry point for ``data`` (``which``: 0 for 64 bits, 1 for 128) and its address,
    or None: the binding."""
    n = _nbytes(data)
    fns = _functions() if n >= HELD_MIN else None
    where = _address(data) if fns is not None else None
    if fns is None or where is None:
        return None
    return fns[which if n >= MIN_BYTES else which + 2], where


def xxh3_64_hex(data: Any) -> str:
    """``xxhash.xxh3_64_hexdigest(data)``, without a GIL handoff (see the module)."""
    found = _entry(data, 0)
    if found is None:
        return xxhash.xxh3_64_hexdigest(data)
    fn, where = found
    return f"{fn(where[0], where[1]):016x}"


def xxh3_128_hex(data: Any) -> str:
    """``xxhash.xxh3_128_hexdigest(data)``, without a GIL handoff (see the module)."""
    found = _entry(data, 1)
    if found is None:
        return xxhash.xxh3_128_hexdigest(data)
    fn, where = found
    r = fn(where[0], where[1])
    return f"{r.high64:016x}{r.low64:016x}"


def _nbytes(data: Any) -> int:
    n = getattr(data, "nbytes", None)
    return n if isinstance(n, int) else len(data)
