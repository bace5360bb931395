"""Any fsspec filesystem that is not a local disk: memory://, s3://, gcs://, ...

Object stores have no rename and no fsync: a file becomes visible whole when its upload is closed,
so the manifest object written last is the commit. Nothing here calls ``fsync``/``fileno``.
"""

from __future__ import annotations

import contextlib
import errno
import posixpath
from typing import Any

import fsspec

from .location import Location, Sink, check_relpath


class _FsspecSink(Sink):
    def __init__(self, loc: FsspecLocation, relpath: str) -> None:
        self._loc, self._relpath = loc, relpath
        self._f = loc.fs.open(loc._path(relpath), "wb")

    def write(self, data: Any) -> int:
        return self._f.write(data)

    def commit(self) -> None:
        try:
            self._f.flush()
            self._f.close()
        except Exception as exc:
            self.abort()
            raise self._loc._err("upload", self._relpath, exc) from exc

    def abort(self) -> None:
        discard = getattr(self._f, "discard", None)
        with contextlib.suppress(Exception):
            if discard is not None:
                discard()  # aborts an s3 multipart upload, so no orphan parts are billed
            else:
                self._f.close()
        with contextlib.suppress(Exception):
            self._loc.fs.rm_file(self._loc._path(self._relpath))


class FsspecLocation(Location):
    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.root = root.rstrip("/")

    def _path(self, relpath: str) -> str:
        return self.root if relpath == "" else posixpath.join(self.root, check_relpath(relpath))

    def _call(self, op: str, relpath: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such file",
                                    f"{self.display}/{relpath}") from None
        except Exception as exc:
            raise self._err(op, relpath, exc) from exc

    def makedirs(self, reldir: str) -> None:
        self._call("mkdir", reldir, self.fs.makedirs, self._path(reldir), exist_ok=True)

    def open_sink(self, relpath: str) -> Sink:
        return self._call("create", relpath, _FsspecSink, self, relpath)

    def write_atomic(self, relpath: str, data: bytes) -> None:
        self._call("write", relpath, self.fs.pipe_file, self._path(relpath), data)

    def fsync_dir(self, reldir: str) -> None:
        return None

    def remove(self, relpath: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call("remove", relpath, self.fs.rm_file, self._path(relpath))

    def remove_tree(self, reldir: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call("remove tree", reldir, self.fs.rm, self._path(reldir), recursive=True)

    def read_range(self, relpath: str, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        return self._call("read", relpath, self.fs.cat_file, self._path(relpath),
                          start=offset, end=offset + length)

    def read_file(self, relpath: str, limit: int) -> bytes:
        size = self.size(relpath)
        if size is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", f"{self.display}/{relpath}")
        if size > limit:
            raise self._err("read", relpath, ValueError(f"{size} bytes exceeds limit {limit}"))
        return self._call("read", relpath, self.fs.cat_file, self._path(relpath))

    def size(self, relpath: str) -> int | None:
        try:
            info = self._call("stat", relpath, self.fs.info, self._path(relpath))
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return None
        return int(info["size"])

    def root_exists(self) -> bool:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.root)
        try:
            return bool(self._call("stat", ".", self.fs.exists, self.root)) or \
                bool(self.listdir(""))
        except FileNotFoundError:
            return False

    def listdir(self, reldir: str = "") -> list[str]:
        path = self._path(reldir)
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(path)
        try:
            entries = self._call("list", reldir or ".", self.fs.ls, path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)
