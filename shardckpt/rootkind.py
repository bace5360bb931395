"""Is this path a checkpoint root? What ``ls``, ``show`` and ``prune`` ask before they look.

A *checkpoint root* is a folder holding step directories (``step-NNNNNNNNNN``), step directories
moved aside as corrupt, or shardckpt's control folder (``.shardckpt/``) or root marker. A root
that does not exist yet, or an empty folder, is a root with no checkpoints: what a cron prune
finds before the job's first save; but a root whose S3 bucket does not exist is an error naming
the bucket and the endpoint (:class:`NoSuchBucketError`, exit 2), never "no checkpoints yet".
Anything else (a step directory given by mistake, a folder holding other files, a file) is not
a root: the commands refuse it with :class:`NotARootError`
(exit 2) and write nothing there. Reads only; never imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ShardckptError
from .storage import Location
from .storage.location import STEP_DIR
from .storage.records import CONTROL_DIR

MISSING, EMPTY, ROOT = "missing", "empty", "root"
_MARKERS = frozenset({CONTROL_DIR, ".shardckpt-root", "audit"})  # audit/: issue 32
_ASIDE_PREFIX = "step-"


class NotARootError(ShardckptError):
    """The path given as ROOT exists and is not a checkpoint root (exit 2)."""


class NoSuchBucketError(NotARootError):
    """The root's S3 bucket does not exist (a misspelt name, an endpoint that restarted
    empty): never "no checkpoints yet", which would hide it from a cron prune (exit 2)."""


def bucket_problem(location: Location) -> str | None:
    """Why ``location``'s bucket makes it no root at all (it does not exist, naming it and the
    endpoint), or None (it exists, or the location has no bucket). Asks the store only on S3."""
    check = getattr(location, "bucket_problem", None)
    return check() if callable(check) else None


@dataclass(frozen=True)
class RootKind:
    """``kind``: ``missing`` (no such folder yet), ``empty`` or ``root``."""

    kind: str
    display: str

    @property
    def has_checkpoints_dir(self) -> bool:
        return self.kind == ROOT

    def describe(self) -> str:
        """One line for a root without checkpoints (``missing`` / ``empty``)."""
        why = "does not exist" if self.kind == MISSING else "is empty"
        return f"{self.display}: no checkpoints yet (the root {why})"


def _is_ours(name: str) -> bool:
    name = name.rstrip("/")
    return name in _MARKERS or STEP_DIR.fullmatch(name) is not None or \
        (name.startswith(_ASIDE_PREFIX) and ".corrupt-" in name)


def classify_root(location: Location) -> RootKind:
    """What ``location`` is; raises :class:`NotARootError` (naming it and why) if it is not a
    checkpoint root, ``StorageError`` if it cannot be listed."""
    local = getattr(location, "root", None) if location.is_local else None
    if isinstance(local, str) and os.path.lexists(local) and not os.path.isdir(local):
        raise NotARootError(f"{location.display}: is a file, not a checkpoint root")
    if not location.root_exists():
        problem = bucket_problem(location)  # a misspelt bucket is no "root not created yet"
        if problem is not None:
            raise NoSuchBucketError(problem)
        return RootKind(MISSING, location.display)
    names = [n.rstrip("/").rsplit("/", 1)[-1] for n in location.listdir("")]
    if not names:
        return RootKind(EMPTY, location.display)
    if any(_is_ours(n) for n in names):
        return RootKind(ROOT, location.display)
    if "manifest.json" in names or any(n.endswith(".shard") for n in names):
        raise NotARootError(f"{location.display}: is a step directory, not a checkpoint root "
                            f"(the root is the folder that holds the step-NNNNNNNNNN "
                            f"directories)")
    shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
    raise NotARootError(f"{location.display}: not a checkpoint root: it holds {len(names)} "
                        f"other entr{'y' if len(names) == 1 else 'ies'} ({shown}) and no "
                        f"step-NNNNNNNNNN directory")


__all__ = ["EMPTY", "MISSING", "ROOT", "NoSuchBucketError", "NotARootError", "RootKind",
           "bucket_problem", "classify_root"]
