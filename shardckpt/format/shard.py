"""The ``.shard`` file: chunks of tensor bytes with a checksum each, then a JSON header.

Layout (all integers little-endian; full specification in ``docs/format.md``)::

    preamble  64 bytes   magic b"SHRDCKPT", u32 version, u32 flags, zero padding
    chunks               each at an aligned offset; stored bytes = raw or zstd frame
    header    JSON       {"format", "version", "save_id", "step", "rank", "pieces": [...]}
    trailer   32 bytes   u64 header offset, u64 header length, u64 XXH3-64 of header, b"SHRDEND1"

The header sits at the end so that a file streams to any byte sink (an object-store upload
included) without seeking back; the fixed-size trailer finds it. Every chunk carries the XXH3-64 of
its *stored* bytes, so corruption is caught before any decompression runs. Since header version 2
every chunk also carries the XXH3-128 of its *raw* bytes (what incremental saves compare), and a
chunk may be a *reference*: bytes that an earlier step's file holds (:mod:`.refs`).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import xxhash
import zstandard

from . import fields as F
from . import safejson
from .codec import (  # noqa: F401  (re-exported: where they used to live)
    Codec,
    EncodedChunk,
    checksum,
    digest128,
    encode_chunk,
)
from .dtypes import itemsize

MAGIC = b"SHRDCKPT"
TRAILER_MAGIC = b"SHRDEND1"
VERSION = 1  # of the preamble (the file layout)
HEADER_VERSION = 2  # of the JSON header: 1 has no XXH3-128 per chunk and no references
PREAMBLE = struct.Struct("<8sII48x")
TRAILER = struct.Struct("<QQQ8s")
PREAMBLE_SIZE = PREAMBLE.size  # 64
TRAILER_SIZE = TRAILER.size  # 32
MAX_HEADER_BYTES = 256 << 20
CODECS = ("raw", "zstd")
_ZERO = bytes(4096)
# A zstd block (at most 128 KiB of content) takes at least 4 bytes: no frame expands further.
ZSTD_MAX_RATIO = 32768


def chunk_alignment(nbytes: int) -> int:
    """Large chunks start on 4 KiB boundaries (page- and O_DIRECT-friendly); small ones on 64 B."""
    return 4096 if nbytes >= 64 * 1024 else 64


_HEX32 = re.compile(r"[0-9a-f]{32}")
_REF_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.shard")
_CHUNK_FORM = "a chunk is [offset, stored, raw, xxh3, codec] (+ [xxh128] (+ [[step, file]]))"


@dataclass(frozen=True)
class Chunk:
    """One checksummed run of stored bytes: ``raw`` bytes of tensor data once decoded.

    ``xxh128`` (header version 2) is the XXH3-128 of the raw bytes. ``ref`` = ``(step, file)``
    makes the chunk a reference: its bytes lie at ``offset`` in that file of an earlier step
    of the same root (the file that physically holds them, never another reference)."""

    offset: int
    stored: int
    raw: int
    xxh3: str
    codec: str = "raw"
    xxh128: str = ""
    ref: tuple[int, str] | None = None

    def to_json(self) -> list[Any]:
        out: list[Any] = [self.offset, self.stored, self.raw, self.xxh3, self.codec]
        if self.xxh128:
            out.append(self.xxh128)
        if self.ref is not None:
            out.append([self.ref[0], self.ref[1]])
        return out

    @classmethod
    def from_json(cls, value: Any, where: str, version: int = 1) -> Chunk:
        arity = (5,) if version == 1 else (5, 6, 7)
        if not isinstance(value, list) or len(value) not in arity:
            raise F.fail(where, _CHUNK_FORM)
        xxh128, ref = "", None
        if len(value) >= 6:
            if not isinstance(value[5], str) or not _HEX32.fullmatch(value[5]):
                raise F.fail(where, f"{_CHUNK_FORM}; bad xxh128 {value[5]!r}"[:300])
            xxh128 = value[5]
        if len(value) == 7:
            ref = _parse_ref(value[6], where)
        offset = F.integer(value[0], f"{where} offset", PREAMBLE_SIZE)
        stored = F.integer(value[1], f"{where} stored size")
        raw = F.integer(value[2], f"{where} raw size")
        digest = F.hex16(value[3], f"{where} checksum")
        codec = value[4]
        if codec not in CODECS:
            raise F.fail(where, f"unknown codec {codec!r}")
        if codec == "raw" and stored != raw:
            raise F.fail(where, f"raw chunk stores {stored} bytes but declares {raw}")
        if codec == "zstd" and (stored == 0 or raw == 0):
            raise F.fail(where, "empty zstd chunk")
        if codec == "zstd" and raw > stored * ZSTD_MAX_RATIO + 4096:
            raise F.fail(where, f"zstd chunk of {stored} bytes cannot decode to {raw} bytes")
        return cls(offset, stored, raw, digest, codec, xxh128, ref)


def _parse_ref(value: Any, where: str) -> tuple[int, str]:
    """``[step, file]``: a step number and a plain shard file name (never a path)."""
    if not isinstance(value, list) or len(value) != 2:
        raise F.fail(where, "a reference is [step, file]")
    step = F.integer(value[0], f"{where} reference step", 0, 10**10 - 1)
    name = value[1]
    if not isinstance(name, str) or not _REF_FILE.fullmatch(name) or ".." in name:
        raise F.fail(where, f"reference to {name!r}: outside the root (a reference names a "
                            f"shard file of a step by its plain name)"[:300])
    return step, name


@dataclass(frozen=True)
class Piece:
    """A box of one tensor (``offsets``/``lengths`` in the global tensor) stored in one file."""

    key: str
    dtype: str
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    chunks: tuple[Chunk, ...]
    file: str = ""

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for d in self.lengths:
            n *= d
        return n

    def to_json(self, with_key: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "dtype": self.dtype} if with_key else {}
        if self.file:
            out["file"] = self.file
        out["offsets"] = list(self.offsets)
        out["lengths"] = list(self.lengths)
        out["chunks"] = [c.to_json() for c in self.chunks]
        return out


@dataclass(frozen=True)
class FileRecord:
    """What the manifest knows of a shard file, to check it before trusting any byte of it."""

    name: str
    nbytes: int
    header_offset: int
    header_xxh3: str
    rank: int


class ByteSink(Protocol):
    def write(self, data: Any, /) -> Any: ...


def split_chunks(data: Any, chunk_size: int) -> list[memoryview]:
    data = memoryview(data).cast("B")
    step = max(1, chunk_size)
    return [data[i:i + step] for i in range(0, len(data), step)]


class ShardWriter:
    """Streams pieces into one ``.shard`` file through any sink with ``write``.

    Call :meth:`add` for each piece, then :meth:`finish` exactly once; the caller flushes, fsyncs
    and closes the sink (that is the storage layer's business, not the format's).
    """

    def __init__(self, sink: ByteSink, name: str, *, save_id: str, step: int, rank: int,
                 chunk_size: int, codec: Codec | None = None) -> None:
        self._sink = sink
        self.name = name
        self._meta = {"save_id": save_id, "step": step, "rank": rank}
        self._chunk_size = max(1, chunk_size)
        self._codec = codec or Codec(None)
        self._pos = 0
        self._pieces: list[Piece] = []
        self._write(PREAMBLE.pack(MAGIC, VERSION, 0))

    def _write(self, data: Any) -> None:
        self._sink.write(data)
        self._pos += len(data)

    def _pad_to(self, alignment: int) -> None:
        pad = -self._pos % alignment
        if pad:
            self._write(_ZERO[:pad])

    def write_chunk(self, encoded: EncodedChunk) -> Chunk:
        self._pad_to(chunk_alignment(len(encoded.stored)))
        chunk = Chunk(self._pos, len(encoded.stored), encoded.raw, encoded.xxh3, encoded.codec,
                      encoded.xxh128)
        self._write(encoded.stored)
        return chunk

    def add_encoded(self, key: str, dtype: str, offsets: tuple[int, ...],
                    lengths: tuple[int, ...], encoded: Iterable[EncodedChunk | Chunk]) -> Piece:
        """Write one piece from chunks already encoded (in order); return where they went. A
        :class:`Chunk` given is a reference (its bytes are in an earlier step): recorded, not
        written."""
        piece = Piece(key, dtype, tuple(offsets), tuple(lengths), (), self.name)
        chunks = tuple(e if isinstance(e, Chunk) else self.write_chunk(e) for e in encoded)
        if sum(c.raw for c in chunks) != piece.nbytes:
            raise ValueError(f"{key}: {sum(c.raw for c in chunks)} bytes given for a piece of "
                             f"{piece.nbytes}")
        piece = Piece(key, dtype, piece.offsets, piece.lengths, chunks, self.name)
        self._pieces.append(piece)
        return piece

    def add(self, key: str, dtype: str, offsets: tuple[int, ...], lengths: tuple[int, ...],
            data: memoryview) -> Piece:
        """Write the raw bytes of one piece (C order) as chunks, encoding them inline."""
        return self.add_encoded(key, dtype, offsets, lengths,
                                (encode_chunk(self._codec, c)
                                 for c in split_chunks(data, self._chunk_size)))

    def finish(self) -> FileRecord:
        self._pad_to(64)
        header = safejson.dumps({"format": "shardckpt-shard", "version": HEADER_VERSION,
                                 **self._meta,
                                 "pieces": [p.to_json() for p in self._pieces]})
        offset = self._pos
        digest = xxhash.xxh3_64_intdigest(header)
        self._write(header)
        self._write(TRAILER.pack(offset, len(header), digest, TRAILER_MAGIC))
        return FileRecord(self.name, self._pos, offset, f"{digest:016x}", self._meta["rank"])


# ----------------------------------------------------------------------------- reading

ReadRange = Callable[[int, int], bytes]


def decode_chunk(stored: bytes | memoryview, chunk: Chunk, where: str) -> bytes | memoryview:
    """Verify a chunk's stored bytes against its checksum, then decode them to raw bytes."""
    if len(stored) != chunk.stored:
        raise F.fail(where, f"chunk at offset {chunk.offset}: read {len(stored)} of "
                            f"{chunk.stored} bytes (truncated file?)")
    digest = checksum(stored)
    if digest != chunk.xxh3:
        raise F.fail(where, f"checksum mismatch in chunk at offset {chunk.offset} "
                            f"(expected {chunk.xxh3}, found {digest})")
    if chunk.codec == "raw":
        return stored
    try:
        # zstandard allocates whatever size the frame header declares, ignoring max_output_size
        declared = zstandard.frame_content_size(stored)
        if declared not in (-1, chunk.raw):
            raise F.fail(where, f"chunk at offset {chunk.offset} declares {declared} bytes of "
                                f"content, expected {chunk.raw}")
        raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=chunk.raw)
    except zstandard.ZstdError as exc:
        raise F.fail(where, f"chunk at offset {chunk.offset} does not decompress: {exc}") from None
    if len(raw) != chunk.raw:
        raise F.fail(where, f"chunk at offset {chunk.offset} decodes to {len(raw)} bytes, "
                            f"expected {chunk.raw}")
    return raw


