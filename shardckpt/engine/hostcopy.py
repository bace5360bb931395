"""The eager snapshot's CPU copy: the whole of an eager save's stall, so it is made as cheap as a
copy can be.

* Staging buffers are reused across saves (engine/snapshot.py) and, from 2 MiB on, asked for
  transparent huge pages (``madvise``): the first save faults in 512 times fewer pages, and every
  copy takes fewer TLB misses.
* A contiguous CPU tensor is copied into a contiguous buffer of the same dtype with one
  ``memcpy`` (through ctypes, without the GIL). For large sizes glibc's ``memcpy`` uses
  non-temporal stores, which write the destination without reading it into the cache first:
  less memory traffic than an element-wise ``copy_``. Anything else (another dtype, strides, a
  conjugate or negative bit) goes through ``Tensor.copy_``.

Both change how the bytes get there, never which bytes: the copy is still complete when
``save()`` returns.
"""

from __future__ import annotations

import ctypes

import torch

MEMCPY_MIN = 64 * 1024  # below this, copy_'s dispatch costs less than a ctypes call


def plain(t: torch.Tensor) -> bool:
    """A dense, contiguous CPU tensor whose bytes are its values."""
    return t.device.type == "cpu" and t.layout == torch.strided and t.is_contiguous() \
        and not t.is_conj() and not t.is_neg()


def copy_into(buf: torch.Tensor, src: torch.Tensor) -> None:
    """``buf.copy_(src)``: by ``memcpy`` where both hold the same dtype and shape contiguously on
    the CPU, else by ``copy_``."""
    n = src.numel() * src.element_size()
    if n >= MEMCPY_MIN and src.dtype == buf.dtype and src.shape == buf.shape \
            and plain(src) and plain(buf):
        ctypes.memmove(buf.data_ptr(), src.data_ptr(), n)
    else:
        buf.copy_(src)
