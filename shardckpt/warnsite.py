"""Warnings that name the user's code, not the library line that raises them.

:func:`user_site` finds the innermost frame of the calling thread that is neither in the
``shardckpt`` package nor in the standard library: the user's call into shardckpt.
:func:`warn_user` issues a warning there (``warnings.warn_explicit``, with that frame's module
and warning registry, so filters by module and the default "once per location" work).

A warning raised on one of shardckpt's own threads (background retention, a save's commit,
which runs on the save thread) has no user frame on its stack. It names the last user call of
``CheckpointManager.save()`` in the process (:func:`note_caller`, called as ``save()`` checks its
arguments): the save that led to it, or a later one. Before any such call, it names module
``shardckpt`` and a file ``<shardckpt thread NAME>``. Never imports torch.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_STDLIB = tuple(os.path.abspath(p) + os.sep for p in {sysconfig.get_paths()["stdlib"],
                                                      sysconfig.get_paths()["platstdlib"]})


@dataclass(frozen=True)
class Site:
    filename: str
    lineno: int
    module: str
    registry: dict[str, Any] | None = field(default=None, compare=False)


def _is_library(filename: str) -> bool:
    path = os.path.abspath(filename)
    if path.startswith(_PACKAGE) or filename.startswith("<frozen"):
        return True
    return path.startswith(_STDLIB) and "site-packages" not in path


def user_site() -> Site | None:
    """The innermost frame of this thread outside shardckpt and the standard library."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not _is_library(name):
            g = frame.f_globals
            return Site(name, frame.f_lineno, g.get("__name__", "__main__"),
                        g.setdefault("__warningregistry__", {}))
        frame = frame.f_back
    return None


_last: Site | None = None  # the last user call of save() (any manager of this process)


def note_caller() -> None:
    """Remember the user's frame of this call, for warnings raised later on our threads."""
    global _last
    _last = user_site() or _last


def warn_user(message: str, category: type[Warning] = UserWarning,
              site: Site | None = None) -> None:
    """Warn at ``site``, else at the user's frame of this thread, else at the last
    :func:`note_caller` site, else as module ``shardckpt``."""
    site = site or user_site() or _last
    if site is None:
        site = Site(f"<shardckpt thread {threading.current_thread().name}>", 0, "shardckpt")
    warnings.warn_explicit(message, category, site.filename, site.lineno, module=site.module,
                           registry=site.registry)


__all__ = ["Site", "note_caller", "user_site", "warn_user"]
