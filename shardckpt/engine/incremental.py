"""Incremental saves: write only the chunks whose bytes changed since the base step.

The save protocol calls in here at three points (``CheckpointManager(incremental=True)``):

1. **plan** (rank 0): :func:`pick_base` chooses the *base step*, the newest step committed at
   every location the save writes (none: the save is full). A base is a step whose chunks
   carry the XXH3-128 of their raw bytes; with ``full_every=K`` the save is full when the
   newest full step is at least K saves old (counted from the manifests, so a restart does
   not reset the count). Rank 0 then takes a writer lease on the base's directory at every
   location: a prune that runs meanwhile leaves the base alone; a base that a prune is already
   deleting or retiring (a live reaper lease) is not used, and the save is full.
2. **write** (every rank): :func:`load_base` reads the headers of the base's files that hold
   this rank's boxes: for each (key, box), the base's chunks, each turned into a reference to
   the file that physically holds its bytes (the base's own file, or the file the base itself
   references: never a chain). The encode pipeline hashes every chunk of the snapshot; one
   whose XXH3-128 and size equal the base chunk at the same place is not written, but
   recorded as that reference (:func:`reuse`). Reuse is decided by those digests alone.
3. **commit** (rank 0): :func:`finish_manifest` lists every (step, file) referenced, with the
   target file's record and the bytes referenced (the manifest's ``references`` section).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..catalog import read_manifest
from ..errors import ShardckptError
from ..format import manifest as M
from ..format.refs import (
    CHUNK_DIGEST,
    DIGEST_NAME,
    REFERENCES,
    Reference,
    has_digests,
    references,
)
from ..format.shard import Chunk, EncodedChunk
from ..retired import retired_steps
from ..storage import Location, step_dirname
from ..storage.lease import REAPER, WRITER, Lease, live_leases
from .badfiles import is_bad
from .reader import CheckpointReader

Box = tuple[str, tuple[int, ...], tuple[int, ...]]


def incremental_options(incremental: bool, full_every: int) -> dict[str, Any]:
    """``CheckpointManager(incremental=, full_every=)`` checked, as ``SaveOptions`` fields."""
    if not isinstance(incremental, bool):
        raise TypeError(f"incremental must be a bool, got {incremental!r}")
    if type(full_every) is not int or full_every < 0:
        raise ValueError(f"full_every must be an int >= 0, got {full_every!r}")
    if full_every and not incremental:
        raise ValueError(f"full_every={full_every} needs incremental=True (every save of a "
                         f"manager without it is full)")
    return {"incremental": incremental, "full_every": full_every}


class BaseChunks:
    """The base step's chunks by (key, box), as references to their physical holders."""

    def __init__(self, step: int, table: Mapping[Box, Sequence[Chunk]]) -> None:
        self.step = step
        self.table = table

    def chunks_of(self, key: str, offsets: tuple[int, ...], lengths: tuple[int, ...],
                  nbytes: int, size: int) -> list[Chunk | None]:
        """For each chunk of ``size`` bytes of the new piece, the base chunk holding the same
        range of the same box with the same raw size (or None)."""
        n = -(-nbytes // max(1, size))
        old = self.table.get((key, tuple(offsets), tuple(lengths)))
        if not old:
            return [None] * n
        by_start: dict[tuple[int, int], Chunk] = {}
        pos = 0
        for c in old:
            by_start[(pos, c.raw)] = c
            pos += c.raw
        out: list[Chunk | None] = []
        for j in range(n):
            start = j * size
            c = by_start.get((start, min(size, nbytes - start)))
            out.append(c if c is not None and c.xxh128 else None)
        return out


def reuse(encoded: EncodedChunk, old: Chunk | None) -> EncodedChunk | Chunk:
    """The reference ``old`` if the encoder found the chunk unchanged, else the encoded chunk."""
    if encoded.reused and old is not None and old.raw == encoded.raw and \
            old.xxh128 == encoded.xxh128:
        return old
    return encoded


def _newest_common(locations: Sequence[Location], step: int) -> M.Manifest | None:
    """The newest step before ``step`` committed (and not retired) at every location."""
    sets = []
    for loc in locations:
        names = loc.listdir("")
        sets.append(set(loc.list_step_dirs()) - retired_steps(names))
    for s in sorted(set.intersection(*sets), reverse=True) if sets else ():
        if s >= step:
            continue
        try:
            found = [read_manifest(loc, s) for loc in locations]
        except (ShardckptError, OSError):
            continue  # not committed everywhere (a save in progress, a corrupt copy)
        if any(m.save_id != found[0].save_id for m in found):
            continue
        return found[0]
    return None


def is_full(manifest: M.Manifest) -> bool:
    return not references(manifest.extra, manifest.step)


def _full_due(location: Location, base: M.Manifest, full_every: int) -> bool:
    """Whether the newest full step is at least ``full_every`` saves old (from the manifests
    of the committed steps up to the base)."""
    if full_every <= 0:
        return False
    retired = retired_steps(location.listdir(""))
    older = [s for s in sorted(location.list_step_dirs(), reverse=True)
             if s <= base.step and s not in retired]
    since = 0  # committed incremental steps newer than the newest full one
    for s in older:
        try:
            m = base if s == base.step else read_manifest(location, s)
        except (ShardckptError, OSError):
            continue
        if is_full(m):
            return since + 1 >= full_every
        since += 1
    return True  # no full step left to count from


def pick_base(locations: Sequence[Location], step: int, full_every: int,
              stack: contextlib.ExitStack) -> M.Manifest | None:
    """Rank 0: the base manifest (its directory leased at every location for the rest of the
    save, on ``stack``), or None for a full save. Never raises: a base that cannot be read
    makes the save full, with a warning."""
    try:
        base = _newest_common(locations, step)
        if base is None or not has_digests(base.extra) or _full_due(locations[0], base,
                                                                      full_every):
            return None
        base_dir = step_dirname(base.step)
        for loc in locations:
            lease = Lease.acquire(loc, base_dir, WRITER)
            stack.callback(_release, lease)
            if live_leases(loc, base_dir, REAPER) or \
                    loc.size(f"{base_dir}/{M.MANIFEST_NAME}") is None or \
                    base.step in retired_steps(loc.listdir("")):
                return None  # a prune is deleting or retiring it: save in full
        return base
    except (ShardckptError, OSError) as exc:
        warnings.warn(f"incremental save of step {step}: no base ({exc}); saving in full",
                      stacklevel=3)
        return None


def _release(lease: Lease) -> None:
    with contextlib.suppress(ShardckptError, OSError):
        lease.release()


def load_base(location: Location, base_step: int, rank: int,
              boxes: Iterable[Box]) -> BaseChunks | None:
    """Every rank: the base's chunks for this rank's ``boxes``, read from the headers of the
    files of the ranks that wrote them (checked as any reader checks them). None (a full
    write) if the base cannot be read."""
    try:
        manifest = read_manifest(location, base_step)
        reader = CheckpointReader(location, step_dirname(base_step), manifest)
        allowed: dict[str, set[int]] = {}
        for key, _, _ in boxes:
            if key in manifest.tensors:
                meta = manifest.resolve(key, rank if rank < manifest.world_size else None)
                if meta is not None:
                    allowed[key] = set(meta.writers)
        table: dict[Box, list[Chunk]] = {}
        wanted = set().union(*allowed.values()) if allowed else set()
        for name, rec in sorted(manifest.files.items()):
            if rec.rank not in wanted:
                continue
            for p in reader.check_file(name).pieces:
                if rec.rank in allowed.get(p.key, ()):
                    table[(p.key, p.offsets, p.lengths)] = [
                        c if c.ref is not None else replace(c, ref=(base_step, name))
                        for c in p.chunks]
        bad = sorted({f"{step_dirname(c.ref[0])}/{c.ref[1]}" for cs in table.values()
                      for c in cs if c.ref is not None
                      and is_bad(location.display, f"{step_dirname(c.ref[0])}/{c.ref[1]}")})
        if bad:
            warnings.warn(f"incremental save: base step {base_step} holds bytes in "
                          f"{location.display}/{bad[0]}, which a read in this process found "
                          f"corrupt; writing in full", stacklevel=3)
            return None
        return BaseChunks(base_step, table)
    except (ShardckptError, OSError) as exc:
        warnings.warn(f"incremental save: base step {base_step} cannot be read ({exc}); "
                      f"writing in full", stacklevel=3)
        return None


def finish_manifest(manifest: M.Manifest, base: M.Manifest | None,
                    referenced: Iterable[tuple[int, str, int]]) -> M.Manifest:
    """The manifest marked as carrying XXH3-128 digests, with its ``references`` section:
    each (step, file) its chunks reference, the target's file record and the bytes used."""
    extra: dict[str, Any] = {**manifest.extra, CHUNK_DIGEST: DIGEST_NAME}
    total: dict[tuple[int, str], int] = {}
    for step, file, nbytes in referenced:
        total[(step, file)] = total.get((step, file), 0) + nbytes
    if total:
        assert base is not None
        records = {(base.step, n): (f.nbytes, f.header_offset, f.header_xxh3)
                   for n, f in base.files.items()}
        records.update({(r.step, r.file): (r.nbytes, r.header_offset, r.header_xxh3)
                        for r in references(base.extra, base.step)})
        extra[REFERENCES] = [Reference(s, f, *records[(s, f)], total[(s, f)]).to_json()
                             for s, f in sorted(total)]
    return replace(manifest, extra=extra)


__all__ = ["BaseChunks", "finish_manifest", "incremental_options", "is_full", "load_base",
           "pick_base", "reuse"]
