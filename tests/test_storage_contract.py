"""The storage contract: every backend behaves like every other behind ``Location``.

Run on a local path, a ``file://`` URL, ``memory://`` and ``s3://`` (moto on 127.0.0.1), plus
S3-only checks (multipart uploads, orphan uploads, throttling, dead endpoints, credentials in
messages, ``FSSPEC_S3_*`` environment configuration) and unit tests of the retry policy.
"""

from __future__ import annotations

import functools
import os
import posixpath
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from s3_server import MotoServer, ThrottlingProxy, free_port, s3_options

from shardckpt.errors import StorageError
from shardckpt.storage import Location, open_location, redact
from shardckpt.storage import retry as R

MiB = 1 << 20
BACKENDS = ["local", "file", "memory", "s3"]
REPO = Path(__file__).resolve().parent.parent
# One botocore attempt per call: what is retried then is up to s3fs and to shardckpt.
NO_BOTO_RETRY = {"config_kwargs": {"retries": {"total_max_attempts": 1}, "connect_timeout": 2,
                                   "read_timeout": 10}}


@functools.cache
def _session() -> Any:
    """One aiobotocore session for the contract tests: a fresh one per S3FileSystem (the
    instance cache is cleared between tests) reloads botocore's models, about a second each."""
    import aiobotocore.session

    return aiobotocore.session.AioSession()


@dataclass
class Backend:
    kind: str
    make: Any  # (name: str = "run") -> Location, a fresh root each call
    s3: MotoServer | None = None


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    monkeypatch.setenv("SHARDCKPT_S3_BLOCK_SIZE", "5M")  # S3's minimum part: forces multipart
    kind = request.param
    memory_roots: list[str] = []

    def make(name: str = "run") -> Location:
        unique = f"{name}-{uuid.uuid4().hex[:8]}"
        if kind == "local":
            return open_location(str(tmp_path / unique))
        if kind == "file":
            return open_location(f"file://{tmp_path / unique}")
        if kind == "memory":
            memory_roots.append(f"/{unique}")
            return open_location(f"memory://{unique}")
        return open_location(server.new_root(unique), {**server.options, "session": _session()})

    server = request.getfixturevalue("s3") if kind == "s3" else None
    yield Backend(kind, make, server)
    if memory_roots:
        from fsspec.implementations.memory import MemoryFileSystem

        for root in memory_roots:
            for key in [k for k in MemoryFileSystem.store if k.startswith(root)]:
                MemoryFileSystem.store.pop(key, None)
            MemoryFileSystem.pseudo_dirs[:] = [d for d in MemoryFileSystem.pseudo_dirs
                                               if not d.startswith(root)]


@pytest.fixture
def loc(backend: Backend) -> Location:
    return backend.make()


def _split(loc: Location) -> tuple[str, str]:
    """(bucket, key prefix) of an s3 location."""
    bucket, _, prefix = loc.root.partition("/")  # type: ignore[attr-defined]
    return bucket, prefix


