"""Every installed Python distribution, with a digest of its RECORD (the installed file list).

The RECORD of a wheel install lists each installed file with its own sha256, so a digest of it
identifies the installed bytes, not just the version string. Computed once per process (installing
packages into a running training job is not supported) and cached; later calls return a copy.
"""

from __future__ import annotations

import hashlib
import re
import threading
from importlib import metadata
from typing import Any

_lock = threading.Lock()
_cache: list[dict[str, Any]] | None = None


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _record_digest(dist: metadata.Distribution) -> str | None:
    try:
        text = dist.read_text("RECORD")
    except (OSError, UnicodeDecodeError):
        return None
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def _name_version(dist: metadata.Distribution) -> tuple[str | None, str | None]:
    # A wheel install's folder is "{name}-{version}.dist-info" (the name escaped to hold no "-"):
    # reading that is ~10x faster than parsing METADATA, which is the cost of a scan.
    folder = getattr(getattr(dist, "_path", None), "name", "")
    stem = folder.removesuffix(".dist-info") if isinstance(folder, str) else ""
    if stem != folder and stem.count("-") == 1:
        name, version = stem.split("-")
        if name and version:
            return name, version
    try:
        md = dist.metadata
    except (OSError, UnicodeDecodeError, ValueError):
        return None, None
    return (md["Name"], md["Version"]) if md is not None else (None, None)


def _scan() -> list[dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for dist in metadata.distributions():
        name, version = _name_version(dist)
        if not name:
            continue
        key = _canonical(name)
        if key in found:  # shadowed by an earlier sys.path entry, which is what imports get
            continue
        found[key] = {"name": key, "version": version,
                      "record_sha256": _record_digest(dist)}
    return [found[k] for k in sorted(found)]


def installed_distributions() -> list[dict[str, Any]]:
    """``[{"name", "version", "record_sha256"}]`` sorted; cached per process.

    ``name`` is the canonical (PEP 503) name, e.g. ``typing-extensions``.

    ``record_sha256`` is the sha256 of the distribution's RECORD text, or None where there is none
    (e.g. egg-info installs). Where several copies of a distribution are on ``sys.path`` the first
    (the one imports resolve to) is listed. Thread-safe; never raises for a broken distribution.
    """
    global _cache
    with _lock:
        if _cache is None:
            _cache = _scan()
        return [dict(d) for d in _cache]
