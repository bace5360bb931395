"""What killed writers leave behind, for the prune's reaping: unfinished multipart uploads under
a root's step directories (S3), and the temporary files of retired records (local disks).

A save killed while it uploads the only file of a step in parts leaves no visible object at
all: listings show no step directory, yet the store keeps (and bills) the uploaded parts. The
prune asks the location for them (:meth:`~shardckpt.storage.remote.FsspecLocation.pending_uploads`,
listed before the leases are read, like the step directories) and treats such a step as an
uncommitted directory: reaped (its uploads aborted) once no live writer lease holds it and its
newest upload started more than ``grace`` ago, and never while kept steps reference that step
(:mod:`.prune_hold`). Never imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .storage import Location
from .storage.location import STEP_DIR

# a retired record being written (temp file and rename, storage/local.py): left by a SIGKILL
RETIRED_TMP = re.compile(r"step-[0-9]{10}\.retired\.tmp-[0-9a-f]{12}")


def pending_uploads(location: Location) -> dict[str, float]:
    """Step directory -> start (UNIX time) of its newest unfinished upload; ``{}`` on stores
    without multipart uploads. ``StorageError`` if the listing fails."""
    listing = getattr(location, "pending_uploads", None)
    if not callable(listing):
        return {}
    return {d: t for d, t in listing().items() if STEP_DIR.fullmatch(d)}


__all__ = ["pending_uploads"]


def stale_temps(location: Location, now: float, grace: float) -> list[str]:
    """Root entries that are temporary files of retired records, untouched for ``grace``
    seconds (their writer was killed between the write and the rename)."""
    out = []
    for name in location.listdir(""):
        if RETIRED_TMP.fullmatch(name):
            when = location.modified_time(name)
            if when is not None and now - when >= grace:
                out.append(name)
    return out


def reap_temps(location: Location, now: float, grace: float,
               check: Callable[[], None]) -> list[str]:
    """Remove :func:`stale_temps`; their names."""
    gone = []
    for name in stale_temps(location, now, grace):
        check()
        location.remove(name)
        gone.append(name)
    return gone