def check_chunk_layout(pieces: list[Piece], data_end: int, where: str) -> None:
    """Every chunk lies inside ``[PREAMBLE_SIZE, data_end)`` and no two overlap (references lie
    in other files: checked against those by :mod:`.refs`)."""
    spans = sorted((c.offset, c.offset + c.stored, p.key) for p in pieces for c in p.chunks
                   if c.ref is None)
    prev_end, prev_key = PREAMBLE_SIZE, "preamble"
    for start, end, key in spans:
        if start < prev_end:
            raise F.fail(where, f"chunk of {key!r} at offset {start} overlaps {prev_key!r}")
        if end > data_end:
            raise F.fail(where, f"chunk of {key!r} at offset {start} runs past the data "
                                f"region ending at {data_end}")
        prev_end, prev_key = max(prev_end, end), key


def parse_piece(value: Any, where: str, *, with_key: bool, file: str | None = None,
                version: int = 1) -> Piece:
    d = F.obj(value, where)
    key = F.string(F.get(d, "key", where), f"{where}.key") if with_key else ""
    dtype = F.string(F.get(d, "dtype", where), f"{where}.dtype") if with_key else "uint8"
    itemsize(dtype, where)
    fname = file if file is not None else F.string(F.get(d, "file", where), f"{where}.file")
    offsets = F.int_list(F.get(d, "offsets", where), f"{where}.offsets")
    lengths = F.int_list(F.get(d, "lengths", where), f"{where}.lengths")
    if len(offsets) != len(lengths):
        raise F.fail(where, "offsets and lengths differ in rank")
    raw_chunks = F.get(d, "chunks", where)
    if not isinstance(raw_chunks, list):
        raise F.fail(where, "chunks must be a list")
    chunks = tuple(Chunk.from_json(c, f"{where}.chunks[{i}]", version)
                   for i, c in enumerate(raw_chunks))
    piece = Piece(key, dtype, tuple(offsets), tuple(lengths), chunks, fname)
    F.numel(lengths, f"{where}.lengths")
    if with_key and sum(c.raw for c in chunks) != piece.nbytes:
        raise F.fail(where, f"chunks hold {sum(c.raw for c in chunks)} bytes, the piece needs "
                            f"{piece.nbytes}")
    return piece


