"""Progress bars for long CLI work: only on a terminal, never with ``--json``.

tqdm draws them when it is installed (``pip install 'shardckpt[cli]'``); without it, or when
stderr is not a TTY, or with ``--json``, the work runs silently. Bars go to stderr and vanish
when done, so stdout stays exactly what the command prints.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def wanted(args: argparse.Namespace | None = None) -> bool:
    """True when a bar may be drawn: stderr is a terminal and ``--json`` was not given."""
    if args is not None and getattr(args, "json", False):
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def bar(iterable: Iterable[T], *, desc: str, total: int | None = None,
        enabled: bool = True, unit: str = "it") -> Iterator[T]:
    """``iterable`` itself, with a tqdm bar on stderr while it is consumed if ``enabled``."""
    if not enabled:
        return iter(iterable)
    tqdm = _tqdm()
    if tqdm is None:
        return iter(iterable)
    return iter(tqdm(iterable, desc=desc, total=total, unit=unit, leave=False,
                     file=sys.stderr, dynamic_ncols=True, mininterval=0.2))


class Bar:
    """A bar updated by hand (``update(n)``), e.g. in bytes; a no-op when disabled."""

    def __init__(self, *, desc: str, total: int | None, enabled: bool = True,
                 unit: str = "it", unit_scale: bool = False) -> None:
        tqdm = _tqdm() if enabled else None
        self._bar: Any = None if tqdm is None else tqdm(
            desc=desc, total=total, unit=unit, unit_scale=unit_scale, leave=False,
            file=sys.stderr, dynamic_ncols=True, mininterval=0.2)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tqdm() -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm
