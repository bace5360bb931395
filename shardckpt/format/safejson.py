"""Strict JSON for everything shardckpt reads back: no duplicate keys, no NaN, bounded size.

Python's ``json`` silently keeps the last of duplicate keys and accepts ``NaN``; a manifest that
relies on either is malformed, so both are refused with the file and key named.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import CorruptCheckpointError

MAX_JSON_BYTES = 1 << 30


class _Duplicate(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-standard constant {name}")


def loads(data: bytes | bytearray | memoryview, where: str) -> Any:
    """Parse UTF-8 JSON strictly; ``CorruptCheckpointError`` naming ``where`` on any problem."""
    if len(data) > MAX_JSON_BYTES:
        raise CorruptCheckpointError(f"{where}: JSON document of {len(data)} bytes is too large")
    try:
        text = bytes(data).decode("utf-8")
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constants)
    except _Duplicate as exc:
        raise CorruptCheckpointError(f"{where}: duplicate JSON key {exc.args[0]!r}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{where}: invalid JSON ({exc})") from None


def dumps(obj: Any) -> bytes:
    """Compact, deterministic UTF-8 JSON; refuses NaN/inf (encode those explicitly)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      sort_keys=False).encode("utf-8")
