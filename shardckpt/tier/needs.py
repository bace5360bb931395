"""Which ranks' files a loading rank reads: from the manifest's tensor directory and the keys
the rank asks for. Torch-free, no I/O.

A tensor's pieces lie in the files of the ranks its entry lists (``TensorMeta.ranks``); an alias
reads its target; a per-rank tensor reads the loading rank's own copy at the same world size,
else the lowest saving rank's (as the load protocol does). A key the checkpoint lacks needs
nothing here (the load itself reports it).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..format import manifest as M


def needed_ranks(manifest: M.Manifest, keys: Iterable[str], rank: int,
                 world_size: int) -> set[int]:
    """The ranks whose files hold something of ``keys`` for ``rank``."""
    same_world = manifest.world_size == world_size
    out: set[int] = set()
    for key in keys:
        entry = manifest.tensors.get(key)
        seen = 0
        while entry is not None and entry.alias_of is not None and seen < 64:
            entry, seen = manifest.tensors.get(entry.alias_of), seen + 1
        if entry is None:
            continue
        if entry.meta is not None:
            out.update(entry.meta.writers)
        elif entry.per_rank is not None:
            holders = [r for r, m in enumerate(entry.per_rank) if m is not None]
            if same_world and rank < len(entry.per_rank) and entry.per_rank[rank] is not None:
                out.add(rank)
            elif holders:
                out.add(holders[0])
    return out
