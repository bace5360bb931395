"""``manifest.json``: the commit record of one checkpoint, and the directory of its contents.

The manifest lists every shard file (size, header offset and header checksum, writing rank), every
tensor (dtype, global shape, and the *ranks* whose files hold its pieces) and the JSON tree of the
non-tensor state. Where each piece lies, and its chunk checksums, is in the header of the shard file
holding it: the index is split per rank, and each rank's part is authenticated by the
``header_xxh3`` the manifest records for its files. A loading rank reads the manifest and then only
the headers of the ranks that wrote what it needs (normally its own, at the same world size), so
what one rank reads does not grow with the number of ranks.

Its last member is an XXH3-64 of every byte before it::

    {"format":"shardckpt-manifest", ... ,"checksum":"0123456789abcdef"}\\n

so it is checked without re-serialising anything. The checksum catches accidents, not attackers:
:func:`parse` validates every field on its own as well (bounds, ranks, paths), and
:func:`attach_pieces` validates the pieces of the headers against it (dtype, bounds, writers,
overlaps, coverage).
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import xxhash

from ..errors import IncompleteCheckpointError
from . import fields as F
from . import safejson
from .dtypes import itemsize
from .refs import parse_references
from .shard import PREAMBLE_SIZE, FileRecord, Piece

FORMAT = "shardckpt-manifest"
VERSION = 2
MANIFEST_NAME = "manifest.json"
_SUFFIX = re.compile(rb',"checksum":"([0-9a-f]{16})"\}\n\Z')
_SUFFIX_LEN = len(b',"checksum":""}\n') + 16
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.shard")
MAX_STEP = 10**10 - 1
RESERVED_PREFIX = "__shardckpt"  # state keys of shardckpt's own (RNG states, golden batches)
Ranges = tuple[tuple[int, int], ...]


def to_ranges(ranks: Iterable[int]) -> Ranges:
    """Ranks as sorted half-open runs: ``[0, 1, 2, 5]`` -> ``((0, 3), (5, 6))``."""
    out: list[list[int]] = []
    for r in sorted(set(ranks)):
        if out and out[-1][1] == r:
            out[-1][1] = r + 1
        else:
            out.append([r, r + 1])
    return tuple((a, b) for a, b in out)


def expand(ranges: Ranges) -> list[int]:
    return [r for a, b in ranges for r in range(a, b)]


@dataclass(frozen=True)
class TensorMeta:
    """A tensor's global dtype and shape, the ranks holding its pieces and, once the headers of
    their files are read (:func:`attach_pieces`), the pieces that tile it exactly once."""

    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...] = ()
    ranks: Ranges = ()

    def to_json(self, with_ranks: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape)}
        if with_ranks:
            out["ranks"] = [list(r) for r in self.ranks]
        return out

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    @property
    def writers(self) -> list[int]:
        return expand(self.ranks)


@dataclass(frozen=True)
class TensorEntry:
    """One key of ``tensors``: a tensor, an alias of another key, or one tensor per rank
    (``None`` for a rank that does not hold the key: rank-local state)."""

    meta: TensorMeta | None = None
    alias_of: str | None = None
    per_rank: tuple[TensorMeta | None, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        if self.alias_of is not None:
            return {"alias_of": self.alias_of}
        if self.per_rank is not None:
            return {"per_rank": [m.to_json(with_ranks=False) if m is not None else None
                                 for m in self.per_rank]}
        assert self.meta is not None
        return self.meta.to_json()


@dataclass(frozen=True)
class Manifest:
    step: int
    save_id: str
    time: str
    unix_time: float
    world_size: int
    files: Mapping[str, FileRecord]
    tensors: Mapping[str, TensorEntry]
    tree: Any
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)
    indexed: bool = False  # pieces attached from every shard header (attach_pieces)

    @property
    def nbytes(self) -> int:
        """Bytes of all shard files (what the checkpoint occupies in one location)."""
        return sum(f.nbytes for f in self.files.values())

    def resolve(self, key: str, rank: int | None = None) -> TensorMeta | None:
        """The metadata behind ``key`` (aliases followed; per-rank entries need ``rank``)."""
        entry = self.tensors[key]
        if entry.alias_of is not None:
            entry = self.tensors[entry.alias_of]
        if entry.per_rank is not None:
            if rank is None or rank >= len(entry.per_rank):
                return None
            return entry.per_rank[rank]
        return entry.meta

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "step": self.step, "save_id": self.save_id,
            "time": self.time, "unix_time": self.unix_time, "world_size": self.world_size,
            "byteorder": "little",
            "metrics": {k: encode_float(v) for k, v in self.metrics.items()},
            "tags": list(self.tags),
            "files": {n: {"nbytes": f.nbytes, "header_offset": f.header_offset,
                          "header_xxh3": f.header_xxh3, "rank": f.rank}
                      for n, f in self.files.items()},
            "tensors": {k: self._entry_json(e) for k, e in self.tensors.items()},
            "tree": self.tree,
            **self.extra,
        }

    def _entry_json(self, entry: TensorEntry) -> dict[str, Any]:
        meta = entry.meta
        if meta is not None and not meta.ranks:  # built from pieces: their files' ranks
            entry = replace(entry, meta=replace(meta, ranks=to_ranges(
                self.files[p.file].rank for p in meta.pieces)))
        return entry.to_json()


def encode_float(x: float) -> float | str:
    """JSON has no NaN/inf: store those as strings, finite floats as numbers."""
    x = float(x)
    return x if math.isfinite(x) else repr(x)


def decode_float(v: Any, where: str) -> float:
    if type(v) in (int, float):
        return float(v)
    if v in ("nan", "inf", "-inf"):
        return float(v)
    raise F.fail(where, f"expected a number, got {v!r}"[:200])


def serialize(manifest: Manifest) -> bytes:
    """Bytes of ``manifest.json``, ending with the checksum of everything before it."""
    body = safejson.dumps(manifest.to_json())
    assert body.endswith(b"}")
    prefix = body[:-1]
    return prefix + b',"checksum":"' + xxhash.xxh3_64_hexdigest(prefix).encode() + b'"}\n'


CORE_FIELDS = {"format", "version", "step", "save_id", "time", "unix_time", "world_size",
               "byteorder", "metrics", "tags", "files", "tensors", "tree", "checksum"}


def parse(data: bytes, where: str = MANIFEST_NAME) -> Manifest:
    """Validate and decode ``manifest.json`` bytes; ``CorruptCheckpointError`` names the field.

    The result is not ``indexed``: its tensors carry no pieces until :func:`attach_pieces`.
    """
    m = _SUFFIX.search(data[-_SUFFIX_LEN:]) if len(data) >= _SUFFIX_LEN else None
    if m is None:
        raise F.fail(where, "does not end with a checksum member (truncated or not a manifest)")
    prefix = data[:-_SUFFIX_LEN]
    if xxhash.xxh3_64_hexdigest(prefix) != m.group(1).decode():
        raise F.fail(where, "manifest checksum mismatch")
    doc = F.obj(safejson.loads(data, where), where)
    if doc.get("format") != FORMAT:
        raise F.fail(where, f"format is {doc.get('format')!r}, not {FORMAT!r}")
    if doc.get("version") != VERSION:
        raise F.fail(where, f"unsupported manifest version {doc.get('version')!r}")
    if doc.get("byteorder") != "little":
        raise F.fail(where, "only little-endian checkpoints are supported")
    step = F.integer(F.get(doc, "step", where), f"{where} step", 0, MAX_STEP)
    world = F.integer(F.get(doc, "world_size", where), f"{where} world_size", 1, 1 << 24)
    files = _parse_files(F.get(doc, "files", where), world, where)
    tensors = _parse_tensors(F.get(doc, "tensors", where), files, world, where)
    metrics = {F.string(k, f"{where} metrics"): decode_float(v, f"{where} metrics.{k}")
               for k, v in F.obj(doc.get("metrics", {}), f"{where} metrics").items()}
    tags_raw = doc.get("tags", [])
    if not isinstance(tags_raw, list):
        raise F.fail(where, "tags must be a list")
    tags = tuple(F.string(t, f"{where} tags") for t in tags_raw)
    parse_references(doc.get("references"), step, where)  # incremental saves: format/refs.py
    return Manifest(
        step=step,
        save_id=F.string(F.get(doc, "save_id", where), f"{where} save_id", 128),
        time=F.string(F.get(doc, "time", where), f"{where} time", 64),
        unix_time=decode_float(F.get(doc, "unix_time", where), f"{where} unix_time"),
        world_size=world, files=files, tensors=tensors, tree=F.get(doc, "tree", where),
        metrics=metrics, tags=tags, extra={k: v for k, v in doc.items() if k not in CORE_FIELDS},
    )


def _parse_files(value: Any, world: int, where: str) -> dict[str, FileRecord]:
    out: dict[str, FileRecord] = {}
    for name, rec in F.obj(value, f"{where} files").items():
        w = f"{where} files[{name!r}]"
        if not FILE_NAME.fullmatch(name) or ".." in name:
            raise F.fail(w, "file name must be a plain '<name>.shard' inside the step directory")
        r = F.obj(rec, w)
        nbytes = F.integer(F.get(r, "nbytes", w), f"{w}.nbytes")
        hoff = F.integer(F.get(r, "header_offset", w), f"{w}.header_offset", PREAMBLE_SIZE)
        if hoff > nbytes:
            raise F.fail(w, f"header offset {hoff} lies past the file's {nbytes} bytes")
        out[name] = FileRecord(name, nbytes, hoff, F.hex16(F.get(r, "header_xxh3", w), w),
                               F.integer(F.get(r, "rank", w), f"{w}.rank", 0, world - 1))
    return out


def _parse_meta(d: Mapping[str, Any], where: str) -> tuple[str, tuple[int, ...]]:
    dtype = F.string(F.get(d, "dtype", where), f"{where}.dtype")
    itemsize(dtype, where)
    shape = tuple(F.int_list(F.get(d, "shape", where), f"{where}.shape"))
    F.numel(list(shape), f"{where}.shape")
    return dtype, shape


def _parse_ranges(value: Any, writers: list[int], world: int, where: str) -> Ranges:
    """Sorted, disjoint, non-empty runs of ranks inside the world, each rank owning a file."""
    if not isinstance(value, list) or len(value) > world:
        raise F.fail(where, f"ranks must be a list of at most {world} [start, stop) runs")
    out: list[tuple[int, int]] = []
    for i, run in enumerate(value):
        pair = F.int_list(run, f"{where}.ranks[{i}]", world, 2)
        if len(pair) != 2 or not pair[0] < pair[1] or (out and pair[0] <= out[-1][1]):
            raise F.fail(where, f"ranks[{i}] = {run!r} is not a sorted, disjoint [start, stop) "
                                f"run of ranks")
        a, b = pair
        # every rank of the run wrote a file: count the writers in [a, b)
        if bisect.bisect_left(writers, b) - bisect.bisect_left(writers, a) != b - a:
            raise F.fail(where, f"ranks[{i}] = {run!r} names a rank that wrote no shard file")
        out.append((a, b))
    return tuple(out)


def _parse_tensors(value: Any, files: Mapping[str, FileRecord], world: int,
                   where: str) -> dict[str, TensorEntry]:
    out: dict[str, TensorEntry] = {}
    aliases: dict[str, str] = {}
    writers = sorted({f.rank for f in files.values()})
    for key, v in F.obj(value, f"{where} tensors").items():
        w = f"{where} tensor {key!r}"
        d = F.obj(v, w)
        if "alias_of" in d:
            aliases[key] = F.string(d["alias_of"], f"{w}.alias_of")
            out[key] = TensorEntry(alias_of=aliases[key])
        elif "per_rank" in d:
            metas = d["per_rank"]
            if not isinstance(metas, list) or len(metas) != world:
                raise F.fail(w, f"per_rank must list one tensor per rank ({world})")
            parsed: list[TensorMeta | None] = []
            for r, m in enumerate(metas):
                if m is None:  # rank r does not hold this key
                    parsed.append(None)
                    continue
                dtype, shape = _parse_meta(F.obj(m, f"{w} rank {r}"), f"{w} rank {r}")
                parsed.append(TensorMeta(dtype, shape, (), ((r, r + 1),)))
            if all(m is None for m in parsed):
                raise F.fail(w, "per_rank lists no rank holding the tensor")
            out[key] = TensorEntry(per_rank=tuple(parsed))
        else:
            dtype, shape = _parse_meta(d, w)
            ranks = _parse_ranges(F.get(d, "ranks", w), writers, world, w)
            out[key] = TensorEntry(meta=TensorMeta(dtype, shape, (), ranks))
    for key, target in aliases.items():
        if target not in out or out[target].alias_of is not None:
            raise F.fail(f"{where} tensor {key!r}", f"alias of {target!r}, which is not a tensor")
    return out


def meta_of_piece(manifest: Manifest, piece: Piece, rank: int, where: str) -> TensorMeta:
    """The tensor a header piece of ``rank``'s file belongs to, after checking that the piece
    fits it: a listed key, a rank among its writers, the same dtype, a box inside the shape."""
    entry = manifest.tensors.get(piece.key)
    if entry is None or entry.alias_of is not None:
        raise F.fail(where, f"holds a piece of {piece.key!r}, which the manifest does not list "
                            f"as a tensor")
    if entry.per_rank is not None:
        held = entry.per_rank[rank]
        if held is None:
            raise F.fail(where, f"holds a piece of {piece.key!r} written by rank {rank}, which "
                                f"the manifest lists as not holding it")
        meta = held
    else:
        assert entry.meta is not None
        meta = entry.meta
        i = bisect.bisect_right(meta.ranks, (rank, math.inf)) - 1
        if i < 0 or not meta.ranks[i][0] <= rank < meta.ranks[i][1]:
            raise F.fail(where, f"piece of {piece.key!r} written by rank {rank}, which the "
                                f"manifest does not list among its writers")
    if piece.dtype != meta.dtype:
        raise F.fail(where, f"piece of {piece.key!r} is {piece.dtype}, the tensor is {meta.dtype}")
    if len(piece.offsets) != len(meta.shape):
        raise F.fail(where, f"piece of {piece.key!r} has {len(piece.offsets)} dims, the tensor "
                            f"has {len(meta.shape)}")
    for d, (o, n, s) in enumerate(zip(piece.offsets, piece.lengths, meta.shape)):
        if o + n > s:
            raise F.fail(where, f"piece of {piece.key!r}: dim {d}: [{o}, {o + n}) lies outside "
                                f"the shape {list(meta.shape)}")
    return meta


def attach_pieces(manifest: Manifest, headers: Mapping[str, Iterable[Piece]],
                  where: str = MANIFEST_NAME) -> Manifest:
    """The manifest with every tensor's pieces, from the headers of *all* its files.

    ``headers`` maps each file name to the pieces of its (already validated) header. Every piece
    must fit its tensor (:func:`meta_of_piece`) and the pieces of each tensor must tile it exactly
    once (``CorruptCheckpointError`` for overlaps, ``IncompleteCheckpointError`` for gaps).
    """
    found: dict[tuple[str, int], list[Piece]] = {}
    for name, rec in sorted(manifest.files.items()):
        for piece in headers[name]:
            meta_of_piece(manifest, piece, rec.rank, f"{where} file {name!r}")
            slot = rec.rank if manifest.tensors[piece.key].per_rank is not None else -1
            found.setdefault((piece.key, slot), []).append(piece)
    tensors: dict[str, TensorEntry] = {}
    for key, entry in manifest.tensors.items():
        w = f"{where} tensor {key!r}"
        if entry.per_rank is not None:
            metas = tuple(replace(m, pieces=tuple(found.get((key, r), ())))
                          if m is not None else None for r, m in enumerate(entry.per_rank))
            for r, m in enumerate(metas):
                if m is not None:
                    check_coverage(m, f"{w} rank {r}")
            tensors[key] = TensorEntry(per_rank=metas)
        elif entry.meta is not None:
            meta = replace(entry.meta, pieces=tuple(found.get((key, -1), ())))
            check_coverage(meta, w)
            tensors[key] = TensorEntry(meta=meta)
        else:
            tensors[key] = entry
    return replace(manifest, tensors=tensors, indexed=True)


def check_coverage(meta: TensorMeta, where: str, offsets: tuple[int, ...] | None = None,
                   lengths: tuple[int, ...] | None = None) -> None:
    """The pieces tile the box (default: the whole tensor) exactly once: overlapping pieces are
    ``CorruptCheckpointError``, a gap is ``IncompleteCheckpointError``."""
    if offsets is None or lengths is None:
        offsets, lengths = (0,) * len(meta.shape), meta.shape
    total = math.prod(lengths)
    boxes = []
    for p in meta.pieces:
        lo = tuple(max(a, b) for a, b in zip(p.offsets, offsets))
        hi = tuple(min(a + n, b + m) for a, n, b, m in zip(p.offsets, p.lengths, offsets,
                                                           lengths))
        if all(h > low for low, h in zip(lo, hi)) or (not lo and p.offsets == offsets):
            boxes.append((lo, tuple(h - low for low, h in zip(lo, hi)), p.offsets))
    covered = sum(math.prod(ln) for _, ln, _ in boxes)
    # Sweep along dim 0: only boxes whose dim-0 intervals overlap need a full comparison.
    active: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []
    for off, ln, orig in sorted(boxes):
        if not math.prod(ln):
            continue
        active = [b for b in active if not off or b[0][0] + b[1][0] > off[0]]
        for o2, l2, orig2 in active:
            if all(a < b + m and b < a + n for a, n, b, m in zip(off, ln, o2, l2)):
                raise F.fail(where, f"pieces at offsets {list(orig2)} and {list(orig)} overlap")
        active.append((off, ln, orig))
    if covered != total:
        raise IncompleteCheckpointError(
            f"{where}: pieces cover {covered} of {total} elements of the box at "
            f"{list(offsets)} of length {list(lengths)} (shape {list(meta.shape)})"
            if tuple(lengths) != tuple(meta.shape) else
            f"{where}: pieces cover {covered} of {total} elements of shape {list(meta.shape)}")
