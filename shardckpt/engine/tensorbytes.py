"""Zero-copy byte views of CPU tensors, without NumPy.

``Tensor.numpy()`` is the usual way to get at a tensor's bytes, but it needs NumPy, which torch's
own wheels do not require: with it, every save and load failed after a plain ``pip install``. A
ctypes array laid over the tensor's memory exports the buffer protocol instead. The array holds a
reference to the tensor and every memoryview holds the array, so the memory lives as long as any
view of it.
"""

from __future__ import annotations

import ctypes

import torch


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview (format ``B``) of the bytes of a contiguous CPU tensor, in place."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"byte_view needs a contiguous CPU tensor, got one on {t.device} "
                         f"with strides {t.stride()}")
    if t.is_conj() or t.is_neg():  # lazily conjugated/negated views: the bytes are not the values
        raise ValueError("byte_view needs a tensor without a conjugate or negative bit")
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    array = (ctypes.c_ubyte * n).from_address(t.data_ptr())
    array._owner = t  # type: ignore[attr-defined]  # keeps the memory alive
    return memoryview(array).cast("B")


__all__ = ["byte_view"]
