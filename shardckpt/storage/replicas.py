"""Several locations written as one: the same bytes go to every location, each at its own pace.

A :class:`TeeSink` feeds one thread per location through a small bounded queue, so a slow object
store does not stall the local disk (and vice versa beyond the queue's depth). A location that
fails is dropped from the tee; the others go on. Which locations hold a complete file is known
only after :meth:`TeeSink.commit`.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Sequence
from typing import Any

from ..errors import StorageError
from .location import Location, Sink

QUEUE_DEPTH = 8
_DONE = object()
_ABORT = object()


class _Branch:
    def __init__(self, index: int, location: Location, relpath: str) -> None:
        self.index = index
        self.location = location
        self.relpath = relpath
        self.error: BaseException | None = None
        self._queue: queue.Queue[Any] = queue.Queue(QUEUE_DEPTH)
        self._sink: Sink | None = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"shardckpt-tee-{index}")
        self._thread.start()

    def _run(self) -> None:
        ended = False  # the writer's end-of-stream marker was taken off the queue
        try:
            self._sink = self.location.open_sink(self.relpath)
            while True:
                item = self._queue.get()
                ended = item is _DONE or item is _ABORT
                if item is _DONE:
                    self._sink.commit()
                    return
                if item is _ABORT:
                    self._sink.abort()
                    return
                self._sink.write(item)
        except BaseException as exc:
            self.error = exc
            if self._sink is not None:
                with contextlib.suppress(Exception):
                    self._sink.abort()
            if not ended:  # keep taking what the writer sends until it says it is done
                while (item := self._queue.get()) is not _DONE and item is not _ABORT:
                    pass

    def put(self, item: Any) -> None:
        self._queue.put(item)

    def join(self) -> None:
        self._thread.join()


class TeeSink(Sink):
    """Write once, land everywhere: ``commit`` returns the indexes of the locations that hold it.

    ``commit`` raises only if no location succeeded; ``failures`` says what went wrong where.
    """

    def __init__(self, locations: Sequence[tuple[int, Location]], relpath: str) -> None:
        self.relpath = relpath
        self._branches = [_Branch(i, loc, relpath) for i, loc in locations]
        self.failures: dict[int, str] = {}

    def write(self, data: Any) -> int:
        for b in self._branches:
            b.put(data)
        return len(data)

    def commit(self) -> list[int]:  # type: ignore[override]
        for b in self._branches:
            b.put(_DONE)
        for b in self._branches:
            b.join()
        ok = [b.index for b in self._branches if b.error is None]
        self.failures = {b.index: f"{type(b.error).__name__}: {b.error}"
                         for b in self._branches if b.error is not None}
        if not ok:
            first = next(b.error for b in self._branches if b.error is not None)
            raise StorageError(f"{self.relpath}: no location could store it: "
                               + "; ".join(self.failures.values())) from first
        return ok

    def abort(self) -> None:
        for b in self._branches:
            b.put(_ABORT)
        for b in self._branches:
            b.join()


class DirectSink(Sink):
    """The one-location case without threads: commit returns ``[index]``."""

    def __init__(self, index: int, location: Location, relpath: str) -> None:
        self.index = index
        self._sink = location.open_sink(relpath)
        self.failures: dict[int, str] = {}

    def write(self, data: Any) -> int:
        return self._sink.write(data)

    def commit(self) -> list[int]:  # type: ignore[override]
        self._sink.commit()
        return [self.index]

    def abort(self) -> None:
        self._sink.abort()


def open_tee(locations: Sequence[tuple[int, Location]], relpath: str) -> TeeSink | DirectSink:
    if len(locations) == 1:
        index, location = locations[0]
        return DirectSink(index, location, relpath)
    return TeeSink(locations, relpath)
