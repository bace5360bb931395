"""A real S3 endpoint for tests: moto's server on loopback, and a proxy in front of it that
throttles (HTTP 503 SlowDown) a deterministic share of the requests.

Nothing here contacts any address but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

KEY = SECRET = "testing"
REGION = "us-east-1"

# The environment a test session needs to talk to moto and to nothing else: fixed credentials (so
# botocore never asks an instance-metadata service), no profile, no real endpoint.
TEST_ENV = {
    "AWS_ACCESS_KEY_ID": KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
}
UNSET_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
             "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_options(endpoint_url: str, **extra: Any) -> dict[str, Any]:
    """fsspec kwargs of one s3:// location served at ``endpoint_url``."""
    return {"endpoint_url": endpoint_url, "key": KEY, "secret": SECRET,
            "client_kwargs": {"region_name": REGION}, **extra}


class MotoServer:
    """``moto_server`` as a subprocess on 127.0.0.1.

    ``endpoint_url``, ``options`` (fsspec kwargs of one location), ``storage_options``
    (``{"s3://": options}``, the shape ``CheckpointManager`` takes); ``new_bucket()``,
    ``new_root()``, ``client()`` (boto3); ``reset()`` drops every bucket; ``kill()`` and
    ``restart()`` simulate the server dying (its state is lost) and coming back on the same port.
    """

    def __init__(self, port: int | None = None, startup_timeout: float = 30.0) -> None:
        self.port = port or free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
        self._client: Any = None

    @property
    def options(self) -> dict[str, Any]:
        return s3_options(self.endpoint_url)

    @property
    def storage_options(self) -> dict[str, dict[str, Any]]:
        return {"s3://": self.options}

    def _command(self) -> list[str]:
        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        base = [exe] if os.path.exists(exe) else [sys.executable, "-m", "moto.server"]
        return [*base, "-H", "127.0.0.1", "-p", str(self.port)]

    def start(self) -> MotoServer:
        if self.alive():
            return self
        env = {**os.environ, **TEST_ENV}
        self.proc = subprocess.Popen(self._command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}: {self.log()}")
            if self._answers():
                return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"moto_server did not answer within {self.startup_timeout}s: "
                           f"{self.log()}")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        with open(self._log.name, errors="replace") as f:
            return f.read()[-2000:]

    def kill(self) -> None:
        """SIGKILL: the server dies as it would in a crash, mid-request if one is running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> MotoServer:
        """Kill (if alive) and start again on the same port, empty."""
        self.kill()
        self._client = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the port may linger a moment after the kill
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind(("127.0.0.1", self.port))
                break
            except OSError:
                time.sleep(0.1)
        return self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        with contextlib.suppress(OSError):
            self._log.close()
            os.unlink(self._log.name)

    def reset(self) -> None:
        """Forget every bucket and object (moto's ``POST /moto-api/reset``)."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()

    def client(self) -> Any:
        """A boto3 S3 client for this server (to look behind s3fs's back)."""
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                                        aws_access_key_id=KEY, aws_secret_access_key=SECRET)
        return self._client

    def new_bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def new_root(self, path: str = "run") -> str:
        """``s3://<fresh bucket>/<path>``."""
        return f"s3://{self.new_bucket()}/{path}"

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "te", "trailer", "transfer-encoding", "upgrade", "expect"})


class ThrottlingProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that answers some requests itself.

    Request number n (1-based, counted over all requests) is answered with ``status`` and the S3
    error ``code`` (default: 503 SlowDown) when ``every`` divides n, or else with probability
    ``fraction`` drawn from a generator seeded with ``seed`` (deterministic for one client thread).
    The others are forwarded unchanged. ``requests``, ``throttled`` and ``forwarded`` count them.
    ``configure()`` changes the rule on the fly; ``stop()`` (or leaving the ``with`` block) shuts
    the server and every open connection down.
    """

    def __init__(self, upstream: str, *, every: int = 0, fraction: float = 0.0, seed: int = 0,
                 status: int = 503, code: str = "SlowDown",
                 message: str = "Please reduce your request rate.", timeout: float = 30.0) -> None:
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        if self.upstream_host not in ("127.0.0.1", "localhost"):
            raise ValueError("the proxy only forwards to loopback")
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self.requests = self.throttled = self.forwarded = 0
        self.configure(every=every, fraction=fraction, seed=seed, status=status, code=code,
                       message=message)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def configure(self, *, every: int = 0, fraction: float = 0.0, seed: int = 0,
                  status: int = 503, code: str = "SlowDown",
                  message: str = "Please reduce your request rate.") -> None:
        if every < 0 or not 0.0 <= fraction <= 1.0:
            raise ValueError("every must be >= 0 and fraction in [0, 1]")
        with self._lock:
            self.every, self.fraction, self._rng = every, fraction, random.Random(seed)
            self.status = status
            self.body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                         f"<Message>{message}</Message></Error>").encode()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def options(self) -> dict[str, Any]:
        return s3_options(self.endpoint_url)

    @property
    def storage_options(self) -> dict[str, dict[str, Any]]:
        return {"s3://": self.options}

    def start(self) -> ThrottlingProxy:
        handler = type("Handler", (_ProxyHandler,), {"proxy": self, "timeout": self.timeout})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="throttling-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> ThrottlingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _decide(self) -> bool:
        with self._lock:
            self.requests += 1
            throttle = bool(self.every and self.requests % self.every == 0) or \
                (self.fraction > 0 and self._rng.random() < self.fraction)
            if throttle:
                self.throttled += 1
            return throttle

    def _forward(self, method: str, path: str, headers: list[tuple[str, str]],
                 body: bytes | None) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port,
                                          timeout=self.timeout)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                conn.putheader(k, v)
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            with self._lock:
                self.forwarded += 1
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and "Expect: 100-continue" answered for us
    proxy: ThrottlingProxy

    def setup(self) -> None:
        super().setup()
        with self.proxy._lock:
            self.proxy._conns.add(self.connection)

    def finish(self) -> None:
        with self.proxy._lock:
            self.proxy._conns.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _handle(self) -> None:
        body = self._read_body()
        if self.proxy._decide():
            self.send_response_only(self.proxy.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(self.proxy.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(self.proxy.body)
            return
        headers = [(k, v) for k, v in self.headers.items()
                   if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"]
        if body is not None:
            headers.append(("Content-Length", str(len(body))))
        try:
            status, reason, resp_headers, data = self.proxy._forward(self.command, self.path,
                                                                     headers, body)
        except OSError:  # upstream gone: answer as a load balancer would
            status, reason, resp_headers, data = 502, "Bad Gateway", [], b""
        self.send_response_only(status, reason)
        for k, v in resp_headers:
            if k.lower() in _HOP_BY_HOP:
                continue
            if k.lower() == "content-length" and self.command != "HEAD":
                continue
            self.send_header(k, v)
        if self.command != "HEAD" and status not in (204, 304) and status >= 200:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
