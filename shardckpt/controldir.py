"""``ROOT/.shardckpt/`` made by a prune: owned and moded like the root it is in.

A prune from cron or a systemd timer may run as another user than training (root, say). The
control folders it needs (the prune lock, the reaper's lease) must stay writable by the
training job, which takes leases there at every save: so a prune creates each missing one
with the root's mode, and (where it may: as root, or as the root's owner) the root's owner
and group. Object stores have no folders, owners or modes: nothing to do there. No torch.
"""

from __future__ import annotations

import os
import stat

from .errors import StorageError
from .storage import Location
from .storage.records import CONTROL_DIR, LEASE_DIR


def make_control_dirs(location: Location) -> None:
    """Create ``.shardckpt/`` and ``.shardckpt/leases/`` of a local root if missing, with the
    root's owner, group and mode. ``StorageError`` naming the folder if it cannot be made."""
    root = getattr(location, "root", None)
    if not location.is_local or not isinstance(root, str):
        return
    try:
        st = os.stat(root)
    except OSError:
        return  # no root: the caller finds nothing to prune, and creates nothing
    for rel in (CONTROL_DIR, LEASE_DIR):
        path = os.path.join(root, rel)
        try:
            os.mkdir(path, 0o700)  # no wider than the root's mode while it is being set
        except FileExistsError:
            continue
        except OSError as exc:
            raise StorageError(f"{location.display}/{rel}: cannot create: {exc.strerror or exc}"
                               ) from exc
        try:
            os.chown(path, st.st_uid, st.st_gid)
        except OSError:
            pass  # not ours to give away; the mode below still lets the root's users in
        try:
            os.chmod(path, stat.S_IMODE(st.st_mode))
        except OSError as exc:
            raise StorageError(f"{location.display}/{rel}: cannot set its mode: "
                               f"{exc.strerror or exc}") from exc


__all__ = ["make_control_dirs"]
