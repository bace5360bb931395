"""Opening a checkpoint root: a path or fsspec URL -> the backend serving it.

``""``, ``file://`` and ``local://`` are local disks (:mod:`.local`); every other protocol goes
through fsspec (:mod:`.remote`), imported only when such a URL is opened, so that local use never
loads fsspec (nor s3fs, which fsspec loads for ``s3://`` only).

The names of :mod:`.base` and :mod:`.local` are re-exported here for existing imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .base import STEP_DIR, Location, Sink, check_relpath, redact, step_dirname
from .local import (
    LocalLocation,
    _LocalSink,
    check_file_mode,
    dir_mode_for,
    drop_world_write,
)

LOCAL_PROTOCOLS = ("", "file", "local")


def options_for(url: str, storage_options: Mapping[str, Mapping[str, Any]] | None
                ) -> dict[str, Any]:
    """The fsspec kwargs for ``url`` out of ``{url_prefix: kwargs}``: the longest prefix wins."""
    best, kwargs = -1, {}
    for prefix, opts in (storage_options or {}).items():
        if url.startswith(prefix) and len(prefix) > best:
            best, kwargs = len(prefix), dict(opts)
    return kwargs


def open_location(url: str, storage_options: dict[str, Any] | None = None,
                  file_mode: int | None = None) -> Location:
    """A :class:`Location` for a path or fsspec URL. ``storage_options`` are fsspec kwargs;
    ``file_mode`` the mode of new files on a local disk (see the module; None: the umask)."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"checkpoint root must be a non-empty string, got {url!r}")
    check_file_mode(file_mode)
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme in LOCAL_PROTOCOLS:
        return LocalLocation(url.replace("local://", "file://", 1), file_mode)
    from .remote import FsspecLocation

    return FsspecLocation(url, storage_options or {})



__all__ = ["STEP_DIR", "LocalLocation", "Location", "Sink", "_LocalSink", "check_file_mode",
           "check_relpath", "dir_mode_for", "drop_world_write", "open_location", "options_for",
           "redact",
           "step_dirname"]
