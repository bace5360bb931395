"""Any fsspec filesystem that is not a local disk: memory://, s3://, gcs://, ...

Object stores have no rename and no fsync: a file becomes visible whole when its upload is closed,
so the manifest object written last is the commit. Nothing here calls ``fsync``/``fileno``.

Uploads. A sink streams through the backend's buffered file; on S3 that is ``S3File``: a file
smaller than one block (``SHARDCKPT_S3_BLOCK_SIZE``, default 32 MiB, at least S3's 5 MiB minimum
part) goes up as one PUT, a larger one as a multipart upload in parts of at least one block. A
sink holds about one block in memory. ``S3File`` uploads its parts one after another (s3fs
2026.9: "TODO: concurrent here"), so throughput comes from writing several files at once
(``SHARDCKPT_FILES_PER_RANK``, ``SHARDCKPT_IO_THREADS``); ``write_atomic`` goes through
``pipe_file``, which sends the parts of a large object concurrently. ``abort`` aborts the
multipart upload, so that no orphan parts are left behind to be billed.

Failures. Every operation but a sink's ``write``/``commit`` (a stream cannot be replayed; s3fs
retries each part request) is retried while it fails transiently (see :mod:`.retry`). Then a
missing file is a ``FileNotFoundError`` and anything else a ``StorageError`` whose message names
the redacted URL and carries no credential from the URL or ``storage_options``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import fsspec
from fsspec.spec import AbstractBufferedFile

from .. import knobs
from ..errors import StorageError
from ..redact import redact_url as redact
from ..redact import scrub_urls, secret_values
from .base import Location, Sink, check_relpath
from .deadline import bounded
from .retry import call_with_retries, http_answer

_S3_PROTOCOLS = ("s3", "s3a")
def _with_connect_timeout(options: dict[str, Any]) -> dict[str, Any]:
    """S3 options with botocore's connect timeout bounded by ``SHARDCKPT_CONNECT_TIMEOUT``
    (botocore waits 60 s for each connection to a silent address), unless the user set one."""
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("connect_timeout", knobs.CONNECT_TIMEOUT_S.get())
    return {**options, "config_kwargs": config}


class _FsspecSink(Sink):
    def __init__(self, loc: FsspecLocation, relpath: str, path: str) -> None:
        self._loc, self._relpath, self._path = loc, relpath, path
        self._f = loc.fs.open(path, "wb", **loc._open_kwargs)

    def _bounded(self, fn: Any, *args: Any) -> Any:
        if self._loc._endpoint is None:
            return fn(*args)
        return bounded(self._loc, fn, *args)

    def write(self, data: Any) -> int:
        try:
            return self._bounded(self._f.write, data)
        except Exception as exc:
            raise self._loc._map("upload", self._relpath, exc) from exc

    def commit(self) -> None:
        try:
            self._bounded(self._f.flush)
            self._bounded(self._f.close)
        except Exception as exc:
            self.abort()
            raise self._loc._map("upload", self._relpath, exc) from exc

    def abort(self) -> None:
        discard = getattr(self._f, "discard", None)
        with contextlib.suppress(Exception):
            if discard is not None:  # aborts an s3 multipart upload: no orphan parts billed
                self._bounded(discard)
            else:
                self._bounded(self._f.close)
        if isinstance(self._f, AbstractBufferedFile):
            self._f.closed = True  # else, if discard failed, __del__ would upload the rest
        # A buffered object-store file shows nothing until its commit, and a commit that failed
        # is never followed by a delete of its key: by then the key may hold another writer's
        # object (a writer stalled past its lease, whose upload the other aborted), and a stray
        # object of ours in an uncommitted step is reaped later. Other files (memory://) are
        # visible while written, by this process only: removed.
        if not isinstance(self._f, AbstractBufferedFile):
            with contextlib.suppress(Exception):
                self._bounded(self._loc.fs.rm_file, self._path)


class FsspecLocation(Location):
    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        self.url = url.rstrip("/")
        scheme = urlsplit(url).scheme
        if scheme in _S3_PROTOCOLS:
            storage_options = _with_connect_timeout(storage_options)
        self.fs, root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.root = root.rstrip("/")
        secrets = secret_values(storage_options)
        secrets.update(v for v in (urlsplit(url).username, urlsplit(url).password) if v)
        self._secrets = sorted(secrets, key=len, reverse=True)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) \
            else (self.fs.protocol,)
        self._open_kwargs: dict[str, Any] = {}
        self._bucket_seen = False  # S3: the bucket answered a HEAD once (makedirs)
        self._endpoint = self.endpoint()  # None: no probe, no deadline (memory://, ...)
        if set(protocols) & set(_S3_PROTOCOLS) and "default_block_size" not in storage_options:
            self._open_kwargs["block_size"] = knobs.S3_BLOCK_SIZE.get()

    def endpoint(self) -> str | None:
        """The HTTP(S) endpoint behind this location (``scheme://host[:port]``), where it can be
        told without a request: S3 (its ``endpoint_url``, else AWS's), GCS, ``http(s)://``."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) \
            else (self.fs.protocol,)
        if set(protocols) & set(_S3_PROTOCOLS):
            url = getattr(self.fs, "endpoint_url", None) or \
                (getattr(self.fs, "client_kwargs", None) or {}).get("endpoint_url") or \
                os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            return str(url) if url else "https://s3.amazonaws.com"
        if set(protocols) & {"gs", "gcs"}:
            return "https://storage.googleapis.com"
        if set(protocols) & {"http", "https"}:
            parts = urlsplit(self.url)
            return f"{parts.scheme}://{parts.netloc}"
        return None

    def _path(self, relpath: str) -> str:
        return self.root if relpath == "" else posixpath.join(self.root, check_relpath(relpath))

    def _scrub(self, text: str) -> str:
        return scrub_urls(text, [self.url], self._secrets)

    def _err(self, op: str, relpath: str, exc: BaseException) -> StorageError:
        text = self._scrub(f"{type(exc).__name__}: {exc}")
        endpoint = self.endpoint()
        at = f" (endpoint {self._scrub(redact(endpoint))})" if endpoint else ""
        return StorageError(f"{self.display}/{relpath}: {op} failed{at}: {text}")

    def _map(self, op: str, relpath: str, exc: BaseException) -> Exception:
        if isinstance(exc, FileNotFoundError):
            return FileNotFoundError(errno.ENOENT, "no such file", f"{self.display}/{relpath}")
        if isinstance(exc, StorageError):
            return exc
        return self._err(op, relpath, exc)

    def _retried(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn`` with retries of transient failures, bounded by :mod:`.deadline` where the
        endpoint is known (a dead one is given up within seconds). Errors unchanged."""
        if self._endpoint is None:
            return call_with_retries(fn, *args, **kwargs)
        return bounded(self, call_with_retries, fn, *args, **kwargs)

    def _call(self, op: str, relpath: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._retried(fn, *args, **kwargs)
        except Exception as exc:
            raise self._map(op, relpath, exc) from exc

    def _forget(self, path: str) -> None:
        """Drop cached listings of ``path`` and its parents: another process may have changed
        them, and s3fs answers ``info`` of a file missing from a cached listing without asking."""
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)

    def makedirs(self, reldir: str) -> None:
        """Object stores have no directories; on S3 this only checks, once, that the bucket
        exists (s3fs ``makedirs`` would *create* a missing bucket: a misspelt name, or an
        endpoint that restarted empty, must fail instead)."""
        path = self._path(reldir)  # a path that could leave the root: ValueError
        if self._is_s3():
            self._check_bucket(reldir)
            return
        self._call("mkdir", reldir, self.fs.makedirs, path, exist_ok=True)

    def _check_bucket(self, reldir: str) -> None:
        problem = self.bucket_problem(reldir)
        if problem is not None:
            raise StorageError(f"{problem}; shardckpt never creates buckets: create it, or fix "
                               f"the URL")

    def bucket_problem(self, reldir: str = "") -> str | None:
        """S3: ``"<url>: bucket 'b' does not exist at <endpoint>"`` when the root's bucket is
        missing, else None (also where the bucket cannot be told: not S3, or no right to HEAD
        it). ``StorageError`` if the store fails otherwise."""
        if self._bucket_seen or not self._is_s3():
            return None
        bucket = self.fs.split_path(self.root)[0]
        missing = (f"{self.display}: bucket {bucket!r} does not exist at "
                   f"{self._scrub(redact(self.endpoint() or ''))}")
        try:
            self._retried(self.fs.call_s3, "head_bucket", Bucket=bucket)
            self._bucket_seen = True
        except FileNotFoundError:
            return missing
        except Exception as exc:
            status, code = http_answer(exc)
            if status == 404 or code in ("NoSuchBucket", "404"):
                return missing
            if status == 403:
                return None  # no right to HEAD the bucket: the writes themselves will tell
            raise self._map("check bucket", reldir or ".", exc) from exc
        return None

    def open_sink(self, relpath: str) -> Sink:
        return self._call("create", relpath, _FsspecSink, self, relpath, self._path(relpath))

    def write_atomic(self, relpath: str, data: bytes) -> None:
        self._call("write", relpath, self.fs.pipe_file, self._path(relpath), data)

    def put_record(self, relpath: str, data: bytes) -> None:
        self.write_atomic(relpath, data)  # one small PUT: visible whole, or not at all

    def _is_s3(self) -> bool:
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) \
            else (self.fs.protocol,)
        return bool(set(protocols) & set(_S3_PROTOCOLS))

    def write_exclusive(self, relpath: str, data: bytes) -> None:
        """S3: s3fs's ``pipe_file(mode="create")``, a ``PUT`` (or the completion of a multipart
        upload) with ``If-None-Match: *``: the store refuses it (412) if the key exists, and
        this raises ``FileExistsError``. Elsewhere: a check, then the write (exclusive only
        against writers that check first; fsspec offers no conditional write in general)."""
        path = self._path(relpath)
        if not self._is_s3():
            if self.size(relpath) is not None:
                raise FileExistsError(errno.EEXIST, "exists", f"{self.display}/{relpath}")
            self.write_atomic(relpath, data)
            return
        try:
            self._retried(self.fs.pipe_file, path, data, mode="create")
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "exists", f"{self.display}/{relpath}") from None
        except Exception as exc:
            status, code = http_answer(exc)
            if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise FileExistsError(errno.EEXIST, "exists", f"{self.display}/{relpath}") \
                    from None
            raise self._map("exclusive write", relpath, exc) from exc
        finally:
            self._forget(path)

    def modified_time(self, relpath: str) -> float | None:
        path = self._path(relpath)
        try:
            try:
                stamp = self._retried(self.fs.modified, path)
            except (NotImplementedError, AttributeError, IsADirectoryError, KeyError):
                info = self._retried(self.fs.info, path)
                stamp = next((info[k] for k in ("mtime", "LastModified", "last_modified",
                                                "updated", "created") if info.get(k)), None)
            if isinstance(stamp, datetime):
                if stamp.tzinfo is None:
                    stamp = stamp.replace(tzinfo=timezone.utc)
                return stamp.timestamp()
            if isinstance(stamp, str):
                return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
            return float(stamp) if stamp is not None else None
        except Exception:  # absent, or a backend that cannot tell: the caller decides
            return None

    def fsync_dir(self, reldir: str) -> None:
        return None

    def remove(self, relpath: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call("remove", relpath, self.fs.rm_file, self._path(relpath))

    def move_tree(self, src: str, dst: str) -> None:
        """Object stores have no rename: copy every object, then delete the source."""
        source, target = self._path(src), self._path(dst)
        self._forget(source)
        self._call("move", src, self.fs.copy, source, target, recursive=True)
        self._forget(target)
        self.remove_tree(src)

    def remove_tree(self, reldir: str) -> None:
        """Every object under ``reldir``; on S3 also every multipart upload left unfinished
        under it (a killed or failed save's), so that no orphan parts stay billed."""
        path = self._path(reldir)
        self._forget(path)
        with contextlib.suppress(FileNotFoundError):
            self._call("remove tree", reldir, self.fs.rm, path, recursive=True)
        if self._is_s3():
            self._abort_uploads(reldir, path)

    def pending_uploads(self) -> dict[str, float]:
        """S3: the top-level entries of the root (step directories) under which multipart
        uploads are unfinished, each with the newest upload's start (UNIX time); an entry may
        hold no visible object at all (a save killed mid-upload of its only file). Elsewhere
        ``{}``."""
        if not self._is_s3():
            return {}
        bucket, prefix, _ = self.fs.split_path(self.root)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        found: dict[str, float] = {}
        for upload in self._uploads(".", bucket, prefix):
            top, sep, _ = upload["Key"][len(prefix):].partition("/")
            started = upload.get("Initiated")
            if not sep or not top or not isinstance(started, datetime):
                continue
            stamp = (started if started.tzinfo else started.replace(tzinfo=timezone.utc)
                     ).timestamp()
            found[top] = max(found.get(top, stamp), stamp)
        return found

    def _uploads(self, reldir: str, bucket: str, prefix: str) -> list[dict[str, Any]]:
        uploads: list[dict[str, Any]] = []
        markers: dict[str, str] = {}
        while True:
            page = self._call("list uploads", reldir, self.fs.call_s3, "list_multipart_uploads",
                              Bucket=bucket, Prefix=prefix, **markers)
            uploads += page.get("Uploads") or ()
            if not page.get("IsTruncated"):
                return uploads
            markers = {"KeyMarker": page.get("NextKeyMarker", ""),
                       "UploadIdMarker": page.get("NextUploadIdMarker", "")}

    def _abort_uploads(self, reldir: str, path: str) -> None:
        bucket, prefix, _ = self.fs.split_path(path)
        for upload in self._uploads(reldir, bucket, prefix.rstrip("/") + "/"):
            with contextlib.suppress(FileNotFoundError):
                self._call("abort upload", reldir, self.fs.call_s3, "abort_multipart_upload",
                           Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])

    def read_range(self, relpath: str, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        try:
            return self._call("read", relpath, self.fs.cat_file, self._path(relpath),
                              start=offset, end=offset + length)
        except StorageError as exc:
            status, code = http_answer(exc)
            if status == 416 or code == "InvalidRange":  # wholly past the end: like a short read
                return b""
            raise

    def read_file(self, relpath: str, limit: int) -> bytes:
        size = self.size(relpath)
        if size is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", f"{self.display}/{relpath}")
        if size > limit:
            raise self._err("read", relpath, ValueError(f"{size} bytes exceeds limit {limit}"))
        return self._call("read", relpath, self.fs.cat_file, self._path(relpath))

    def size(self, relpath: str) -> int | None:
        path = self._path(relpath)
        self._forget(path)
        try:
            info = self._call("stat", relpath, self.fs.info, path)
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return None
        return int(info["size"])

    def root_exists(self) -> bool:
        self._forget(self.root)
        try:
            return bool(self._call("stat", ".", self.fs.exists, self.root)) or \
                bool(self.listdir(""))
        except FileNotFoundError:
            return False

    def listdir(self, reldir: str = "") -> list[str]:
        path = self._path(reldir)
        self._forget(path)
        try:
            entries = self._call("list", reldir or ".", self.fs.ls, path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)
