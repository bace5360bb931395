"""Progress of the long phases on one terminal line (rank 0 only, and only on a TTY)."""

from __future__ import annotations

import sys
from collections.abc import Callable


class Progress:
    """``[phase] i/n`` on one terminal line; a no-op unless enabled (rank 0, stderr a TTY)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.label, self.total, self.done = "", 0, 0

    def start(self, label: str, total: int) -> Callable[[], None]:
        self.label, self.total, self.done = label, total, 0
        self._draw()
        return self.tick

    def tick(self) -> None:
        self.done += 1
        self._draw()

    def _draw(self) -> None:
        if self.enabled:
            sys.stderr.write(f"\r\x1b[K[{self.label}] {self.done}/{self.total}")
            sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
