"""Unfinished multipart uploads under a root's step directories (S3), for the prune's reaping.

A save killed while it uploads the only file of a step in parts leaves no visible object at
all: listings show no step directory, yet the store keeps (and bills) the uploaded parts. The
prune asks the location for them (:meth:`~shardckpt.storage.remote.FsspecLocation.pending_uploads`,
listed before the leases are read, like the step directories) and treats such a step as an
uncommitted directory: reaped (its uploads aborted) once no live writer lease holds it and its
newest upload started more than ``grace`` ago, and never while kept steps reference that step
(:mod:`.prune_hold`). Never imports torch.
"""

from __future__ import annotations

from .storage import Location
from .storage.location import STEP_DIR


def pending_uploads(location: Location) -> dict[str, float]:
    """Step directory -> start (UNIX time) of its newest unfinished upload; ``{}`` on stores
    without multipart uploads. ``StorageError`` if the listing fails."""
    listing = getattr(location, "pending_uploads", None)
    if not callable(listing):
        return {}
    return {d: t for d, t in listing().items() if STEP_DIR.fullmatch(d)}


__all__ = ["pending_uploads"]
