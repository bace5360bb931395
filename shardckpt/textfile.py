"""Prometheus textfile output (the node exporter's textfile collector reads ``*.prom``), and
byte counts for people. No torch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .atomicfile import write_atomic


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


# ---------------------------------------------------------------------------- Prometheus text
def escape_label(value: str) -> str:
    """A label value in the text exposition format: backslash, double quote, newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float | int | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render_textfile(families: Sequence[tuple[str, str, str, Sequence[tuple[Mapping[str, str],
                                                                             float]]]]) -> str:
    """Families ``(name, type, help, [(labels, value), ...])`` in the text exposition format.
    Families without samples are left out."""
    lines: list[str] = []
    for name, kind, help_text, samples in families:
        if not samples:
            continue
        lines.append(f"# HELP {name} {_escape_help(help_text)}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            tag = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{tag}}} {format_value(value)}" if tag
                         else f"{name} {format_value(value)}")
    return "\n".join(lines) + "\n"


def write_textfile(path: str, text: str | bytes) -> None:
    """Replace ``path`` with ``text`` atomically, readable by all (the collector may run as
    another user)."""
    write_atomic(path, text, perm=0o644, fsync=False)
