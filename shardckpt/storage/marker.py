"""The root marker: ``ROOT/.shardckpt-root``, a small JSON file with a random id, that tells a
checkpoint root from the place where one used to be.

A location whose volume was unmounted, or whose folder was deleted or replaced, looks like an
empty folder (or no folder at all); writing there would silently start a new root, under the
mount point. So rank 0 checks the marker at the start of every save (:func:`check_marker`):

- the first save of a manager at a location *adopts* its marker: it reads the id there, or
  writes a new one where there is none (a new root, created now; an empty folder; a root made by
  an older version that has checkpoints but no marker yet: adopted, never failed);
- every later save finds the same id there, or the location has failed
  (:class:`~shardckpt.errors.RootMarkerError`, with a warning naming it): it is never recreated
  and nothing is written there. ``min_replicas`` decides, as for any dead location.
"""

from __future__ import annotations

import json
import time
import uuid
import warnings
from datetime import datetime, timezone

from ..errors import RootMarkerError, StorageError
from .base import Location

MARKER = ".shardckpt-root"
MARKER_FORMAT = "shardckpt-root"
MAX_MARKER_BYTES = 64 << 10
_RIVAL_WAIT_S = 10.0  # for another process's exclusive create of the marker to land


def read_marker(location: Location) -> str | None:
    """The id in ``location``'s marker; None if there is none; ``"?"`` if it is unreadable
    (not a marker this version wrote)."""
    try:
        doc = json.loads(location.read_file(MARKER, MAX_MARKER_BYTES))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return "?"
    if not isinstance(doc, dict) or doc.get("format") != MARKER_FORMAT or \
            not isinstance(doc.get("id"), str):
        return "?"
    return str(doc["id"])


def _write_marker(location: Location) -> str:
    """Write a new marker (exclusive: of two managers creating a root at once, one id wins)
    and return the id in force."""
    marker_id = uuid.uuid4().hex
    now = datetime.fromtimestamp(time.time(), timezone.utc).isoformat(timespec="seconds")
    data = json.dumps({"format": MARKER_FORMAT, "id": marker_id, "created": now}).encode()
    try:
        location.write_exclusive(MARKER, data)
    except FileExistsError:  # the other process's create may still be landing: wait for it
        deadline = time.monotonic() + _RIVAL_WAIT_S
        while (found := read_marker(location)) in (None, "?") and time.monotonic() < deadline:
            time.sleep(0.05)
        if found is None or found == "?":
            raise StorageError(f"{location.display}/{MARKER}: another process is writing the "
                               f"root marker and has not finished in {_RIVAL_WAIT_S:.0f} s"
                               ) from None
        return found
    return marker_id


def check_marker(location: Location) -> None:
    """Rank 0, before a save touches ``location`` (see the module). Sets
    ``location.marker_id`` on first use; ``RootMarkerError`` (after a warning) if the marker
    is missing or different later."""
    expected = getattr(location, "marker_id", None)
    if expected is None:  # this manager's first save here: adopt, or create
        found = read_marker(location)
        if found is None:
            location.makedirs("")
            found = _write_marker(location)
        location.marker_id = found
        return
    found = read_marker(location)
    if found == expected:
        return
    what = "is missing" if found is None else f"holds another id ({found})"
    gone = "" if location.root_exists() else " (the root itself is gone)"
    msg = (f"{location.display}: the root marker {MARKER} {what}{gone}: this location was "
           f"unmounted, deleted or replaced since this job first wrote to it (marker id "
           f"{expected}). It is treated as a failed location and nothing is written there; "
           f"min_replicas decides whether saves go on")
    warnings.warn(msg, stacklevel=3)
    raise RootMarkerError(msg)
