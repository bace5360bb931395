"""Bounded retries, with jittered exponential backoff, of transient storage failures.

fsspec backends retry on their own (s3fs: 5 tries of each request, botocore: its own retries), but
not everywhere: paginated listings, for one, rely on botocore alone. This is the safety net around
each whole :class:`~shardckpt.storage.location.Location` operation. Only transient failures are
retried (throttling, 5xx, timeouts, lost connections); a 4xx answer such as 403 or 404 is final.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..knobs import STORAGE_ATTEMPTS as ATTEMPTS
from ..knobs import STORAGE_RETRY_SECONDS as RETRY_SECONDS

T = TypeVar("T")


# S3 error codes (and their cousins in other stores) that mean "try again later".
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "TooManyRequests",
    "RequestLimitExceeded", "RequestThrottled", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "BadGateway", "GatewayTimeout",
})
# Exception classes (matched by name, so that no client library has to be imported) that mean the
# request never got an answer: botocore's ConnectionError / HTTPClientError families, aiohttp's
# payload and connection errors, urllib3's IncompleteRead, fsspec's FSTimeoutError.
_TRANSIENT_CLASSES = frozenset({
    "ConnectionError", "HTTPClientError", "ClientPayloadError", "ClientConnectionError",
    "ServerDisconnectedError", "IncompleteRead", "ProtocolError", "FSTimeoutError",
    "ResponseParserError",
})
# Answers that retrying cannot change.
_FINAL = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
          NotADirectoryError, ValueError, TypeError, KeyError, NotImplementedError)


def backoff(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (from 0): min(0.1 * 1.7**i, 15), jittered."""
    return min(0.1 * 1.7**attempt, 15.0) * random.uniform(0.5, 1.0)


def _http_status(exc: BaseException) -> tuple[int | None, str]:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = response.get("Error", {}).get("Code", "")
        return (status if isinstance(status, int) else None), str(code)
    for attr in ("status", "code"):  # aiohttp ClientResponseError, gcsfs HttpError
        value = getattr(exc, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value < 600:
            return value, ""
    return None, ""


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out and len(out) < 16:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def http_answer(exc: BaseException) -> tuple[int | None, str]:
    """The HTTP status and S3 error code behind ``exc`` (or an error it was raised from)."""
    for e in _chain(exc):
        status, code = _http_status(e)
        if status is not None or code:
            return status, code
    return None, ""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) is worth retrying."""
    for e in _chain(exc):
        if isinstance(e, _FINAL):
            return False
        status, code = _http_status(e)
        if code in _TRANSIENT_CODES:
            return True
        if status is not None:
            return status >= 500 or status in (408, 429)
        if isinstance(e, (TimeoutError, ConnectionError)):
            return True
        if any(cls.__name__ in _TRANSIENT_CLASSES for cls in type(e).__mro__):
            return True
    return False


def call_with_retries(fn: Callable[..., T], *args: Any, attempts: int | None = None,
                      max_seconds: float | None = None, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, retried while it fails transiently.

    At most ``attempts`` calls (default: ``SHARDCKPT_STORAGE_ATTEMPTS``), and no retry that would
    start later than ``max_seconds`` after the first call (default:
    ``SHARDCKPT_STORAGE_RETRY_SECONDS``). The last error is raised unchanged.
    """
    attempts = ATTEMPTS.get() if attempts is None else max(1, attempts)
    max_seconds = RETRY_SECONDS.get() if max_seconds is None else max_seconds
    deadline = time.monotonic() + max_seconds
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if i + 1 >= attempts or not is_transient(exc):
                raise
            delay = backoff(i)
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")
