"""What operators see of saves: a log record, a Prometheus textfile and callbacks per save.

Everything here happens on rank 0 only, once per save attempt (committed or failed), and nothing
here can fail or block a save for long: a broken callback, an unwritable metrics file or a bug
in the rendering is logged and forgotten.

Logging uses the standard :mod:`logging` module under the ``shardckpt`` logger (records come
from ``shardckpt.save``); the library installs no handler, so the application decides where
records go. A committed save gives one INFO record, a failed save one WARNING record; both carry
``record.shardckpt``, a dict (see :meth:`SaveEvent.to_record`), for structured log pipelines::

    logging.basicConfig(level=logging.INFO)   # or a JSON formatter reading record.shardckpt

``CheckpointManager(..., metrics_path="/var/lib/node_exporter/textfile/train.prom")`` keeps a
file in the text exposition format of node_exporter's textfile collector, replaced atomically
after every save attempt (its families: :mod:`.metrics_text`).

``CheckpointManager(..., callbacks=[fn, ...])`` calls each ``fn(event)`` with a frozen
:class:`SaveEvent` after every save attempt, on rank 0, from the background save thread (or from
``save()`` itself when the write finished first), before the save's handle resolves. Keep them
quick, and do not call ``save``/``wait``/``close`` of the same manager from one (it would wait
for itself). An exception from a callback is logged as a WARNING and ignored.

Credentials never appear: locations are shown by their redacted display form and URLs inside
error messages are redacted too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .metrics_text import SaveTotals, job_metrics_text
from .redact import scrub_urls
from .textfile import human_bytes, write_textfile

LOGGER_NAME = "shardckpt"
logger = logging.getLogger(f"{LOGGER_NAME}.save")

SaveCallback = Callable[["SaveEvent"], Any]


@dataclass(frozen=True)
class SaveEvent:
    """One save attempt, as seen by rank 0 (given to ``callbacks``, logged, exported).

    Times are in seconds. ``stall_s``: how long ``save()`` blocked its caller (from entry to
    return: waiting for the previous save, snapshotting, and for ``blocking`` saves the whole
    write). ``write_s``: from the state being snapshotted (ready to write) to the commit (or
    the failure). ``total_s``: from ``save()`` being called to the commit (or failure).
    ``throughput`` is ``nbytes / write_s`` in bytes per second and ``gbps`` the same in GB/s
    (10**9 bytes per second); both are 0 for a failed save. ``locations`` are the (redacted)
    locations that committed the checkpoint; ``degraded`` is true when some location missed
    it. For a failed save ``ok`` is false, ``nbytes`` 0, and ``error`` names the error.
    """

    step: int
    ok: bool
    nbytes: int
    stall_s: float
    write_s: float
    total_s: float
    world_size: int
    locations: tuple[str, ...] = ()
    degraded: bool = False
    blocking: bool = False
    unix_time: float = 0.0
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    error: str | None = None
    error_type: str | None = None

    @property
    def throughput(self) -> float:
        """Bytes per second of the write (``nbytes / write_s``); 0 for a failed save."""
        return self.nbytes / self.write_s if self.ok and self.write_s > 0 else 0.0

    @property
    def gbps(self) -> float:
        """:attr:`throughput` in GB/s (10**9 bytes per second)."""
        return self.throughput / 1e9

    def to_record(self) -> dict[str, Any]:
        """The ``extra={"shardckpt": ...}`` payload of the log record (JSON-friendly)."""
        return {"event": "save" if self.ok else "save_failed", "step": self.step, "ok": self.ok,
                "bytes": self.nbytes, "stall_s": self.stall_s, "write_s": self.write_s,
                "total_s": self.total_s, "gbps": self.gbps,
                "throughput_bytes_per_s": self.throughput, "locations": list(self.locations),
                "world_size": self.world_size, "degraded": self.degraded,
                "blocking": self.blocking, "unix_time": self.unix_time,
                "metrics": dict(self.metrics), "tags": list(self.tags), "error": self.error,
                "error_type": self.error_type}


# ---------------------------------------------------------------------------- the observer
class SaveObserver:
    """Turns finished saves into a log record, the metrics textfile and callback calls.

    ``enabled`` is true on rank 0 only; elsewhere :meth:`emit` does nothing.
    """

    def __init__(self, *, enabled: bool, root: str, world_size: int,
                 metrics_path: str | None = None, callbacks: Sequence[SaveCallback] = (),
                 urls: Sequence[str] = ()) -> None:
        self.enabled = enabled
        self.root = root
        self.world_size = world_size
        self.metrics_path = metrics_path
        self.callbacks = tuple(callbacks)
        self.urls = tuple(urls)
        self.totals = SaveTotals()
        self.started = time.time()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._version = _version()

    def start(self, step: int, *, metrics: Mapping[str, float], tags: Sequence[str],
              blocking: bool, t0: float) -> SaveTracker:
        return SaveTracker(self, step, dict(metrics), tuple(tags), blocking, t0)

    def publish(self) -> None:
        """Rewrite the metrics file now, if there is one (rank 0): when the manager starts (so
        that the job shows up at once), and when background retention fails between saves."""
        if self.enabled and self.metrics_path is not None:
            self._write_metrics()

    publish_initial = publish

    # -- one save done
    def emit(self, event: SaveEvent) -> None:
        if not self.enabled:
            return
        with self._lock:
            t = self.totals
            t.saves += 1
            t.last = event
            if event.ok:
                t.committed += 1
                t.degraded += int(event.degraded)
                t.failures_in_a_row = 0
                t.bytes += event.nbytes
                t.last_ok = event
            else:
                t.failures += 1
                t.failures_in_a_row += 1
                t.last_failed = event
            t.stall_s += event.stall_s
            t.write_s += event.write_s
        try:
            self._log(event)
        except Exception:  # never let observability fail a save
            logger.exception("shardckpt: could not log the save of step %d", event.step)
        if self.metrics_path is not None:
            self._write_metrics()
        for cb in self.callbacks:
            try:
                cb(event)
            except Exception as exc:  # no traceback: its text could hold what we redact
                frames = traceback.extract_tb(exc.__traceback__)
                where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
                logger.warning("shardckpt: save callback %s raised %s: %s%s (ignored; the save "
                               "of step %d is unaffected)", _name(cb), type(exc).__name__,
                               scrub_urls(str(exc), self.urls)[:1000], where, event.step)

    def _log(self, e: SaveEvent) -> None:
        extra = {LOGGER_NAME: e.to_record()}
        if e.ok:
            where = ", ".join(e.locations) or self.root
            logger.info("shardckpt: committed step %d: %s in %.3f s (%.3f GB/s), save() "
                        "stalled the caller %.3f s; %d location%s%s (%s), world size %d",
                        e.step, human_bytes(e.nbytes), e.write_s, e.gbps, e.stall_s,
                        len(e.locations), "s" * (len(e.locations) != 1),
                        ", DEGRADED" if e.degraded else "", where, e.world_size, extra=extra)
        else:
            logger.warning("shardckpt: save of step %d at %s FAILED after %.3f s: %s", e.step,
                           self.root, e.total_s, e.error, extra=extra)

    # -- the textfile
    def metrics_text(self) -> str:
        """The textfile (see :mod:`.metrics_text`)."""
        with self._lock:
            totals = SaveTotals(**vars(self.totals))
        return job_metrics_text(totals, root=self.root, world_size=self.world_size,
                                started=self.started, version=self._version)

    def _write_metrics(self) -> None:
        assert self.metrics_path is not None
        try:
            with self._write_lock:  # rendered and written in turn: the newest text lands last
                write_textfile(self.metrics_path, self.metrics_text())
        except Exception as exc:
            logger.warning("shardckpt: could not write the metrics file %s: %s: %s",
                           self.metrics_path, type(exc).__name__, exc)


class SaveTracker:
    """The timings of one save. The event is emitted once both halves are known: ``save()``
    has returned (or raised: :meth:`returned`) and the write has an outcome (:meth:`committed`
    / :meth:`failed`), from whichever thread comes second. So by the time ``save()`` returns and
    its handle resolves, the event has been logged, exported and given to the callbacks."""

    def __init__(self, observer: SaveObserver, step: int, metrics: dict[str, float],
                 tags: tuple[str, ...], blocking: bool, t0: float) -> None:
        self.observer, self.step, self.metrics, self.tags = observer, step, metrics, tags
        self.blocking = blocking
        self.t0 = t0  # time.monotonic() when save() was called
        self.t0_unix = time.time() - (time.monotonic() - t0)
        self.t_ready: float | None = None
        self.submit_stall: float | None = None
        self.stall_s: float | None = None
        self._outcome: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._emitted = False

    def submitted(self) -> None:
        """``save()`` is about to hand the write to the background (async saves return now)."""
        self.submit_stall = time.monotonic() - self.t0

    def ready(self) -> None:
        """The snapshot is ready: the write starts."""
        self.t_ready = time.monotonic()

    def manifest_timing(self) -> dict[str, Any]:
        """What goes into the manifest (``extra["timing"]``), known before the commit: when
        ``save()`` was called and when the write started (Unix times); ``stall_s`` for async
        saves (a blocking save stalls its caller until the commit, which the manifest's own
        ``unix_time`` marks)."""
        ready = self.t_ready if self.t_ready is not None else time.monotonic()
        return {"called_unix_time": self.t0_unix,
                "ready_unix_time": self.t0_unix + (ready - self.t0),
                "stall_s": None if self.blocking else self.submit_stall,
                "blocking": self.blocking}

    def committed(self, nbytes: int, locations: Sequence[str], degraded: bool,
                  world_size: int) -> None:
        self._finish({"ok": True, "nbytes": nbytes, "locations": tuple(locations),
                      "degraded": degraded, "world_size": world_size})

    def failed(self, exc: BaseException) -> None:
        text = scrub_urls(f"{type(exc).__name__}: {exc}", self.observer.urls)
        self._finish({"ok": False, "nbytes": 0, "error": text[:2000],
                      "error_type": type(exc).__name__})

    def returned(self) -> None:
        with self._lock:
            self.stall_s = time.monotonic() - self.t0
        self._maybe_emit()

    def _finish(self, outcome: dict[str, Any]) -> None:
        now = time.monotonic()
        start = self.t_ready if self.t_ready is not None else now
        outcome.update(write_s=max(now - start, 0.0), total_s=now - self.t0,
                       unix_time=time.time())
        with self._lock:
            self._outcome = outcome
        self._maybe_emit()

    def _maybe_emit(self) -> None:
        with self._lock:
            if self._emitted or self._outcome is None or self.stall_s is None:
                return
            self._emitted = True
            o = self._outcome
        if not self.observer.enabled:
            return
        try:
            event = SaveEvent(
                step=self.step, ok=o["ok"], nbytes=o["nbytes"], stall_s=self.stall_s,
                write_s=o["write_s"], total_s=max(o["total_s"], self.stall_s),
                world_size=o.get("world_size", self.observer.world_size),
                locations=o.get("locations", ()), degraded=o.get("degraded", False),
                blocking=self.blocking, unix_time=o["unix_time"], metrics=self.metrics,
                tags=self.tags, error=o.get("error"), error_type=o.get("error_type"))
            self.observer.emit(event)
        except Exception:  # a bug here must not fail the save
            logger.exception("shardckpt: could not report the save of step %d", self.step)


def check_callbacks(callbacks: Iterable[SaveCallback] | None) -> tuple[SaveCallback, ...]:
    if callbacks is None:
        return ()
    if callable(callbacks):
        raise TypeError("callbacks must be an iterable of callables (wrap a single one in a "
                        "list)")
    out = tuple(callbacks)
    for cb in out:
        if not callable(cb):
            raise TypeError(f"callbacks must be callables taking a SaveEvent, got {cb!r}")
    return out


def check_metrics_path(path: str | os.PathLike[str] | None) -> str | None:
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"metrics_path must be a local file path, got {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str) or not text or "://" in text:
        raise ValueError(f"metrics_path must be a local file path, got {text!r}")
    return text


def _name(cb: Any) -> str:
    return getattr(cb, "__qualname__", None) or type(cb).__name__


def _version() -> str:
    from .version import __version__

    return __version__