@dataclass(frozen=True)
class ShardHeader:
    save_id: str
    step: int
    rank: int
    pieces: tuple[Piece, ...]
    header_offset: int
    header_xxh3: str


def read_header(read: ReadRange, size: int, name: str, file: str | None = None) -> ShardHeader:
    """Validate a shard file's preamble, trailer and header using only small, bounded reads.

    ``name`` is how errors name the file; ``file`` (default: ``name``) is what its pieces record
    as their file."""
    if size < PREAMBLE_SIZE + TRAILER_SIZE:
        raise F.fail(name, f"{size} bytes is too short for a shard file")
    preamble = _exact(read, 0, PREAMBLE_SIZE, name)
    magic, version, flags = PREAMBLE.unpack(preamble)
    if magic != MAGIC:
        raise F.fail(name, f"bad magic {magic!r} at offset 0 (not a shardckpt shard)")
    if version != VERSION:
        raise F.fail(name, f"unsupported shard version {version}")
    if flags != 0 or any(preamble[16:]):
        raise F.fail(name, f"unknown flags {flags:#x} or non-zero reserved bytes in the preamble")
    tail = _exact(read, size - TRAILER_SIZE, TRAILER_SIZE, name)
    offset, length, digest, tmagic = TRAILER.unpack(tail)
    if tmagic != TRAILER_MAGIC:
        raise F.fail(name, f"bad trailer magic at offset {size - TRAILER_SIZE} (truncated?)")
    if length > MAX_HEADER_BYTES or offset < PREAMBLE_SIZE or offset + length != size - \
            TRAILER_SIZE:
        raise F.fail(name, f"header at offset {offset} of length {length} does not fit "
                           f"a file of {size} bytes")
    raw = _exact(read, offset, length, name)
    if xxhash.xxh3_64_intdigest(raw) != digest:
        raise F.fail(name, f"header checksum mismatch at offset {offset}")
    head = F.obj(safejson.loads(raw, f"{name} header"), f"{name} header")
    version = head.get("version")
    if head.get("format") != "shardckpt-shard" or version not in (1, HEADER_VERSION) or \
            type(version) is not int:
        raise F.fail(name, "header is not a version-1 or version-2 shardckpt shard header")
    pieces = head.get("pieces")
    if not isinstance(pieces, list):
        raise F.fail(name, "header pieces must be a list")
    parsed = [parse_piece(p, f"{name} piece[{i}]", with_key=True, file=file or name,
                          version=version) for i, p in enumerate(pieces)]
    check_chunk_layout(parsed, offset, name)
    return ShardHeader(F.string(F.get(head, "save_id", name), f"{name} save_id"),
                       F.integer(F.get(head, "step", name), f"{name} step", 0, 10**10 - 1),
                       F.integer(F.get(head, "rank", name), f"{name} rank", 0, 1 << 24),
                       tuple(parsed), offset, f"{digest:016x}")


def _exact(read: ReadRange, offset: int, length: int, name: str) -> bytes:
    data = read(offset, length)
    if len(data) != length:
        raise F.fail(name, f"short read of {len(data)}/{length} bytes at offset {offset}")
    return data

