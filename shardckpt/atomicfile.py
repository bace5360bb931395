"""Replacing a local file atomically: the one writer for files shardckpt writes outside a
checkpoint root (exports, the metrics textfile). Never imports torch.

The data goes to a temporary file beside the target (``.NAME.tmp-<pid>-<random>``: hidden, and
ignored by a Prometheus textfile collector, which reads ``*.prom`` only), is flushed and, unless
asked not to, fsynced; then ``os.replace`` puts it in place. Readers see the old file or the new
one, never a part. On any error the temporary file is removed and the target left as it was.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import BinaryIO

TMP_MARK = ".tmp-"


def temp_name(path: str) -> str:
    head, base = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{base}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_open(path: str, *, perm: int | None = None, fsync: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write; it replaces ``path`` when the block ends without an error.
    ``perm``: its exact mode (e.g. ``0o644``); None: what the umask gives, as ``open`` does."""
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            if perm is not None:
                os.fchmod(f.fileno(), perm)
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: str, data: bytes | str, *, perm: int | None = None,
                 fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` (str: UTF-8) all at once (see :func:`atomic_open`)."""
    with atomic_open(path, perm=perm, fsync=fsync) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
