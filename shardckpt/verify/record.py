"""``step-NNNNNNNNNN/verification.json``: the last verdict of ``shardckpt verify`` for a step.

Written next to the committed files (root location only) and not listed in the manifest, so it
never affects integrity. It names the ``save_id`` it verified: a record left over from an
earlier save of the same step number is ignored.

Only real verdicts are recorded: a verification that could not run (the model given does not
fit the checkpoint: missing or unexpected keys, other shapes; exit 64) writes nothing, so that
``ls`` never shows ``failed`` for a checkpoint that was never replayed.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from ..errors import StorageError
from ..format import manifest as M
from ..storage import Location, step_dirname
from ..version import __version__

RECORD_NAME = "verification.json"
FORMAT = "shardckpt-verification"
MAX_RECORD_BYTES = 4 << 20


NO_VERDICT = 64  # the exit code of a verification that could not run (a usage error)


def is_verdict(result: dict[str, Any]) -> bool:
    """True when ``result`` judged the checkpoint (passed, or ran and failed)."""
    return result.get("exit_code") != NO_VERDICT


def write_record(location: Location, manifest: M.Manifest, result: dict[str, Any],
                 model: str | None) -> str | None:
    """Write the record atomically; returns its path relative to the root, or None when
    ``result`` is no verdict (nothing is written then)."""
    if not is_verdict(result):
        return None
    now = time.time()
    doc = {"format": FORMAT, "version": 1, "step": manifest.step, "save_id": manifest.save_id,
           "ok": bool(result.get("ok")), "exit_code": result.get("exit_code"),
           "time": datetime.fromtimestamp(now, timezone.utc).isoformat(), "unix_time": now,
           "nproc": result.get("nproc"), "model": model, "shardckpt_version": __version__,
           "result": result}
    rel = f"{step_dirname(manifest.step)}/{RECORD_NAME}"
    location.write_atomic(rel, json.dumps(doc, indent=1, allow_nan=False).encode() + b"\n")
    return rel


def read_record(location: Location, manifest: M.Manifest) -> dict[str, Any] | None:
    """The record of this very save, or None (absent, unreadable, or for another save)."""
    rel = f"{step_dirname(manifest.step)}/{RECORD_NAME}"
    try:
        doc = json.loads(location.read_file(rel, MAX_RECORD_BYTES))
    except (FileNotFoundError, StorageError, OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or \
            doc.get("save_id") != manifest.save_id:
        return None
    return doc


def verified(location: Location, manifest: M.Manifest) -> str | None:
    """``"ok"`` / ``"failed"`` from the step's verification record, None when unverified."""
    doc = read_record(location, manifest)
    if doc is None:
        return None
    return "ok" if doc.get("ok") is True else "failed"
