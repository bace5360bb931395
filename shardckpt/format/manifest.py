"""``manifest.json``: the index of one checkpoint, and its commit record.

The manifest lists every shard file (size, header offset and checksum), every tensor (dtype,
global shape, and where each piece lives with its chunk checksums) and the JSON tree of the
non-tensor state. Its last member is an XXH3-64 of every byte before it::

    {"format":"shardckpt-manifest", ... ,"checksum":"0123456789abcdef"}\\n

so it is checked without re-serialising anything. The checksum catches accidents, not attackers:
:func:`parse` validates every field on its own as well (bounds, overlaps, coverage, paths).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ..errors import IncompleteCheckpointError
from . import fields as F
from . import safejson
from .dtypes import itemsize
from .shard import PREAMBLE_SIZE, FileRecord, Piece, check_chunk_layout, parse_piece

FORMAT = "shardckpt-manifest"
VERSION = 1
MANIFEST_NAME = "manifest.json"
_SUFFIX = re.compile(rb',"checksum":"([0-9a-f]{16})"\}\n\Z')
_SUFFIX_LEN = len(b',"checksum":""}\n') + 16
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.shard")
MAX_STEP = 10**10 - 1


@dataclass(frozen=True)
class TensorMeta:
    """A tensor's global dtype and shape and the pieces that tile it exactly once."""

    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape),
                "pieces": [p.to_json(with_key=False) for p in self.pieces]}

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True)
class TensorEntry:
    """One key of ``tensors``: a tensor, an alias of another key, or one tensor per rank."""

    meta: TensorMeta | None = None
    alias_of: str | None = None
    per_rank: tuple[TensorMeta, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        if self.alias_of is not None:
            return {"alias_of": self.alias_of}
        if self.per_rank is not None:
            return {"per_rank": [m.to_json() for m in self.per_rank]}
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
            "tensors": {k: e.to_json() for k, e in self.tensors.items()},
            "tree": self.tree,
            **self.extra,
        }


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

    ``IncompleteCheckpointError`` is raised when a tensor's pieces do not cover it exactly.
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
    metrics_raw = F.obj(doc.get("metrics", {}), f"{where} metrics")
    metrics = {F.string(k, f"{where} metrics"): decode_float(v, f"{where} metrics.{k}")
               for k, v in metrics_raw.items()}
    tags_raw = doc.get("tags", [])
    if not isinstance(tags_raw, list):
        raise F.fail(where, "tags must be a list")
    tags = tuple(F.string(t, f"{where} tags") for t in tags_raw)
    unix = decode_float(F.get(doc, "unix_time", where), f"{where} unix_time")
    return Manifest(
        step=step,
        save_id=F.string(F.get(doc, "save_id", where), f"{where} save_id", 128),
        time=F.string(F.get(doc, "time", where), f"{where} time", 64),
        unix_time=unix, world_size=world, files=files, tensors=tensors,
        tree=F.get(doc, "tree", where), metrics=metrics, tags=tags,
        extra={k: v for k, v in doc.items() if k not in CORE_FIELDS},
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


def _parse_meta(value: Any, files: Mapping[str, FileRecord], where: str) -> TensorMeta:
    d = F.obj(value, where)
    dtype = F.string(F.get(d, "dtype", where), f"{where}.dtype")
    itemsize(dtype, where)
    shape = tuple(F.int_list(F.get(d, "shape", where), f"{where}.shape"))
    F.numel(list(shape), f"{where}.shape")
    raw = F.get(d, "pieces", where)
    if not isinstance(raw, list):
        raise F.fail(where, "pieces must be a list")
    pieces = []
    for i, pv in enumerate(raw):
        pw = f"{where}.pieces[{i}]"
        p = parse_piece(pv, pw, with_key=False)
        p = Piece(where, dtype, p.offsets, p.lengths, p.chunks, p.file)
        if p.file not in files:
            raise F.fail(pw, f"refers to file {p.file!r}, which the manifest does not list")
        if len(p.offsets) != len(shape):
            raise F.fail(pw, f"has {len(p.offsets)} dims, the tensor has {len(shape)}")
        for d_, (o, n, s) in enumerate(zip(p.offsets, p.lengths, shape)):
            if o + n > s:
                raise F.fail(pw, f"dim {d_}: [{o}, {o + n}) lies outside the shape {list(shape)}")
        if sum(c.raw for c in p.chunks) != p.nbytes:
            raise F.fail(pw, f"chunks hold {sum(c.raw for c in p.chunks)} bytes, the piece needs "
                             f"{p.nbytes}")
        pieces.append(p)
    meta = TensorMeta(dtype, shape, tuple(pieces))
    check_coverage(meta, where)
    return meta


def _parse_tensors(value: Any, files: Mapping[str, FileRecord], world: int,
                   where: str) -> dict[str, TensorEntry]:
    out: dict[str, TensorEntry] = {}
    aliases: dict[str, str] = {}
    by_file: dict[str, list[Piece]] = {n: [] for n in files}
    for key, v in F.obj(value, f"{where} tensors").items():
        w = f"{where} tensor {key!r}"
        d = F.obj(v, w)
        if "alias_of" in d:
            aliases[key] = F.string(d["alias_of"], f"{w}.alias_of")
            out[key] = TensorEntry(alias_of=aliases[key])
            continue
        if "per_rank" in d:
            metas = d["per_rank"]
            if not isinstance(metas, list) or len(metas) != world:
                raise F.fail(w, f"per_rank must list one tensor per rank ({world})")
            parsed = tuple(_parse_meta(m, files, f"{w} rank {r}") for r, m in enumerate(metas))
            out[key] = TensorEntry(per_rank=parsed)
        else:
            parsed = (_parse_meta(d, files, w),)
            out[key] = TensorEntry(meta=parsed[0])
        for meta in parsed:
            for p in meta.pieces:
                by_file[p.file].append(p)
    for key, target in aliases.items():
        if target not in out or out[target].alias_of is not None:
            raise F.fail(f"{where} tensor {key!r}", f"alias of {target!r}, which is not a tensor")
    for name, pieces in by_file.items():
        check_chunk_layout(pieces, files[name].header_offset, f"{where} file {name!r}")
    return out


def check_coverage(meta: TensorMeta, where: str) -> None:
    """The pieces tile the global shape exactly once (else ``IncompleteCheckpointError``)."""
    total = math.prod(meta.shape)
    covered = sum(math.prod(p.lengths) for p in meta.pieces)
    boxes = sorted((p.offsets, p.lengths) for p in meta.pieces if math.prod(p.lengths))
    # Sweep along dim 0: only boxes whose dim-0 intervals overlap need a full comparison.
    active: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for off, ln in boxes:
        active = [b for b in active if not meta.shape or b[0][0] + b[1][0] > off[0]]
        for o2, l2 in active:
            if all(a < b + m and b < a + n for a, n, b, m in zip(off, ln, o2, l2)):
                raise F.fail(where, f"pieces at offsets {list(o2)} and {list(off)} overlap")
        active.append((off, ln))
    if covered != total:
        raise IncompleteCheckpointError(
            f"{where}: pieces cover {covered} of {total} elements of shape {list(meta.shape)}")
