"""The exception family of shardckpt.

Every error the package raises on purpose derives from :class:`ShardckptError`, apart from the
ordinary ``TypeError`` / ``ValueError`` / ``KeyError`` for wrong arguments. Messages name the file,
key, offset or rank involved so that an operator can act on them without a traceback.
"""

from __future__ import annotations

from typing import Any


class ShardckptError(Exception):
    """Base class of every shardckpt error."""


class CorruptCheckpointError(ShardckptError):
    """Checksum mismatch, bad magic or version, truncation, bad offsets, duplicate keys."""


class IncompleteCheckpointError(ShardckptError):
    """No commit, a missing shard, or a tensor whose pieces do not cover it."""


class StorageError(ShardckptError):
    """A storage backend failed (unreachable, full, permission denied) after retries."""


class ConcurrentWriterError(StorageError):
    """Another writer (another job on the same root) holds or has committed the step this save
    wanted: the save fails and leaves that writer's files alone. ``holder`` names the other
    writer (host, pid, job id) where it is known."""

    def __init__(self, message: str, holder: str | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class RootMarkerError(StorageError):
    """A location's root marker (``ROOT/.shardckpt-root``) is missing or not the one this job
    found or wrote there: the volume was unmounted, or the folder deleted or replaced."""


class VerificationError(ShardckptError):
    """Replayed outputs differ from the golden outputs recorded at save time."""


class CollectiveError(ShardckptError):
    """A collective save or load failed on one or more ranks.

    ``failures`` maps each failing rank to a one-line description of its error, so that every rank
    raises the same, complete account of what went wrong.
    """

    def __init__(self, message: str, failures: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.failures = dict(failures or {})


class TornSnapshotError(ShardckptError):
    """A lazy snapshot's tensor changed in place after ``save`` and before it was copied: the
    save is not committed (a checkpoint never mixes two steps). Names the keys."""


class LeaseError(ShardckptError):
    """A writer lease or the prune lock was lost (it lapsed, or another holder took it over)."""


class PruneLockedError(ShardckptError):
    """Another live prune holds the lock of this location; ``holder`` is its lock record."""

    def __init__(self, message: str, holder: Any = None) -> None:
        super().__init__(message)
        self.holder = holder


__all__ = [
    "CollectiveError",
    "ConcurrentWriterError",
    "CorruptCheckpointError",
    "IncompleteCheckpointError",
    "LeaseError",
    "PruneLockedError",
    "RootMarkerError",
    "ShardckptError",
    "StorageError",
    "TornSnapshotError",
    "VerificationError",
]

# The command line's exit codes (the contract): success, verification mismatch, integrity problem
# (corrupt, missing, incomplete), usage error, internal or storage error.
EXIT_OK, EXIT_MISMATCH, EXIT_INTEGRITY, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 64, 70
