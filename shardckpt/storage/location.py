"""One checkpoint root on one filesystem: byte I/O, listing, and the commit primitive.

This layer sees bytes and relative paths only (never tensors, never torch). Paths handed in are
relative to the root and must stay inside it: absolute paths, ``..`` components and, on local
disks, symlinks resolving outside the root are refused.

Local paths get a direct ``os`` implementation (real fsync of files and directories, ``pread``,
exclusive create); every other URL goes through fsspec.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import uuid
from typing import Any, BinaryIO
from urllib.parse import urlsplit, urlunsplit

from .. import knobs
from ..errors import StorageError

STEP_DIR = re.compile(r"step-(\d{10})")
WRITE_BUFFER = 1 << 20


def step_dirname(step: int) -> str:
    if not 0 <= step < 10**10:
        raise ValueError(f"step must be in [0, 10**10), got {step}")
    return f"step-{step:010d}"


def redact(url: str) -> str:
    """A URL safe to print: user info (keys, passwords) and query strings removed."""
    parts = urlsplit(url)
    if not parts.scheme or parts.scheme == "file":
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def check_relpath(relpath: str) -> str:
    """Normalise a relative path and refuse anything that could leave the root."""
    if not relpath or relpath.startswith(("/", "\\")) or "\\" in relpath or "\x00" in relpath:
        raise ValueError(f"path {relpath!r} is not a plain relative path")
    parts = relpath.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"path {relpath!r} is not a plain relative path")
    return relpath


class Sink:
    """A file being written: ``write`` bytes, then ``commit`` (durable) or ``abort`` (gone)."""

    def write(self, data: Any) -> int:
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class Location:
    """Interface of a checkpoint root. See :func:`open_location`."""

    url: str
    is_local: bool = False

    @property
    def display(self) -> str:
        return redact(self.url)

    def _err(self, op: str, relpath: str, exc: BaseException) -> StorageError:
        text = str(exc).replace(self.url, self.display)
        return StorageError(f"{self.display}/{relpath}: {op} failed: {type(exc).__name__}: {text}")

    # -- writing
    def makedirs(self, reldir: str) -> None: ...
    def open_sink(self, relpath: str) -> Sink: ...
    def write_atomic(self, relpath: str, data: bytes) -> None:
        """Make ``relpath`` hold ``data`` all at once: readers see the old state or the new."""
    def fsync_dir(self, reldir: str) -> None: ...
    def remove(self, relpath: str) -> None: ...
    def remove_tree(self, reldir: str) -> None: ...
    # -- reading
    def read_range(self, relpath: str, offset: int, length: int) -> bytes: ...
    def read_file(self, relpath: str, limit: int) -> bytes: ...
    def size(self, relpath: str) -> int | None: ...
    def listdir(self, reldir: str = "") -> list[str]: ...
    def root_exists(self) -> bool: ...

    def list_step_dirs(self) -> dict[int, str]:
        """Step number -> directory name for every ``step-NNNNNNNNNN`` entry of the root."""
        out = {}
        for name in self.listdir(""):
            m = STEP_DIR.fullmatch(name)
            if m:
                out[int(m.group(1))] = name
        return out


def _fsync_enabled() -> bool:
    return knobs.FSYNC.get() != 0


class _LocalSink(Sink):
    def __init__(self, path: str) -> None:
        self.path = path
        self._f: BinaryIO = open(path, "xb", buffering=WRITE_BUFFER)

    def _fail(self, op: str, exc: OSError) -> StorageError:
        return StorageError(f"{self.path}: {op} failed: {type(exc).__name__}: {exc}")

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            raise self._fail("write", exc) from exc

    def commit(self) -> None:
        """Flush, fsync and close; on any failure the file is closed and removed. A failed
        fsync is final: the data may be lost, so it is never retried into a success."""
        try:
            self._f.flush()
            if _fsync_enabled():
                os.fsync(self._f.fileno())
            self._f.close()
        except OSError as exc:
            self.abort()
            raise self._fail("flush/fsync", exc) from exc

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class LocalLocation(Location):
    is_local = True

    def __init__(self, url: str) -> None:
        self.url = url
        path = url[len("file://"):] if url.startswith("file://") else url
        self.root = os.path.abspath(os.path.expanduser(path))

    def _path(self, relpath: str, *, must_exist: bool = False) -> str:
        if relpath == "":
            return self.root
        full = os.path.join(self.root, check_relpath(relpath))
        if must_exist or os.path.lexists(full):
            real_root = os.path.realpath(self.root)
            real = os.path.realpath(full)
            if real != real_root and not real.startswith(real_root + os.sep):
                raise StorageError(f"{self.display}/{relpath}: resolves outside the checkpoint "
                                   f"root (symlink?)")
        return full

    def _wrap(self, op: str, relpath: str, exc: OSError) -> Exception:
        if isinstance(exc, FileNotFoundError):
            return FileNotFoundError(errno.ENOENT, "no such file", f"{self.display}/{relpath}")
        return self._err(op, relpath, exc)

    def makedirs(self, reldir: str) -> None:
        try:
            os.makedirs(self._path(reldir), exist_ok=True)
        except OSError as exc:
            raise self._wrap("mkdir", reldir, exc) from exc

    def open_sink(self, relpath: str) -> Sink:
        try:
            return _LocalSink(self._path(relpath))
        except OSError as exc:
            raise self._wrap("create", relpath, exc) from exc

    def write_atomic(self, relpath: str, data: bytes) -> None:
        final = self._path(relpath)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            sink = _LocalSink(tmp)
            try:
                sink.write(data)
                sink.commit()
            except BaseException:
                sink.abort()
                raise
            os.replace(tmp, final)
            self.fsync_dir(posixpath.dirname(relpath))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise self._wrap("atomic write", relpath, exc) from exc

    def fsync_dir(self, reldir: str) -> None:
        if not _fsync_enabled():
            return
        try:
            fd = os.open(self._path(reldir), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._wrap("fsync directory", reldir or ".", exc) from exc

    def remove(self, relpath: str) -> None:
        try:
            os.unlink(self._path(relpath))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._wrap("remove", relpath, exc) from exc

    def remove_tree(self, reldir: str) -> None:
        top = self._path(reldir)
        try:
            for dirpath, dirnames, filenames in os.walk(top, topdown=False):
                for name in filenames:
                    os.unlink(os.path.join(dirpath, name))
                for name in dirnames:
                    path = os.path.join(dirpath, name)
                    (os.unlink if os.path.islink(path) else os.rmdir)(path)
            os.rmdir(top)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._wrap("remove tree", reldir, exc) from exc

    def read_range(self, relpath: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self._path(relpath, must_exist=True), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                return _pread_all(fd, offset, length)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._wrap("read", relpath, exc) from exc

    def read_into(self, relpath: str, offset: int, out: memoryview) -> int:
        """Read straight into ``out`` (no intermediate bytes); returns bytes read."""
        try:
            fd = os.open(self._path(relpath, must_exist=True), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                done = 0
                while done < len(out):
                    n = os.preadv(fd, [out[done:]], offset + done)
                    if n == 0:
                        break
                    done += n
                return done
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._wrap("read", relpath, exc) from exc

    def read_file(self, relpath: str, limit: int) -> bytes:
        size = self.size(relpath)
        if size is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", f"{self.display}/{relpath}")
        if size > limit:
            raise StorageError(f"{self.display}/{relpath}: {size} bytes exceeds the limit {limit}")
        return self.read_range(relpath, 0, size)

    def size(self, relpath: str) -> int | None:
        try:
            st = os.stat(self._path(relpath, must_exist=True), follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._wrap("stat", relpath, exc) from exc
        return st.st_size

    def root_exists(self) -> bool:
        return os.path.isdir(self.root)

    def listdir(self, reldir: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self._path(reldir)))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._wrap("list", reldir or ".", exc) from exc


def _pread_all(fd: int, offset: int, length: int) -> bytes:
    parts = []
    while length > 0:
        data = os.pread(fd, length, offset)
        if not data:
            break
        parts.append(data)
        offset += len(data)
        length -= len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def open_location(url: str, storage_options: dict[str, Any] | None = None) -> Location:
    """A :class:`Location` for a path or fsspec URL. ``storage_options`` are fsspec kwargs."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"checkpoint root must be a non-empty string, got {url!r}")
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme in ("", "file", "local"):
        return LocalLocation(url.replace("local://", "file://", 1))
    from .remote import FsspecLocation

    return FsspecLocation(url, storage_options or {})

