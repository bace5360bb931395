"""Retired steps: pruned checkpoints whose files kept checkpoints still reference.

A prune that drops a step which kept (incremental) steps reference cannot delete it whole: it
*retires* it. The retired record ``ROOT/step-NNNNNNNNNN.retired`` (a small JSON file beside the
step directory, written atomically and made durable first) hides the step from listing and
loading; then the step's files that no kept step references are deleted, and its manifest
stays, so that references to it remain checkable. Once nothing references it, the whole
directory goes, then the record. The record sits in the root so that one listing of the root
(which every survey makes anyway) finds every retired step. Never imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .format import safejson
from .storage import Location, step_dirname

RETIRED = re.compile(r"step-(\d{10})\.retired")
FORMAT = "shardckpt-retired"


def retired_name(step: int) -> str:
    return f"{step_dirname(step)}.retired"


def retired_steps(names: Iterable[str]) -> set[int]:
    """The steps that root entries ``names`` mark as retired."""
    return {int(m.group(1)) for n in names if (m := RETIRED.fullmatch(n)) is not None}


def retire(location: Location, step: int, save_id: str, when: float) -> None:
    """Write the durable retired record of ``step`` (idempotent)."""
    doc = {"format": FORMAT, "step": step, "save_id": save_id, "retired_at": when}
    location.write_atomic(retired_name(step), safejson.dumps(doc))
    location.fsync_dir("")


def unretire_record(location: Location, step: int) -> None:
    """Remove the retired record of ``step`` (after its directory is gone)."""
    location.remove(retired_name(step))
    location.fsync_dir("")


__all__ = ["RETIRED", "retire", "retired_name", "retired_steps", "unretire_record"]
