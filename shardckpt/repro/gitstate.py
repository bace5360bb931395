"""The git state of the training code: revision, branch, dirty flag, a digest of the diff.

Every git call has a timeout and any failure (no git, not a work tree, no commits yet, a slow
file system) yields None fields rather than an error: provenance must never stop training.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

from ..redact import scrub_text

GIT_TIMEOUT_S = 5.0
_ENV = {"GIT_OPTIONAL_LOCKS": "0",  # `git status` must not take index.lock from the user's git
        "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0"}


def _git(cwd: Path, *args: str) -> bytes | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=GIT_TIMEOUT_S,
                              env={**os.environ, **_ENV}, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _text(out: bytes | None) -> str | None:
    if out is None:
        return None
    text = out.decode("utf-8", "replace").strip()
    return text or None


def git_state(path: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """The git state of the work tree holding ``path`` (default: the current directory).

    None when ``path`` is not inside a git work tree (or git is not installed). Otherwise
    ``{"revision", "branch", "dirty", "untracked_files", "diff_sha256", "remote"}``:
    ``revision`` is HEAD's commit (None before the first commit), ``dirty`` whether tracked files
    differ from HEAD, ``diff_sha256`` the sha256 of ``git diff HEAD --binary`` (that of the empty
    string when clean), ``remote`` the URL of ``origin`` with any credentials removed. A field git
    could not answer in time is None.
    """
    cwd = Path(path) if path is not None else Path.cwd()
    if _text(_git(cwd, "rev-parse", "--is-inside-work-tree")) != "true":
        return None
    revision = _text(_git(cwd, "rev-parse", "--verify", "--quiet", "HEAD"))
    status = _git(cwd, "status", "--porcelain=v1", "-z", "--untracked-files=normal")
    entries = [e for e in (status or b"").split(b"\0") if e]
    diff = _git(cwd, "diff", "HEAD", "--binary", "--no-color", "--no-ext-diff") \
        if revision else None
    remote = _text(_git(cwd, "config", "--get", "remote.origin.url"))
    return {
        "revision": revision,
        "branch": _text(_git(cwd, "symbolic-ref", "--short", "-q", "HEAD")),
        "dirty": None if status is None else any(not e.startswith(b"?? ") for e in entries),
        "untracked_files": None if status is None else sum(e.startswith(b"?? ") for e in entries),
        "diff_sha256": None if diff is None else hashlib.sha256(diff).hexdigest(),
        "remote": None if remote is None else scrub_text(remote),
    }
