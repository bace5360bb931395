"""Dtype names as stored on disk, with their element sizes.

Names are torch's own (``str(torch.float32)`` without the ``torch.`` prefix), so a checkpoint is
readable without guessing. Only names in :data:`ITEMSIZE` are accepted when reading.
"""

from __future__ import annotations

import functools
from typing import Any

from ..errors import CorruptCheckpointError

ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "complex128": 16,
    "complex64": 8,
    "complex32": 4,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
}


def itemsize(name: str, where: str = "") -> int:
    """Element size of a stored dtype name; ``CorruptCheckpointError`` for an unknown name."""
    try:
        return ITEMSIZE[name]
    except (KeyError, TypeError):
        raise CorruptCheckpointError(f"{where}: unknown dtype {name!r}") from None


def dtype_name(dtype: Any) -> str:
    """The stored name of a ``torch.dtype``; ``TypeError`` for one we cannot store."""
    name = str(dtype).removeprefix("torch.")
    if name not in ITEMSIZE or _torch_dtypes().get(name) is not dtype:
        raise TypeError(f"dtype {dtype} cannot be checkpointed")
    return name


def torch_dtype(name: str, where: str = "") -> Any:
    """The ``torch.dtype`` for a stored name (validated)."""
    itemsize(name, where)
    try:
        return _torch_dtypes()[name]
    except KeyError:
        raise CorruptCheckpointError(
            f"{where}: dtype {name!r} is not supported by this torch build"
        ) from None


@functools.cache
def _torch_dtypes() -> dict[str, Any]:
    import torch

    return {n: getattr(torch, n) for n in ITEMSIZE if isinstance(getattr(torch, n, None),
                                                               torch.dtype)}
