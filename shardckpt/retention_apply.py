"""Carry out a retention plan on one location: manifest first, then the data.

Removing the manifest first un-commits the step, so a crash part-way through never leaves a
listed checkpoint with missing files.
"""

from __future__ import annotations

from .format.manifest import MANIFEST_NAME
from .policy import RetentionPlan
from .storage import Location, step_dirname


def apply_retention(location: Location, plan: RetentionPlan) -> list[int]:
    deleted = []
    for step in plan.deleted:
        d = step_dirname(step)
        location.remove(f"{d}/{MANIFEST_NAME}")
        location.fsync_dir(d)
        location.remove_tree(d)
        deleted.append(step)
    if deleted:
        location.fsync_dir("")
    return deleted
