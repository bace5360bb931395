"""Tags changed after the fact: ``step-NNNNNNNNNN/tags.json`` beside the manifest.

The manifest is never rewritten (it is the commit, and what a signature covers). A step's
effective tags are those of its ``tags.json`` when that file names the step's ``save_id``,
else the manifest's own (a file left over from an earlier save of the same step number is
ignored). Each change is written whole (atomic replace) and recorded in the audit trail
(``tag`` event: added, removed, note, before, after). Two ``tag`` commands on one step at the
same instant: the last one's set wins, and both changes are in the trail.

``pinned`` protects a step from pruning exactly as when given at save time: the prune reads
the effective tags (:func:`effective_tags`). Never imports torch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from .errors import StorageError
from .format import manifest as M
from .storage import Location, step_dirname

TAGS_NAME = "tags.json"
FORMAT = "shardckpt-tags"
MAX_TAGS_BYTES = 1 << 20


def _read(location: Location, manifest: M.Manifest) -> dict[str, Any] | None:
    rel = f"{step_dirname(manifest.step)}/{TAGS_NAME}"
    try:
        doc = json.loads(location.read_file(rel, MAX_TAGS_BYTES))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise StorageError(f"{location.display}/{rel}: not a tags file: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or \
            doc.get("save_id") != manifest.save_id or not isinstance(doc.get("tags"), list):
        return None
    return doc


def effective_tags(location: Location, manifest: M.Manifest, strict: bool = True
                   ) -> tuple[str, ...]:
    """The step's tags now: its ``tags.json`` (this save's), else the manifest's. A
    ``tags.json`` that cannot be read raises ``StorageError`` (``strict=False``: the manifest's
    tags then, for listings)."""
    try:
        doc = _read(location, manifest)
    except StorageError:
        if strict:
            raise
        doc = None
    if doc is None:
        return tuple(manifest.tags)
    return tuple(str(t) for t in doc["tags"])


def check_tag(name: str) -> str:
    """``name``, or ``ValueError``: an empty tag, one with spaces around it (``"pinned "``
    would not protect anything) or another case of ``pinned`` are refused."""
    if not isinstance(name, str) or not name.strip() or len(name) > 200 or \
            any(c in name for c in "\n\r\x00"):
        raise ValueError(f"invalid tag {name!r}: a non-empty line of at most 200 characters")
    if name != name.strip():
        raise ValueError(f"invalid tag {name!r}: it has spaces around it (did you mean "
                         f"{name.strip()!r}?)")
    if name.lower() == "pinned" and name != "pinned":
        raise ValueError(f"invalid tag {name!r}: the tag that protects from pruning is "
                         f"'pinned', in lower case")
    return name


def change_tags(location: Location, manifest: M.Manifest, add: Iterable[str] = (),
                remove: Iterable[str] = (), note: str | None = None
                ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Add then remove tags of ``manifest``'s step at ``location``; returns (before, after).
    The change (even one that changes nothing, when a note is given) is an audit record."""
    from .audit import append

    add = [check_tag(t) for t in add]
    remove = [str(t) for t in remove]  # any tag there may go, even one refused now
    doc = _read(location, manifest)
    before = tuple(manifest.tags) if doc is None else tuple(str(t) for t in doc["tags"])
    after = tuple(dict.fromkeys([*(t for t in before if t not in remove),
                                 *(t for t in add if t not in remove)]))
    notes = list(doc.get("notes", [])) if doc is not None else []
    if note:
        notes.append({"time": time.time(), "note": note})
    new = {"format": FORMAT, "version": 1, "step": manifest.step, "save_id": manifest.save_id,
           "tags": list(after), "notes": notes}
    location.write_atomic(f"{step_dirname(manifest.step)}/{TAGS_NAME}",
                          json.dumps(new, indent=1, allow_nan=False).encode() + b"\n")
    append(location, "tag", manifest.step, "ok",
           {"added": add, "removed": remove, "note": note, "before": list(before),
            "after": list(after)})
    return before, after


__all__ = ["TAGS_NAME", "change_tags", "effective_tags"]