def _put(loc: Location, relpath: str, data: bytes, writes: int = 1) -> None:
    loc.makedirs(posixpath.dirname(relpath))  # the contract: a sink's directory is made first
    sink = loc.open_sink(relpath)
    step = -(-len(data) // writes) or 1
    for i in range(0, len(data), step):
        sink.write(memoryview(data)[i:i + step])
    sink.commit()


def _pattern(n: int, seed: int = 0) -> bytes:
    block = bytes((i * 131 + seed) % 251 for i in range(4096))
    return (block * (n // len(block) + 1))[:n]


# -- the contract, on every backend -------------------------------------------------------------

def test_makedirs_then_list(loc: Location) -> None:
    loc.makedirs("step-0000000001/sub")
    loc.makedirs("step-0000000001/sub")  # idempotent
    _put(loc, "step-0000000001/sub/a.shard", b"abc")
    assert loc.listdir("") == ["step-0000000001"]
    assert loc.listdir("step-0000000001") == ["sub"]
    assert loc.listdir("step-0000000001/sub") == ["a.shard"]


def test_sink_roundtrip(loc: Location) -> None:
    loc.makedirs("d")
    sink = loc.open_sink("d/x.shard")
    sink.write(b"hello ")
    sink.write(bytearray(b"world"))
    sink.write(memoryview(b"!!"))
    sink.commit()
    assert loc.size("d/x.shard") == 13
    assert loc.read_file("d/x.shard", 100) == b"hello world!!"
    assert loc.read_range("d/x.shard", 6, 5) == b"world"
    assert loc.read_range("d/x.shard", 0, 0) == b""
    assert loc.read_range("d/x.shard", 11, 10) == b"!!"  # a short read at the end
    assert loc.read_range("d/x.shard", 13, 4) == b""  # wholly past the end
    assert loc.read_range("d/x.shard", 100, 4) == b""
    with pytest.raises(StorageError):
        loc.read_file("d/x.shard", 12)  # over the limit


def test_empty_file(loc: Location) -> None:
    loc.makedirs("")
    sink = loc.open_sink("empty.shard")
    sink.commit()
    assert loc.size("empty.shard") == 0
    assert loc.read_file("empty.shard", 10) == b""
    assert loc.read_range("empty.shard", 0, 4) == b""


def test_abort_leaves_nothing(backend: Backend, loc: Location) -> None:
    loc.makedirs("d")
    sink = loc.open_sink("d/small.shard")
    sink.write(b"x" * 1000)
    sink.abort()
    big = loc.open_sink("d/big.shard")
    big.write(_pattern(6 * MiB))  # past one 5 MiB block: on S3 a multipart upload has begun
    if backend.s3 is not None:
        bucket, _ = _split(loc)
        uploads = backend.s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert len(uploads) == 1
    big.abort()
    assert loc.size("d/small.shard") is None
    assert loc.size("d/big.shard") is None
    assert loc.listdir("d") == []
    if backend.s3 is not None:
        uploads = backend.s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert uploads == [], "orphan multipart upload left behind"


def test_write_atomic(loc: Location) -> None:
    loc.makedirs("step-0000000002")
    loc.write_atomic("step-0000000002/manifest.json", b'{"v": 1}')
    assert loc.read_file("step-0000000002/manifest.json", 1024) == b'{"v": 1}'
    loc.write_atomic("step-0000000002/manifest.json", b'{"v": 22}')
    assert loc.read_file("step-0000000002/manifest.json", 1024) == b'{"v": 22}'
    assert loc.listdir("step-0000000002") == ["manifest.json"]  # no temporary left over
    loc.fsync_dir("step-0000000002")
    loc.fsync_dir("")


def test_missing_things(loc: Location) -> None:
    assert loc.listdir("nope") == []
    assert loc.listdir("nope/deeper") == []
    assert loc.size("nope/x") is None
    with pytest.raises(FileNotFoundError):
        loc.read_file("nope/x", 10)
    with pytest.raises(FileNotFoundError):
        loc.read_range("nope/x", 0, 10)
    loc.remove("nope/x")
    loc.remove_tree("nope")


def test_list_step_dirs(loc: Location) -> None:
    assert loc.list_step_dirs() == {}
    for name in ("step-0000000010", "step-0000000003", "step-12", "other", "step-00000000001"):
        loc.makedirs(name)
        _put(loc, f"{name}/f", b"1")  # object stores have no empty directories
    _put(loc, "step-0000000004", b"a file, named like a step")
    assert loc.list_step_dirs() == {3: "step-0000000003", 4: "step-0000000004",
                                    10: "step-0000000010"}


def test_remove_and_remove_tree(loc: Location) -> None:
    loc.makedirs("step-0000000001/a/b")
    _put(loc, "step-0000000001/a/b/deep", b"1")
    _put(loc, "step-0000000001/top", b"2")
    _put(loc, "keep", b"3")
    loc.remove("keep")
    loc.remove("keep")  # a second time: no error
    assert loc.size("keep") is None
    loc.remove_tree("step-0000000001")
    assert loc.listdir("") == []
    assert loc.list_step_dirs() == {}
    assert loc.size("step-0000000001/top") is None


def test_root_exists(backend: Backend) -> None:
    loc = backend.make("fresh")
    assert loc.root_exists() is False
    loc.makedirs("step-0000000001")
    _put(loc, "step-0000000001/f", b"1")
    assert loc.root_exists() is True


BAD_PATHS = ["..", "../x", "a/../../x", "a/..", "/etc/passwd", "/", "a\\b", "\\x", "a//b", "./a",
             "a/./b", "a/", "a\x00b", "..\\x"]


@pytest.mark.parametrize("bad", BAD_PATHS)
def test_relative_path_safety(loc: Location, bad: str) -> None:
    calls = [
        lambda: loc.open_sink(bad), lambda: loc.write_atomic(bad, b"x"),
        lambda: loc.read_range(bad, 0, 1), lambda: loc.read_file(bad, 1), lambda: loc.size(bad),
        lambda: loc.remove(bad), lambda: loc.remove_tree(bad), lambda: loc.makedirs(bad),
        lambda: loc.listdir(bad),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()


def test_large_file_roundtrip(backend: Backend, loc: Location) -> None:
    data = _pattern(12 * MiB, seed=7)
    loc.makedirs("step-0000000001")
    _put(loc, "step-0000000001/big.shard", data, writes=12)  # 1 MiB writes
    assert loc.size("step-0000000001/big.shard") == len(data)
    assert loc.read_file("step-0000000001/big.shard", len(data)) == data
    assert loc.read_range("step-0000000001/big.shard", 5 * MiB - 3, 7) == data[5 * MiB - 3:
                                                                             5 * MiB + 4]
    if backend.s3 is not None:  # went up as a multipart upload, in parts of >= 5 MiB
        bucket, prefix = _split(loc)
        head = backend.s3.client().head_object(Bucket=bucket,
                                               Key=f"{prefix}/step-0000000001/big.shard")
        assert head["ContentLength"] == len(data)
        assert head["ETag"].strip('"').endswith("-3"), head["ETag"]


# -- errors never carry credentials -------------------------------------------------------------

def test_redact_strips_credentials() -> None:
    assert redact("s3://AKIAXXXX:sekrit@bucket/run") == "s3://bucket/run"
    assert redact("https://user:pw@host:8443/a/b?X-Amz-Signature=abc&token=t") == \
        "https://host:8443/a/b"
    assert redact("memory://run") == "memory://run"
    assert redact("/local/path") == "/local/path"


def test_error_messages_are_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    loc = open_location(f"memory://scrub-{uuid.uuid4().hex[:8]}",
                        {"client_kwargs": {"aws_secret_access_key": "hunter2-secret"},
                         "token": "tok-123456"})

    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError("denied for https://AKIA:hunter2-secret@host/p?X-Amz-Signature=sig "
                      "with tok-123456")

    monkeypatch.setattr(loc.fs, "pipe_file", boom)  # type: ignore[attr-defined]
    with pytest.raises(StorageError) as info:
        loc.write_atomic("x", b"1")
    text = str(info.value)
    for secret in ("hunter2-secret", "tok-123456", "AKIA:", "X-Amz-Signature", "sig "):
        assert secret not in text, text
    assert "https://host/p" in text


def test_dead_endpoint_is_a_storage_error_without_credentials(
        s3: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDCKPT_STORAGE_ATTEMPTS", "2")
    options = s3_options(f"http://127.0.0.1:{free_port()}", key="AKIADEADBEEFKEYID",
                         secret="s3cr3t-value-do-not-print", **NO_BOTO_RETRY)
    loc = open_location("s3://bucket/run", options)
    start = time.monotonic()
    for op in (lambda: loc.write_atomic("m.json", b"{}"), lambda: loc.read_file("m.json", 10),
               lambda: loc.listdir("")):
        with pytest.raises(StorageError) as info:
            op()
        text = str(info.value)
        assert "s3cr3t-value-do-not-print" not in text and "AKIADEADBEEFKEYID" not in text
        assert text.startswith("s3://bucket/run"), text
    assert time.monotonic() - start < 30


def test_server_killed_mid_upload(s3: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDCKPT_S3_BLOCK_SIZE", "5M")
    monkeypatch.setenv("SHARDCKPT_STORAGE_ATTEMPTS", "1")
    loc = open_location(s3.new_root(), {**s3.options, **NO_BOTO_RETRY})
    sink = loc.open_sink("step-0000000001/a.shard")
    sink.write(_pattern(6 * MiB))  # one part is up
    s3.kill()
    try:
        start = time.monotonic()
        with pytest.raises(StorageError) as info:
            sink.write(_pattern(6 * MiB))
            sink.commit()
        sink.abort()  # what the writer does next: must neither hang nor raise
        assert time.monotonic() - start < 30
        assert "testing" not in str(info.value).replace("s3://test", "")
        with pytest.raises(StorageError):
            loc.listdir("")
    finally:
        s3.restart()
    loc2 = open_location(s3.new_root(), s3.options)  # the restarted server is usable
    _put(loc2, "f", b"ok")
    assert loc2.read_file("f", 10) == b"ok"


# -- S3 specifics ---------------------------------------------------------------------------------

def test_listing_cache_never_hides_other_writers(s3: MotoServer) -> None:
    loc = open_location(s3.new_root(), s3.options)
    _put(loc, "step-0000000001/a.shard", b"a")
    assert loc.listdir("step-0000000001") == ["a.shard"]  # now cached by s3fs
    bucket, prefix = _split(loc)
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/step-0000000001/b.shard", Body=b"bb")
    assert loc.size("step-0000000001/b.shard") == 2  # another rank's file
    assert loc.listdir("step-0000000001") == ["a.shard", "b.shard"]
    s3.client().delete_object(Bucket=bucket, Key=f"{prefix}/step-0000000001/a.shard")
    assert loc.size("step-0000000001/a.shard") is None
    assert loc.listdir("step-0000000001") == ["b.shard"]


def test_fsspec_environment_configuration(s3: MotoServer) -> None:
    """FSSPEC_S3_ENDPOINT_URL plus AWS_* credentials and no storage_options. fsspec reads its
    environment once, at import, into ``fsspec.config.conf``; so this runs in a fresh
    interpreter, the way a user's job would (and checks the storage layer never imports torch)."""
    bucket = s3.new_bucket()
    script = f"""
import sys, types
pkg = types.ModuleType("shardckpt")
pkg.__path__ = [{str(REPO / "shardckpt")!r}]
sys.modules["shardckpt"] = pkg  # the storage layer alone, without the torch-importing package
import fsspec.config
from shardckpt.storage import open_location
assert fsspec.config.conf["s3"]["endpoint_url"] == {s3.endpoint_url!r}, fsspec.config.conf
loc = open_location("s3://{bucket}/x")
loc.write_atomic("step-0000000001/manifest.json", b"env ok")
print(loc.read_file("step-0000000001/manifest.json", 100).decode(), loc.list_step_dirs())
assert "torch" not in sys.modules
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FSSPEC_")}
    env.update(FSSPEC_S3_ENDPOINT_URL=s3.endpoint_url, AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true")
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "env ok {1: 'step-0000000001'}"
    s3.client().head_object(Bucket=bucket, Key="x/step-0000000001/manifest.json")


def test_fsspec_environment_refresh_in_process(s3: MotoServer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """In a running process, a new FSSPEC_* variable needs ``fsspec.config.set_conf_env``."""
    import fsspec.config

    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3.endpoint_url)
    conf: dict[str, dict[str, Any]] = {}
    fsspec.config.set_conf_env(conf)
    monkeypatch.setattr(fsspec.config, "conf", conf)
    loc = open_location(f"s3://{s3.new_bucket()}/run")
    loc.write_atomic("a", b"1")
    assert loc.read_file("a", 1) == b"1"


def _workload(loc: Location, rounds: int) -> None:
    data = _pattern(11 * MiB, seed=3)
    loc.makedirs("step-0000000005")
    _put(loc, "step-0000000005/r0.shard", data, writes=11)  # a 3-part multipart upload
    _put(loc, "step-0000000005/r1.shard", b"small")
    loc.write_atomic("step-0000000005/manifest.json", b"{}")
    for _ in range(rounds):
        assert loc.list_step_dirs() == {5: "step-0000000005"}
        assert loc.listdir("step-0000000005") == ["manifest.json", "r0.shard", "r1.shard"]
        assert loc.size("step-0000000005/r0.shard") == len(data)
        assert loc.read_range("step-0000000005/r0.shard", 7 * MiB, 100) == \
            data[7 * MiB:7 * MiB + 100]
        assert loc.read_file("step-0000000005/manifest.json", 10) == b"{}"
    assert loc.read_file("step-0000000005/r0.shard", len(data)) == data
    loc.remove("step-0000000005/r1.shard")
    loc.remove_tree("step-0000000005")
    assert loc.list_step_dirs() == {}


@pytest.mark.parametrize("client", ["default", "no-botocore-retries"])
def test_throttled_workload_succeeds(s3: MotoServer, throttling_proxy: ThrottlingProxy,
                                     monkeypatch: pytest.MonkeyPatch, client: str) -> None:
    monkeypatch.setenv("SHARDCKPT_S3_BLOCK_SIZE", "5M")
    bucket = s3.new_bucket()
    extra = NO_BOTO_RETRY if client == "no-botocore-retries" else {}
    loc = open_location(f"s3://{bucket}/run", {**throttling_proxy.options, **extra})
    throttling_proxy.configure(every=3)
    # botocore's own backoff (legacy mode: up to 2**i s) makes the default client slow to test
    _workload(loc, rounds=1 if client == "default" else 3)
    assert throttling_proxy.throttled >= 6, vars(throttling_proxy)
    assert throttling_proxy.forwarded >= 2 * throttling_proxy.throttled
    assert s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_throttled_forever_gives_up_as_storage_error(
        s3: MotoServer, throttling_proxy: ThrottlingProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDCKPT_STORAGE_ATTEMPTS", "2")
    loc = open_location(f"s3://{s3.new_bucket()}/run", {**throttling_proxy.options,
                                                         **NO_BOTO_RETRY})
    loc.fs.retries = 2  # type: ignore[attr-defined]  # s3fs's own tries, to keep this quick
    throttling_proxy.configure(every=1)
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"SlowDown|reduce your request rate"):
        loc.write_atomic("manifest.json", b"{}")
    assert throttling_proxy.requests == 2 * 2  # shardckpt's 2 tries, of s3fs's 2 each
    assert throttling_proxy.forwarded == 0
    assert time.monotonic() - start < 60  # gave up: not retried on and on (a bound, not a speed)


@pytest.mark.parametrize(("status", "code"), [(403, "AccessDenied"), (400, "InvalidRequest")])
def test_client_errors_are_not_retried(s3: MotoServer, throttling_proxy: ThrottlingProxy,
                                       status: int, code: str) -> None:
    loc = open_location(f"s3://{s3.new_bucket()}/run", throttling_proxy.options)
    throttling_proxy.configure(every=1, status=status, code=code, message="no")
    with pytest.raises(StorageError) as info:
        loc.write_atomic("manifest.json", b"{}")
    assert throttling_proxy.requests == 1, "a 4xx answer must not be retried"
    assert "testing" not in str(info.value).replace("s3://test", "")


def test_not_found_is_not_retried(s3: MotoServer, throttling_proxy: ThrottlingProxy) -> None:
    loc = open_location(f"s3://{s3.new_bucket()}/run", throttling_proxy.options)
    with pytest.raises(FileNotFoundError):
        loc.read_range("missing.shard", 0, 10)
    assert throttling_proxy.requests == 1


# -- the retry policy, without I/O ----------------------------------------------------------------

class _ClientError(Exception):
    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"{code} ({status})")
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


# botocore's EndpointConnectionError derives from its own ConnectionError (not the builtin one);
# retry.py matches such classes by name, so that it never has to import a client library.
_BotoConnectionError = type("ConnectionError", (Exception,), {})


class EndpointConnectionError(_BotoConnectionError):
    pass


def _raised_from(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(("exc", "transient"), [
    (_ClientError(503, "SlowDown"), True),
    (_ClientError(500, "InternalError"), True),
    (_ClientError(400, "RequestTimeout"), True),
    (_ClientError(429, "TooManyRequests"), True),
    (_ClientError(403, "AccessDenied"), False),
    (_ClientError(404, "NoSuchKey"), False),
    (_ClientError(416, "InvalidRange"), False),
    (_raised_from(OSError(16, "busy"), _ClientError(503, "SlowDown")), True),
    (_raised_from(PermissionError("denied"), _ClientError(403, "AccessDenied")), False),
    (FileNotFoundError("gone"), False),
    (ConnectionRefusedError("refused"), True),
    (TimeoutError("slow"), True),
    (EndpointConnectionError("no route"), True),
    (ValueError("bad"), False),
    (RuntimeError("bug"), False),
])
def test_is_transient(exc: BaseException, transient: bool) -> None:
    assert R.is_transient(exc) is transient


def test_call_with_retries_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(R.time, "sleep", sleeps.append)
    calls = []

    def flaky(fail: int) -> str:
        calls.append(1)
        if len(calls) <= fail:
            raise _ClientError(503, "SlowDown")
        return "ok"

    assert R.call_with_retries(flaky, 3, attempts=5) == "ok"
    assert len(calls) == 4 and len(sleeps) == 3
    for i, delay in enumerate(sleeps):
        assert 0.5 * min(0.1 * 1.7**i, 15) <= delay <= min(0.1 * 1.7**i, 15)
    calls.clear()
    with pytest.raises(_ClientError):
        R.call_with_retries(flaky, 10, attempts=3)
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(_ClientError):
        R.call_with_retries(flaky, 10, attempts=100, max_seconds=0.0)  # no time for a retry
    assert len(calls) == 1

    def forbidden() -> None:
        calls.append(1)
        raise _ClientError(403, "AccessDenied")

    calls.clear()
    with pytest.raises(_ClientError):
        R.call_with_retries(forbidden, attempts=5)
    assert len(calls) == 1
    assert all(R.backoff(i) <= 15 for i in range(40))


def test_read_into_and_records_on_every_backend(loc: Location) -> None:
    """``read_into`` (each backend's own, or the base class's fallback) and lease records."""
    from shardckpt.storage.base import Location as Base
    from shardckpt.storage.records import LEASE_DIR, Record, put_record, read_record

    loc.makedirs("d")
    loc.write_atomic("d/f", bytes(range(200)))
    out = bytearray(50)
    assert loc.read_into("d/f", 100, memoryview(out)) == 50 and bytes(out) == bytes(range(100, 150))
    out = bytearray(50)
    assert loc.read_into("d/f", 180, memoryview(out)) == 20  # short at the end of the file
    assert bytes(out[:20]) == bytes(range(180, 200))
    out = bytearray(10)
    assert Base.read_into(loc, "d/f", 5, memoryview(out)) == 10 and bytes(out) == bytes(
        range(5, 15))
    loc.makedirs(LEASE_DIR)
    record = Record.new("writer", ["step-0000000001"], 60.0, 1000.0)
    put_record(loc, f"{LEASE_DIR}/a.json", record)
    assert read_record(loc, f"{LEASE_DIR}/a.json") == record
    newer = Record.new("writer", ["step-0000000001"], 60.0, 2000.0)
    put_record(loc, f"{LEASE_DIR}/a.json", newer)  # replaced whole
    assert read_record(loc, f"{LEASE_DIR}/a.json") == newer
    assert loc.modified_time(f"{LEASE_DIR}/a.json") is not None
    assert loc.modified_time("no/such/file") is None


def test_a_backend_missing_an_operation_fails_when_made() -> None:
    from shardckpt.storage.base import Location as Base

    class Partial(Base):
        def listdir(self, reldir: str = "") -> list[str]:
            return []

    with pytest.raises(TypeError, match="abstract"):
        Partial()  # type: ignore[abstract]
