"""Durations as people write them in retention rules: ``"90s"``, ``"36h"``, ``"1h30m"``."""

from __future__ import annotations

import math
import numbers
import re

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(rf"({_NUMBER})([smhdw])")
_DURATION = re.compile(rf"(?:{_NUMBER}[smhdw])+")


def parse_duration(value: float | str) -> float:
    """Return a duration in seconds.

    Accepts a non-negative finite number of seconds, or a string of one or more ``NUMBER UNIT``
    parts with units ``s``, ``m``, ``h``, ``d``, ``w`` (``"90s"``, ``"36h"``, ``"7d"``,
    ``"1h30m"``); a bare number string is seconds. Raises ``ValueError`` otherwise.
    """
    if isinstance(value, str):
        text = "".join(value.split()).lower()
        if re.fullmatch(_NUMBER, text):
            seconds = float(text)
        elif _DURATION.fullmatch(text):
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
        else:
            raise ValueError(f"cannot parse duration {value!r} (try '90s', '30m', '36h', '7d')")
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ValueError(f"a duration is seconds or a string like '36h', got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be finite and non-negative, got {value!r}")
    return seconds


def format_duration(value: float | str) -> str:
    """The duration as the user wrote it, or in the largest unit that divides it exactly."""
    if isinstance(value, str):
        return "".join(value.split()).lower()
    seconds = float(value)
    for unit in ("w", "d", "h", "m"):
        count = seconds / _UNIT_SECONDS[unit]
        if count >= 1 and count.is_integer():
            return f"{int(count)}{unit}"
    return f"{seconds:g}s"
