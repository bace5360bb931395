"""Typed accessors for fields of parsed JSON, raising ``CorruptCheckpointError`` with a location.

Every number that later sizes an allocation or a read passes through here first, so a hostile
value (negative, 2**62, a float, a bool pretending to be an int) never reaches the allocator.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..errors import CorruptCheckpointError

MAX_BYTES = 1 << 50  # 1 PiB: far above any real shard, far below overflow territory
MAX_NDIM = 64
_HEX16 = re.compile(r"[0-9a-f]{16}")


def fail(where: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{where}: {what}")


def obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise fail(where, f"expected an object, got {type(value).__name__}")
    return value


def get(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise fail(where, f"missing field {key!r}")
    return d[key]


def integer(value: Any, where: str, lo: int = 0, hi: int = MAX_BYTES) -> int:
    if type(value) is not int:
        raise fail(where, f"expected an integer, got {value!r}"[:200])
    if not lo <= value <= hi:
        raise fail(where, f"{value} is outside [{lo}, {hi}]")
    return value


def string(value: Any, where: str, max_len: int = 4096) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise fail(where, f"expected a string, got {value!r}"[:200])
    return value


def hex16(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _HEX16.fullmatch(value):
        raise fail(where, f"expected a 16-digit lowercase hex checksum, got {value!r}"[:200])
    return value


def int_list(value: Any, where: str, hi: int = MAX_BYTES, max_len: int = MAX_NDIM) -> list[int]:
    if not isinstance(value, list) or len(value) > max_len:
        raise fail(where, f"expected a list of at most {max_len} integers")
    if all(type(v) is int and 0 <= v <= hi for v in value):  # no name built per element
        return list(value)
    return [integer(v, f"{where}[{i}]", 0, hi) for i, v in enumerate(value)]


def numel(shape: list[int], where: str) -> int:
    """Product of a shape, refusing products that could not describe real bytes."""
    n = 1
    for dim in shape:
        n *= dim
        if n > MAX_BYTES:
            raise fail(where, f"shape {shape} has more than {MAX_BYTES} elements")
    return n
