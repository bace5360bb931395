"""The eager snapshot's CPU copy: the whole of an eager save's stall, so it is made as cheap as a
copy can be.

* Staging buffers are reused across saves (engine/snapshot.py) and, from 2 MiB on, asked for
  transparent huge pages (``madvise``): the first save faults in 512 times fewer pages, and every
  copy takes fewer TLB misses.
* A contiguous CPU tensor is copied into a contiguous buffer of the same dtype as raw bytes,
  outside the GIL: from ``STREAM_MIN`` on with streaming stores (engine/streamcopy.py: the
  destination is written without first being read into the cache, about a third less memory
  traffic; glibc's ``memcpy`` does that only from 192 MiB on, on the benchmark machine), else,
  or where that routine is unavailable, by ``memmove`` (through ctypes). Anything else (another
  dtype, strides, a conjugate or negative bit) goes through ``Tensor.copy_``.

All of them change how the bytes get there, never which bytes: the copy is complete when
:func:`copy_into` returns, so it still is when ``save()`` returns.
"""

from __future__ import annotations

import ctypes

import torch

from .streamcopy import stream_copy

MEMCPY_MIN = 64 * 1024  # below this, copy_'s dispatch costs less than a ctypes call
STREAM_MIN = 2 << 20  # as for huge pages: smaller copies are few bytes of a state, and cheap


def plain(t: torch.Tensor) -> bool:
    """A dense, contiguous CPU tensor whose bytes are its values."""
    return t.device.type == "cpu" and t.layout == torch.strided and t.is_contiguous() \
        and not t.is_conj() and not t.is_neg()


def copy_into(buf: torch.Tensor, src: torch.Tensor) -> None:
    """``buf.copy_(src)``: as raw bytes (streamed, or by ``memmove``) where both hold the same
    dtype and shape contiguously on the CPU, else by ``copy_``."""
    n = src.numel() * src.element_size()
    if n >= MEMCPY_MIN and src.dtype == buf.dtype and src.shape == buf.shape \
            and plain(src) and plain(buf):
        dst, at = buf.data_ptr(), src.data_ptr()
        if n < STREAM_MIN or not stream_copy(dst, at, n):
            ctypes.memmove(dst, at, n)
    else:
        buf.copy_(src)
