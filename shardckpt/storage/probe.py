"""Is a location reachable? A bounded answer, so that a dead replica costs seconds, not minutes.

A client library asked to reach a dead endpoint retries on its own (botocore: up to 5 attempts
with exponential backoff; a black-holed address waits out a 60 s connect timeout each time), and
:mod:`.retry` adds its own attempts on top: reaching the error could take a minute. Read paths
(listing steps, resuming, ``ls``) and the start of a save cannot wait that long for a replica
they may not even need, so before using a remote location they *probe* it:

- where the location's HTTP endpoint is known (S3, GCS, ``http(s)://``): one ``HEAD /`` of the
  endpoint with ``SHARDCKPT_CONNECT_TIMEOUT`` seconds to connect and answer. *Any* HTTP answer
  (a 403, a 503 SlowDown) means the store is up: throttling is the operations' to retry. A
  refused connection, a DNS failure or silence means unreachable;
- elsewhere: one cheap request (``root_exists``) on a daemon thread with the same time to
  answer; a 4xx-like final error counts as an answer;
- a quick failure is tried again, up to ``SHARDCKPT_CONNECT_ATTEMPTS`` probes in all; silence
  for a whole timeout is not;
- a location found unreachable is skipped without a probe for ``SHARDCKPT_UNREACHABLE_TTL``
  seconds, then probed again.

Local disks are never probed. :class:`Unreachable` stands in for a location that failed its
probe: every operation raises ``StorageError`` at once, naming it and why. (An HTTP proxy set
in the environment is not used by the probe: it asks the endpoint directly.)
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from .. import knobs
from ..errors import StorageError
from .base import Location, Sink, redact
from .retry import backoff, is_transient


def _http_once(endpoint: str, timeout: float) -> str | None:
    """None if ``endpoint`` answers a ``HEAD /`` with any HTTP status within ``timeout``."""
    parts = urlsplit(endpoint)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname or "", parts.port, timeout=timeout)
    try:
        conn.request("HEAD", "/")
        conn.getresponse().read()
        return None
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def _probe_once(location: Location, timeout: float) -> str | None:
    """None if ``location`` answered within ``timeout`` seconds, else why not."""
    outcome: list[BaseException | None] = []
    done = threading.Event()

    def run() -> None:
        try:
            location.root_exists()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        done.set()

    threading.Thread(target=run, name="shardckpt-probe", daemon=True).start()
    if not done.wait(timeout):
        return f"no answer within {timeout:g} s"
    exc = outcome[0]
    if exc is None or not is_transient(exc):
        return None  # it answered (a final error such as 403 is the operation's to report)
    return str(exc)


def probe(location: Location, timeout: float | None = None,
          attempts: int | None = None) -> str | None:
    """None if ``location`` is reachable, else a one-line reason (see the module)."""
    if location.is_local:
        return None
    timeout = float(knobs.CONNECT_TIMEOUT_S.get()) if timeout is None else timeout
    attempts = knobs.CONNECT_ATTEMPTS.get() if attempts is None else max(1, attempts)
    endpoint = getattr(location, "endpoint", lambda: None)()
    why: str | None = None
    at = f" (endpoint {redact(endpoint)})" if endpoint else ""
    for i in range(attempts):
        why = _http_once(endpoint, timeout) if endpoint else _probe_once(location, timeout)
        if why is None or why.startswith("no answer"):
            return why and why + at  # answered, or silent for a whole timeout: ask no more
        if i + 1 < attempts:
            time.sleep(min(backoff(i), timeout))
    return why and why + at


class Unreachable(Location):
    """A location that failed its probe: every operation fails at once with ``StorageError``."""

    def __init__(self, location: Location, why: str) -> None:
        self.url = location.url
        self.is_local = location.is_local
        self.inner = location
        self.why = why

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise StorageError(f"{self.display}: unreachable: {self.why}")

    def open_sink(self, relpath: str) -> Sink:
        return self._fail()

    makedirs = write_atomic = write_exclusive = put_record = fsync_dir = _fail
    remove = remove_tree = move_tree = _fail
    read_range = read_file = size = listdir = root_exists = modified_time = _fail


_down: dict[str, tuple[float, str]] = {}  # location -> when it was found unreachable, and why


def _key(location: Location) -> str:
    """The URL and the filesystem's identity (its options): one entry per endpoint and root."""
    fs = getattr(location, "fs", None)
    return f"{location.url} {getattr(fs, '_fs_token', '')}"
_down_lock = threading.Lock()


def mark_down(location: Location, why: str) -> None:
    """Record ``location`` as unreachable now (a call to it found it dead mid-operation): it is
    skipped, without a probe, for ``SHARDCKPT_UNREACHABLE_TTL`` seconds."""
    with _down_lock:
        _down[_key(location)] = (time.monotonic(), why)


def down_reason(location: Location) -> str | None:
    """Why ``location`` was found unreachable within the last ``SHARDCKPT_UNREACHABLE_TTL``
    seconds; None if it was not."""
    with _down_lock:
        since, why = _down.get(_key(location), (None, ""))
    if since is None or time.monotonic() - since >= knobs.UNREACHABLE_TTL_S.get():
        return None
    return why


def reachable(location: Location) -> Location:
    """``location`` itself if it answers its probe, else an :class:`Unreachable` in its place.

    A location found unreachable is not probed again for ``SHARDCKPT_UNREACHABLE_TTL`` seconds
    (each read or save meanwhile skips it at once); then it is probed again, so a replica that
    came back is used again.
    """
    if isinstance(location, Unreachable) or location.is_local:
        return location  # judged already (one probe per location per command or survey)
    with _down_lock:
        since, why = _down.get(_key(location), (None, ""))
    if since is not None and time.monotonic() - since < knobs.UNREACHABLE_TTL_S.get():
        return Unreachable(location, why)
    found = probe(location)
    with _down_lock:
        if found is None:
            _down.pop(_key(location), None)
        else:
            _down[_key(location)] = (time.monotonic(), found)
    return location if found is None else Unreachable(location, found)


def reachable_all(locations: Sequence[Location]) -> list[Location]:
    """:func:`reachable` of each location, probed all at once."""
    if all(loc.is_local for loc in locations):
        return list(locations)
    with ThreadPoolExecutor(max_workers=len(locations), thread_name_prefix="shardckpt-probe"
                            ) as pool:
        return list(pool.map(reachable, locations))
