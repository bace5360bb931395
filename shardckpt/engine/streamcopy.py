"""A copy with streaming (non-temporal) stores, for the eager snapshot's large CPU copies.

A normal store first reads the destination's cache line from memory (read for ownership), so a
copy moves three bytes of memory traffic per byte copied, and it pushes training's working set
out of the cache. A streaming store (``movntdq``) writes the line without reading it: two bytes
of traffic per byte, nothing evicted. glibc's ``memcpy`` switches to streaming stores only from
its ``x86_non_temporal_threshold`` on (3/4 of the shared cache per thread: 192 MiB on the 2-core
benchmark machine, where a 1.6 GB FSDP2 state has 32 MiB shards), and torch's ``copy_`` never
does. Measured there (docs/benchmarks.md, "Eager stall, session 8"): about 35% less CPU time and
wall time per copy than either.

The routine is 61 bytes of x86-64 machine code (SSE2, which every x86-64 CPU has; the System V
calling convention, so Linux only), placed in a page of its own that is made executable and never
writable again (``mprotect``), and called through ctypes, which releases the GIL. It is loaded on
first use and checked by copying a known pattern; on any other platform, where the kernel refuses
executable memory (SELinux ``execmem``, PaX), or if the check fails, :func:`stream_copy` returns
False and the caller copies with ``memmove``. ``SHARDCKPT_STREAM_COPY=0`` turns it off.

It changes how the bytes get there, never which bytes: the routine ends with ``sfence``, so the
copy is complete and visible to every thread when the call returns.

Assembly (Intel syntax) of ``stream_copy(dst, src, n)``, ``n`` a multiple of 64, ``dst``
16-byte aligned::

        test rdx, rdx          ; nothing to copy
        jz done
    loop:
        movdqu xmm0, [rsi]     ; 64 bytes from src, any alignment
        movdqu xmm1, [rsi+16]
        movdqu xmm2, [rsi+32]
        movdqu xmm3, [rsi+48]
        movntdq [rdi], xmm0    ; streamed to dst
        movntdq [rdi+16], xmm1
        movntdq [rdi+32], xmm2
        movntdq [rdi+48], xmm3
        add rsi, 64
        add rdi, 64
        sub rdx, 64
        jnz loop
    done:
        sfence                 ; the streamed stores are globally visible
        ret
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import sys
import threading

from .. import knobs

_CODE = bytes.fromhex(
    "4885d27434"  # test rdx, rdx; jz done
    "f30f6f06" "f30f6f4e10" "f30f6f5620" "f30f6f5e30"  # movdqu xmm0-3, [rsi + 0/16/32/48]
    "660fe707" "660fe74f10" "660fe75720" "660fe75f30"  # movntdq [rdi + 0/16/32/48], xmm0-3
    "4883c640" "4883c740" "4883ea40"  # add rsi, 64; add rdi, 64; sub rdx, 64
    "75cc"  # jnz loop
    "0faef8c3"  # sfence; ret
)
BLOCK = 64  # bytes per iteration: the routine copies whole blocks only
ALIGN = 16  # movntdq's destination alignment

_Fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_lock = threading.Lock()
_loaded = False
_fn: object = None
_page: mmap.mmap | None = None  # keeps the code mapped
why_not = ""  # why the routine is not in use (for tests and diagnostics)


def _load() -> object:
    """The routine, or None (``why_not`` says why)."""
    global _page, why_not
    if not sys.platform.startswith("linux") or platform.machine().lower() not in (
            "x86_64", "amd64") or ctypes.sizeof(ctypes.c_void_p) != 8:
        why_not = f"not x86-64 Linux ({sys.platform}, {platform.machine()})"
        return None
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    page.write(_CODE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mprotect.restype = ctypes.c_int
    if libc.mprotect(addr, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        why_not = f"executable memory refused (errno {ctypes.get_errno()})"
        return None  # the page is dropped with its last reference (never made executable)
    fn = _Fn(addr)
    if not _self_test(fn):
        why_not = "self-test copy differed"
        return None
    _page = page
    return fn


def _self_test(fn: object) -> bool:
    """Copy a known pattern (an odd source alignment, a guard block after it) and compare."""
    n = 48 * BLOCK  # 3 KiB, then the guard block, in one page
    src = (ctypes.c_ubyte * (n + 8))(*((i * 7 + 3) % 251 for i in range(n + 8)))
    dst = mmap.mmap(-1, mmap.PAGESIZE)  # page-aligned
    try:
        dst.write(b"\xa5" * mmap.PAGESIZE)
        to = ctypes.addressof(ctypes.c_char.from_buffer(dst))
        fn(to, ctypes.addressof(src) + 3, n)  # type: ignore[operator]
        return dst[:n] == bytes(src)[3:n + 3] and dst[n:n + BLOCK] == b"\xa5" * BLOCK
    finally:
        dst.close()


def routine() -> object:
    """The loaded routine, or None where it cannot be used."""
    global _loaded, _fn, why_not
    if not _loaded:
        with _lock:
            if not _loaded:
                try:
                    _fn = _load()
                except (OSError, ValueError, AttributeError) as exc:
                    _fn = None
                    why_not = f"{type(exc).__name__}: {exc}"
                _loaded = True
    return _fn


def enabled() -> bool:
    return knobs.STREAM_COPY.get() != 0 and routine() is not None


def stream_copy(dst: int, src: int, n: int) -> bool:
    """Copy ``n`` bytes from address ``src`` to address ``dst`` (which must not overlap) with
    streaming stores; False, with nothing copied, where that cannot be done (off, another
    platform, ``dst`` not 16-byte aligned): the caller copies another way."""
    if dst % ALIGN or not (dst + n <= src or src + n <= dst) or not enabled():
        return False
    body = n - n % BLOCK
    _fn(dst, src, body)  # type: ignore[operator, misc]
    if body < n:
        ctypes.memmove(dst + body, src + body, n - body)
    return True
