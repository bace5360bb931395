"""Resident memory of a process tree while a block runs, and giving freed heap back to the OS."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
from typing import Any

import psutil


class RssSampler:
    """Peak RSS of a process, of its children and of the two together while the block runs.

    ``with RssSampler() as rss: ...`` samples every ``interval`` seconds on a daemon thread, and
    once more on exit. Afterwards:

    * ``before``: the process's RSS on entry;
    * ``peak``: the process's own peak RSS (at least ``before``);
    * ``children_peak``: the peak of the summed RSS of all its descendants (e.g. a checkpoint
      daemon), refreshed as children come and go every 20 samples;
    * ``tree_peak``: the peak of the process's RSS plus its descendants' at the same sample;
    * ``samples``: how many samples were taken.

    Samples a short spike can fall between are missed; the thread itself takes the GIL briefly
    every ``interval``.
    """

    def __init__(self, interval: float = 0.005, pid: int | None = None) -> None:
        self.interval = interval
        self.proc = psutil.Process(pid)
        self.before = self.peak = self.children_peak = self.tree_peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._children: list[psutil.Process] = []
        self.samples = 0

    def _sample(self) -> None:
        rss = self.proc.memory_info().rss
        self.peak = max(self.peak, rss)
        if self.samples % 20 == 0:
            with contextlib.suppress(psutil.Error):
                self._children = self.proc.children(recursive=True)
        child = 0
        for c in self._children:
            with contextlib.suppress(psutil.Error):
                child += c.memory_info().rss
        self.children_peak = max(self.children_peak, child)
        self.tree_peak = max(self.tree_peak, rss + child)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self.before = self.peak = self.tree_peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._sample()


def rss_bytes(pid: int | None = None) -> int:
    """The current RSS of process ``pid`` (this process by default)."""
    return psutil.Process(pid).memory_info().rss


def tree_rss_bytes(pid: int | None = None) -> int:
    """The current RSS of process ``pid`` plus that of all its descendants."""
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for c in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += c.memory_info().rss
    return total


def gc_collect() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``), so a
    phase's RSS is not hidden in, nor inflated by, pages an earlier phase freed but kept."""
    gc.collect()
    if _LIBC is not None:
        with contextlib.suppress(AttributeError, OSError):
            _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _load_libc()
