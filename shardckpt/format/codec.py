"""Encoding one chunk for a shard file: hash the raw bytes, compress (zstd, if it helps) and
checksum the stored bytes. Never imports torch."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import zstandard

from .nogilhash import xxh3_64_hex, xxh3_128_hex

_CODEC_SPEC = re.compile(r"zstd(?::(-?[0-9]{1,3}))?")


def checksum(data: Any) -> str:
    return xxh3_64_hex(data)


def digest128(data: Any) -> str:
    """XXH3-128 of raw bytes, 32 lowercase hex digits: what an incremental save compares."""
    return xxh3_128_hex(data)


class Codec:
    """zstd at a level, or raw; a chunk that zstd does not shrink is stored raw."""

    def __init__(self, spec: str | None) -> None:
        self.spec = spec
        self.level: int | None = None
        if spec is None or spec == "none":
            return
        if not isinstance(spec, str):
            raise TypeError(f"compression must be None or a string, not {type(spec).__name__}")
        m = _CODEC_SPEC.fullmatch(spec)
        if m is None:
            raise ValueError(f"compression must be None, 'zstd' or 'zstd:LEVEL' with an integer "
                             f"LEVEL, not {spec!r}")
        self.level = int(m.group(1)) if m.group(1) is not None else 3
        if not -7 <= self.level <= 22:
            raise ValueError(f"zstd level {self.level} is outside [-7, 22]")

    def encode(self, raw: memoryview) -> tuple[Any, str]:
        if self.level is None or len(raw) == 0:
            return raw, "raw"
        packed = zstandard.ZstdCompressor(level=self.level, write_content_size=True,
                                          write_checksum=False).compress(raw)
        if len(packed) >= len(raw):
            return raw, "raw"
        return packed, "zstd"


@dataclass(frozen=True)
class EncodedChunk:
    """A chunk ready to write: its stored bytes, their checksum, and its decoded size; or, with
    ``reused``, a chunk whose raw XXH3-128 equals the one expected (nothing to write)."""

    stored: Any
    raw: int
    xxh3: str
    codec: str
    xxh128: str = ""
    reused: bool = False


def encode_chunk(codec: Codec, raw: memoryview, expect: str | None = None) -> EncodedChunk:
    """Hash the raw bytes (XXH3-128), then, unless that digest equals ``expect`` (the same
    chunk of the base step: reused, nothing more to do), compress (if it helps) and checksum
    the stored bytes. Thread-safe; zstd releases the GIL."""
    d128 = digest128(raw)
    if expect is not None and d128 == expect:
        return EncodedChunk(b"", len(raw), "", "", d128, True)
    stored, name = codec.encode(raw)
    return EncodedChunk(stored, len(raw), checksum(stored), name, d128)


