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

**Between saves of one process** (session 8: a LoRA save spent most of its time parsing the
base's manifest and shard headers again): each rank keeps the chunk table of what it just wrote
(:func:`remember_written`, keyed by the save id and rank), and rank 0 the bytes of the manifest
it just committed (:func:`remember_manifest`). A later save uses them only when they are
provably the base's: rank 0 reuses a parsed manifest only when the manifest's bytes at the
location are equal to the ones it committed, and a rank reuses its table only when rank 0's
base (read from storage at every location, under the writer lease) carries the same save id,
the table covers every box the rank writes, and every file the table names still has its size
and was not found corrupt in this process (one size request per file). Anything else takes the
reading path above. Reuse of a chunk is still decided by its XXH3-128 alone, every byte is
still hashed, and references still name the file that physically holds the bytes.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..catalog import MAX_MANIFEST_BYTES, read_manifest
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
Files = Mapping[tuple[int, str], int]  # (step, file) -> the file's size in bytes
_KEEP = 8  # cached tables and manifests kept per process (a few ranks in threads, in tests)
_lock = threading.Lock()
_tables: OrderedDict[tuple[str, int], BaseChunks] = OrderedDict()  # (save id, rank)
_manifests: OrderedDict[tuple[str, int], tuple[bytes, M.Manifest]] = OrderedDict()


def incremental_options(incremental: bool, full_every: int) -> dict[str, Any]:
    """``CheckpointManager(incremental=, full_every=)`` checked, as ``SaveOptions`` fields."""
    if not isinstance(incremental, bool):
        raise TypeError(f"incremental must be a bool, got {incremental!r}")
    if type(full_every) is not int:
        raise TypeError(f"full_every must be an int >= 0, got {full_every!r}")
    if full_every < 0:
        raise ValueError(f"full_every must be an int >= 0, got {full_every!r}")

    if full_every and not incremental:
        raise ValueError(f"full_every={full_every} needs incremental=True (every save of a "
                         f"manager without it is full)")
    return {"incremental": incremental, "full_every": full_every}


class BaseChunks:
    """The base step's chunks by (key, box), as references to their physical holders."""

    def __init__(self, step: int, table: Mapping[Box, Sequence[Chunk]],
                 files: Files | None = None) -> None:
        self.step = step
        self.table = table
        self.files: Files = files or {}  # every physical holder the table names, and its size

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
            found = [_read_manifest(loc, s) for loc in locations]
        except (ShardckptError, OSError):
            continue  # not committed everywhere (a save in progress, a corrupt copy)
        if any(m.save_id != found[0].save_id for m in found):
            continue
        return found[0]
    return None


def _read_manifest(location: Location, step: int) -> M.Manifest:
    """:func:`read_manifest`, without parsing again the bytes this process committed."""
    with _lock:
        hit = _manifests.get((location.display, step))
    if hit is not None:
        data = location.read_file(f"{step_dirname(step)}/{M.MANIFEST_NAME}", MAX_MANIFEST_BYTES)
        if data == hit[0]:
            return hit[1]
    return read_manifest(location, step)


def remember_manifest(locations: Iterable[Location], manifest: M.Manifest,
                      data: bytes) -> None:
    """Rank 0, after committing ``manifest`` (serialized: ``data``) at ``locations``: its
    bytes, so that the next save of this process takes it as a base without parsing it
    again."""
    with _lock:
        for loc in locations:
            _manifests[(loc.display, manifest.step)] = (data, manifest)
            _manifests.move_to_end((loc.display, manifest.step))
        while len(_manifests) > _KEEP:
            _manifests.popitem(last=False)


def is_full(manifest: M.Manifest) -> bool:
    return not references(manifest.extra, manifest.step)


SINCE_FULL = "saves_since_full"  # manifest extra: incremental saves along the chain of bases


def _since_full(manifest: M.Manifest) -> int | None:
    """Incremental saves from the newest full step to ``manifest``'s step along its chain of
    bases (0 for a full step), as its commit recorded it; None for a step written before the
    count was recorded."""
    if is_full(manifest):
        return 0
    since = manifest.extra.get(SINCE_FULL)
    return since if type(since) is int and since > 0 else None


def _full_due(location: Location, base: M.Manifest, full_every: int) -> bool:
    """Whether the newest full step is at least ``full_every`` saves old: counted along the
    chain of bases, as each commit recorded it (pruning never changes it); for a base written
    before the count was recorded, from the manifests of the committed steps up to the base."""
    if full_every <= 0:
        return False
    recorded = _since_full(base)
    if recorded is not None:
        return recorded + 1 >= full_every
    retired = retired_steps(location.listdir(""))
    older = [s for s in sorted(location.list_step_dirs(), reverse=True)
             if s <= base.step and s not in retired]
    since = 0  # committed incremental steps newer than the newest full one
    for s in older:
        try:
            m = base if s == base.step else _read_manifest(location, s)
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
            retired = retired_steps(loc.listdir(""))
            if live_leases(loc, base_dir, REAPER) or \
                    loc.size(f"{base_dir}/{M.MANIFEST_NAME}") is None or base.step in retired:
                return None  # a prune is deleting or retiring it: save in full
            lacking = _lacking(loc, base, retired)
            if lacking:  # the new step would not be readable there
                warnings.warn(f"incremental save of step {step}: {loc.display} lacks "
                              f"{lacking}, which the base step {base.step} holds or "
                              f"references; writing in full (`shardckpt repair` restores it "
                              f"from another location)", stacklevel=3)
                return None
        return base
    except (ShardckptError, OSError) as exc:
        warnings.warn(f"incremental save of step {step}: no base ({exc}); saving in full",
                      stacklevel=3)
        return None


def _lacking(location: Location, base: M.Manifest, retired: set[int]) -> str | None:
    """A file the base step holds or references that ``location`` does not have (or a
    referenced step that has neither a manifest nor a retired record there), or None. One
    listing per step involved: presence only; the reader checks every byte it reads."""
    need: dict[int, set[str]] = {base.step: set(base.files)}
    for r in references(base.extra, base.step):
        need.setdefault(r.step, set()).add(r.file)
    for s, names in sorted(need.items()):
        step_dir = step_dirname(s)
        have = set(location.listdir(step_dir))
        missing = sorted(names - have)
        if missing:
            return f"{step_dir}/{missing[0]}"
        if s != base.step and M.MANIFEST_NAME not in have and s not in retired:
            return f"{step_dir}/{M.MANIFEST_NAME}"
    return None


def _release(lease: Lease) -> None:
    with contextlib.suppress(ShardckptError, OSError):
        lease.release()


def load_base(location: Location, base_step: int, rank: int, boxes: Iterable[Box],
              base_id: str = "") -> BaseChunks | None:
    """Every rank: the base's chunks for this rank's ``boxes``, read from the headers of the
    files of the ranks that wrote them (checked as any reader checks them); or, if this rank
    wrote every one of those boxes in the save ``base_id`` (the base's save id, as rank 0 read
    it), the table it kept then (see the module). None (a full write) if the base cannot be
    read."""
    boxes = list(boxes)
    try:
        cached = _cached_table(location, base_step, rank, boxes, base_id)
        if cached is not None:
            return cached
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
        files = {(base_step, n): f.nbytes for n, f in manifest.files.items()}
        files.update({(r.step, r.file): r.nbytes
                      for r in references(manifest.extra, manifest.step)})
        return BaseChunks(base_step, table, files)
    except (ShardckptError, OSError) as exc:
        warnings.warn(f"incremental save: base step {base_step} cannot be read ({exc}); "
                      f"writing in full", stacklevel=3)
        return None


def _cached_table(location: Location, base_step: int, rank: int, boxes: list[Box],
                  base_id: str) -> BaseChunks | None:
    """The table this rank kept from the save ``base_id`` of ``base_step``, if it covers every
    box and every file it names is there with its size and was not found corrupt here."""
    with _lock:
        found = _tables.get((base_id, rank)) if base_id else None
    if found is None or found.step != base_step or \
            any((b[0], tuple(b[1]), tuple(b[2])) not in found.table for b in boxes):
        return None
    for (step, name), nbytes in found.files.items():
        rel = f"{step_dirname(step)}/{name}"
        if is_bad(location.display, rel) or location.size(rel) != nbytes:
            return None  # the reading path decides (and warns)
    return found


def remember_written(save_id: str, rank: int, step: int, base: BaseChunks | None,
                     written: Iterable[Any]) -> None:
    """Every rank, after writing its files for the save ``save_id`` of ``step``: the chunk
    table of what it wrote (``written``: the writer's ``WrittenFile`` s), each chunk as a
    reference to the file that physically holds it, for the next save's :func:`load_base`."""
    table: dict[Box, list[Chunk]] = {}
    files: dict[tuple[int, str], int] = {}
    used: set[tuple[int, str]] = set()
    for w in written:
        own = (step, w.record.name)
        files[own] = w.record.nbytes
        for p in w.pieces:
            chunks = []
            for c in p.chunks:
                if c.ref is None:
                    c = Chunk(c.offset, c.stored, c.raw, c.xxh3, c.codec, c.xxh128, own)
                else:
                    used.add(c.ref)
                chunks.append(c)
            table[(p.key, tuple(p.offsets), tuple(p.lengths))] = chunks
    if used:
        if base is None or not used <= base.files.keys():
            return  # a holder whose size is unknown here: the next save reads the base
        files.update({k: base.files[k] for k in used})
    with _lock:
        _tables[(save_id, rank)] = BaseChunks(step, table, files)
        while len(_tables) > _KEEP:
            _tables.popitem(last=False)


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
        since = _since_full(base)
        if since is not None:
            extra[SINCE_FULL] = since + 1
    return replace(manifest, extra=extra)


__all__ = ["BaseChunks", "finish_manifest", "incremental_options", "is_full", "load_base",
           "pick_base", "remember_manifest", "remember_written", "reuse"]
