"""Logs, stdout kept for the JSON document, and writing the document and its figure.

A benchmark prints exactly one JSON document on stdout (from rank 0 under torchrun) and logs on
stderr. Libraries sometimes print on stdout too; ``capture_stdout`` sends those lines to stderr
so that stdout stays parseable, and ``emit_stdout``/``write_outputs`` write to the real stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: This process's global rank under torchrun (0 when not under torchrun).
RANK = int(os.environ.get("RANK", "0"))

_STDOUT_FD: int | None = None


def log(msg: str, all_ranks: bool = False) -> None:
    """Write ``msg`` to stderr with the rank and the time; only rank 0 logs unless ``all_ranks``."""
    if RANK == 0 or all_ranks:
        print(f"[bench r{RANK} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def capture_stdout() -> None:
    """Keep the real stdout for ``emit_stdout``; whatever else writes to fd 1 goes to stderr.

    Call once, at the start of the script, before any library has printed anything.
    """
    global _STDOUT_FD
    sys.stdout.flush()
    _STDOUT_FD = os.dup(1)
    os.dup2(2, 1)


def emit_stdout(text: str) -> None:
    """Write ``text`` to the real stdout (the one saved by ``capture_stdout``, else fd 1)."""
    if _STDOUT_FD is None:
        sys.stdout.flush()
    fd = _STDOUT_FD if _STDOUT_FD is not None else 1
    data = text.encode()
    while data:
        data = data[os.write(fd, data):]


def to_json(doc: dict[str, Any]) -> str:
    """The document as the benchmarks write it: indented, anything unknown as ``str``."""
    return json.dumps(doc, indent=2, default=str)


def write_outputs(doc: dict[str, Any], *, out: str | None = None, plot: str | None = None,
                  draw: Callable[[dict[str, Any], str], None] | None = None,
                  stdout: bool = True) -> str:
    """Write ``doc`` as JSON to ``out`` (if given) and to stdout, and its figure to ``plot``.

    ``draw(doc, path)`` makes the figure; it runs only when both ``plot`` and ``draw`` are given.
    A figure that cannot be made (no matplotlib, a bad value) is logged and skipped: it never
    loses the JSON, which is written first. Returns the JSON text. Call on one rank only.
    """
    text = to_json(doc)
    if out:
        Path(out).write_text(text + "\n")
    if plot and draw is not None:
        try:
            draw(doc, plot)
        except Exception as exc:  # a missing matplotlib must not lose the results
            log(f"plot failed: {type(exc).__name__}: {exc}")
    if stdout:
        emit_stdout(text + "\n")
    return text


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
