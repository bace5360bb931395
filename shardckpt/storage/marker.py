"""The root marker: ``ROOT/.shardckpt-root``, a small JSON file with a random id, that tells a
checkpoint root from the place where one used to be.

A location whose volume was unmounted, or whose folder was deleted or replaced, looks like an
empty folder (or no folder at all); writing there would silently start a new root, under the
mount point. So rank 0 checks the marker at the start of every save (:func:`check_marker`):

- the first save of a manager at a location first looks at the newest committed manifest
  (:mod:`shardckpt.engine.rootmarks`): every commit records, in ``extra["markers"]``, the
  marker id of each location it expects one at. A location recorded there must still hold that
  id (a restarted job never adopts an emptied, unmounted or replaced replica: it is failed, as
  below, and stays failed until ``shardckpt repair`` restores its marker);
- a location recorded nowhere *adopts* its marker: it reads the id there, or writes a new one
  where there is none (a new root, created now; a replica added to the list; a root made by an
  older version that has checkpoints but no marker yet: adopted, never failed);
- every later save finds the same id there, or the location has failed
  (:class:`~shardckpt.errors.RootMarkerError`, with a warning naming it): it is never recreated
  and nothing is written there. ``min_replicas`` decides, as for any dead location.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from datetime import datetime, timezone

from ..errors import RootMarkerError, StorageError
from .base import Location
from .records import claim_path

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


def _marker_bytes(marker_id: str) -> bytes:
    now = datetime.fromtimestamp(time.time(), timezone.utc).isoformat(timespec="seconds")
    return json.dumps({"format": MARKER_FORMAT, "id": marker_id, "created": now}).encode()


def restore_marker(location: Location, marker_id: str) -> None:
    """Write the marker with ``marker_id`` (``shardckpt repair``: the id the newest manifest
    recorded for this location), replacing any other."""
    location.makedirs("")
    location.write_atomic(MARKER, _marker_bytes(marker_id))
    location.fsync_dir("")


def same_location(location: Location, recorded: str) -> bool:
    """Whether ``recorded`` (a display URL in a manifest) names ``location``; a local path is
    compared absolute, whatever the form it was given in."""
    if recorded == location.display:
        return True
    if not location.is_local or "://" in recorded.removeprefix("file://"):
        return False
    path = recorded.removeprefix("file://")
    return os.path.abspath(os.path.expanduser(path)) == getattr(location, "root", None)


def _write_marker(location: Location, retry: bool = True) -> str:
    """Write a new marker (exclusive: of two managers creating a root at once, one id wins)
    and return the id in force. A claim on the marker that no marker follows within
    ``_RIVAL_WAIT_S`` was left by a process killed while it created the root: it is cleared,
    with a warning, and the create is tried once more."""
    marker_id = uuid.uuid4().hex
    data = _marker_bytes(marker_id)
    try:
        location.write_exclusive(MARKER, data)
    except FileExistsError:  # the other process's create may still be landing: wait for it
        deadline = time.monotonic() + _RIVAL_WAIT_S
        while (found := read_marker(location)) in (None, "?") and time.monotonic() < deadline:
            time.sleep(0.05)
        if found is None and retry:  # nothing landed: the claimer died holding the claim
            warnings.warn(f"{location.display}/{MARKER}: a claim on the root marker was left by "
                          f"a process that stopped while creating it {_RIVAL_WAIT_S:.0f}+ s ago;"
                          f" clearing it", stacklevel=4)
            location.remove(claim_path(MARKER))
            return _write_marker(location, retry=False)
        if found is None or found == "?":
            raise StorageError(f"{location.display}/{MARKER}: another process is writing the "
                               f"root marker and has not finished in {_RIVAL_WAIT_S:.0f} s"
                               ) from None
        return found
    return marker_id


def write_marker(location: Location) -> str:
    """The id of ``location``'s marker, written now (a new id) if there is none."""
    found = read_marker(location)
    if found is None:
        location.makedirs("")
        found = _write_marker(location)
    return found


def check_marker(location: Location, recorded: tuple[str, int] | None = None) -> None:
    """Rank 0, before a save touches ``location`` (see the module). Sets
    ``location.marker_id`` on first use: ``recorded`` (the id and last step the newest
    manifest recorded for it), else the id found there or written now. ``RootMarkerError``
    (after a warning) if the marker is missing or different from the one expected."""
    expected = getattr(location, "marker_id", None)
    if expected is None and recorded is not None:  # a restarted job: what the manifests say
        location.marker_id, location.marker_step = recorded
        expected = recorded[0]
    if expected is None:  # this manager's first save here, recorded nowhere: adopt, or create
        location.marker_id = write_marker(location)
        return
    found = read_marker(location)
    if found == expected:
        return
    what = "is missing" if found is None else f"holds another id ({found})"
    gone = "" if location.root_exists() else " (the root itself is gone)"
    step = getattr(location, "marker_step", None)
    held = "" if step is None else f"it held checkpoints up to step {step}; "
    msg = (f"{location.display}: the root marker {MARKER} {what}{gone}: this location was "
           f"unmounted, deleted or replaced since checkpoints were written there (marker id "
           f"{expected}); {held}if it was replaced on purpose, run `shardckpt repair ROOT "
           f"--replica {location.display}` to refill it. It is treated as a failed location "
           f"and nothing is written there; min_replicas decides whether saves go on")
    warnings.warn(msg, stacklevel=3)
    raise RootMarkerError(msg)
