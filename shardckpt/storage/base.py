"""What every storage backend provides: :class:`Location` (one checkpoint root) and :class:`Sink`
(one file being written). Abstract: a backend that lacks an operation fails when it is defined,
never later by answering "no file". Bytes and relative paths only; never torch.

Paths handed in are relative to the root and must stay inside it (:func:`check_relpath`).
"""

from __future__ import annotations

import abc
import re
from typing import Any

from ..errors import StorageError
from ..redact import redact_url as redact

STEP_DIR = re.compile(r"step-(\d{10})")


def step_dirname(step: int) -> str:
    if not 0 <= step < 10**10:
        raise ValueError(f"step must be in [0, 10**10), got {step}")
    return f"step-{step:010d}"


def check_relpath(relpath: str) -> str:
    """Normalise a relative path and refuse anything that could leave the root."""
    if not relpath or relpath.startswith(("/", "\\")) or "\\" in relpath or "\x00" in relpath:
        raise ValueError(f"path {relpath!r} is not a plain relative path")
    parts = relpath.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"path {relpath!r} is not a plain relative path")
    return relpath


class Sink(abc.ABC):
    """A file being written: ``write`` bytes, then ``commit`` (durable) or ``abort`` (gone)."""

    @abc.abstractmethod
    def write(self, data: Any) -> int: ...

    @abc.abstractmethod
    def commit(self) -> None: ...

    @abc.abstractmethod
    def abort(self) -> None: ...


class Location(abc.ABC):
    """One checkpoint root. Missing files are ``FileNotFoundError``; every other failure is a
    :class:`~shardckpt.errors.StorageError` naming the (redacted) URL and the path."""

    url: str
    is_local: bool = False
    marker_id: str | None = None  # the root marker's id, once a save adopted it (.marker)
    marker_step: int | None = None  # the last step committed here with that marker (.marker)

    @property
    def display(self) -> str:
        return redact(self.url)

    def _err(self, op: str, relpath: str, exc: BaseException) -> StorageError:
        text = str(exc).replace(self.url, self.display)
        return StorageError(f"{self.display}/{relpath}: {op} failed: {type(exc).__name__}: {text}")

    # -- writing
    @abc.abstractmethod
    def makedirs(self, reldir: str) -> None:
        """``mkdir -p`` (a no-op where directories are implicit)."""

    @abc.abstractmethod
    def open_sink(self, relpath: str) -> Sink:
        """A new file at ``relpath``: visible whole once committed."""

    @abc.abstractmethod
    def write_atomic(self, relpath: str, data: bytes) -> None:
        """Make ``relpath`` hold ``data`` all at once, durably: readers see the old or the new."""

    @abc.abstractmethod
    def write_exclusive(self, relpath: str, data: bytes) -> None:
        """Create ``relpath`` holding ``data``, all at once and durably, only if nothing is
        there: ``FileExistsError`` if something is (a commit two writers race for)."""

    @abc.abstractmethod
    def put_record(self, relpath: str, data: bytes) -> None:
        """Write a small record whole (readers see the old or the new), without the durability
        of :meth:`write_atomic`: leases and locks, which a crash of their host ends anyway."""

    @abc.abstractmethod
    def fsync_dir(self, reldir: str) -> None:
        """Make the entries of ``reldir`` durable (a no-op on object stores)."""

    @abc.abstractmethod
    def remove(self, relpath: str) -> None:
        """Remove a file; absent is fine."""

    @abc.abstractmethod
    def remove_tree(self, reldir: str) -> None:
        """Remove a directory and everything in it; absent is fine."""

    @abc.abstractmethod
    def move_tree(self, src: str, dst: str) -> None:
        """Move directory ``src`` to ``dst`` (which must not exist), files and all."""

    # -- reading
    @abc.abstractmethod
    def read_range(self, relpath: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (fewer at the end of the file)."""

    @abc.abstractmethod
    def read_file(self, relpath: str, limit: int) -> bytes:
        """The whole file; ``StorageError`` if it is larger than ``limit``."""

    @abc.abstractmethod
    def size(self, relpath: str) -> int | None:
        """The size of a file; None if there is none (a directory counts as none)."""

    @abc.abstractmethod
    def listdir(self, reldir: str = "") -> list[str]:
        """Names in ``reldir``, sorted; ``[]`` if it does not exist."""

    @abc.abstractmethod
    def root_exists(self) -> bool: ...

    @abc.abstractmethod
    def modified_time(self, relpath: str) -> float | None:
        """Last modification of a file or directory (POSIX seconds); None if unknown/absent."""

    def read_into(self, relpath: str, offset: int, out: memoryview) -> int:
        """Read into ``out`` from ``offset``; returns the bytes read. Backends that can read
        without an intermediate copy override this."""
        data = self.read_range(relpath, offset, len(out))
        out[:len(data)] = data
        return len(data)

    def list_step_dirs(self) -> dict[int, str]:
        """Step number -> directory name for every ``step-NNNNNNNNNN`` entry of the root."""
        out = {}
        for name in self.listdir(""):
            m = STEP_DIR.fullmatch(name)
            if m:
                out[int(m.group(1))] = name
        return out
