"""Incremental saves, the format: XXH3-128 per chunk, reference chunks, the manifest's
``references`` section (pure units, no torch state saved)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from shardckpt.errors import CorruptCheckpointError
from shardckpt.format import refs as R
from shardckpt.format import shard as S
from shardckpt.format.codec import Codec, digest128, encode_chunk

HEX = "0123456789abcdef"
H128 = "0123456789abcdef" * 2


def test_chunk_json_with_digest_and_reference_round_trips() -> None:
    for c in (S.Chunk(64, 10, 10, HEX, "raw", H128),
              S.Chunk(4096, 7, 100, HEX, "zstd", H128, (3, "rank00000-000.shard"))):
        assert S.Chunk.from_json(json.loads(json.dumps(c.to_json())), "w", 2) == c


@pytest.mark.parametrize("value, match", [
    ([64, 10, 10, HEX, "raw", H128], "a chunk is"),  # version 1: five members only
])
def test_version_1_chunks_have_five_members(value: Any, match: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=match):
        S.Chunk.from_json(value, "w", 1)


@pytest.mark.parametrize("value, match", [
    ([64, 10, 10, HEX, "raw", H128.upper()], "bad xxh128"),
    ([64, 10, 10, HEX, "raw", H128[:-1]], "bad xxh128"),
    ([64, 10, 10, HEX, "raw", H128, [3]], "a reference is"),
    ([64, 10, 10, HEX, "raw", H128, [3, "../step-0000000001/x.shard"]], "outside the root"),
    ([64, 10, 10, HEX, "raw", H128, [3, "/etc/x.shard"]], "outside the root"),
    ([64, 10, 10, HEX, "raw", H128, [-1, "a.shard"]], "reference step"),
    ([64, 10, 10, HEX, "raw", H128, ["3", "a.shard"]], "reference step"),
    ([64, 10, 10, HEX, "raw", H128, [3, "a.shard"], 0], "a chunk is"),
])
def test_version_2_chunk_refusals(value: Any, match: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=match):
        S.Chunk.from_json(value, "w", 2)


def test_encode_chunk_digest_and_reuse() -> None:
    raw = memoryview(bytes(range(200)) * 10)
    enc = encode_chunk(Codec(None), raw)
    assert enc.xxh128 == digest128(raw) and len(enc.xxh128) == 32 and not enc.reused
    same = encode_chunk(Codec("zstd"), raw, enc.xxh128)
    assert same.reused and same.stored == b"" and same.raw == len(raw)
    other = encode_chunk(Codec(None), raw, "f" * 32)
    assert not other.reused and other.xxh3 == S.checksum(raw)


def test_header_version_2_with_a_reference_reads_back() -> None:
    sink = io.BytesIO()
    w = S.ShardWriter(sink, "rank00000-000.shard", save_id="s", step=5, rank=0, chunk_size=8)
    ref = S.Chunk(64, 8, 8, HEX, "raw", H128, (2, "rank00000-000.shard"))
    enc = encode_chunk(Codec(None), memoryview(b"abcdefgh"))
    w.add_encoded("k", "uint8", (0,), (16,), [ref, enc])
    rec = w.finish()
    data = sink.getvalue()
    head = S.read_header(lambda o, n: data[o:o + n], len(data), "f")
    assert json.loads(data[rec.header_offset:-S.TRAILER_SIZE])["version"] == 2
    [piece] = head.pieces
    assert piece.chunks[0] == ref and piece.chunks[1].ref is None
    assert piece.chunks[1].xxh128 == digest128(b"abcdefgh")
    # the reference lies in another file: not checked against this file's layout
    assert R.referenced_bytes(head.pieces) == {(2, "rank00000-000.shard"): 8}


def _ref(**kw: Any) -> dict[str, Any]:
    return {"step": 3, "file": "rank00000-000.shard", "nbytes": 1000, "header_offset": 512,
            "header_xxh3": HEX, "bytes": 100, **kw}


@pytest.mark.parametrize("value, match", [
    ([_ref(step=7)], "later step"),
    ([_ref(step=5)], "cycle"),
    ([_ref(file="../../etc/passwd")], "outside the root"),
    ([_ref(file="x/rank00000-000.shard")], "outside the root"),
    ([_ref(), _ref()], "listed twice"),
    ([_ref(header_offset=2000)], "header_offset"),
    ({"step": 3}, "must be a list"),
])
def test_references_section_refusals(value: Any, match: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=match):
        R.parse_references(value, 5, "m.json")


def test_summary_and_depends_on() -> None:
    extra = {R.REFERENCES: [_ref(), _ref(step=1, file="rank00001-000.shard", bytes=7)]}
    assert R.summary(extra, 5, 42) == {"bytes_written": 42, "bytes_referenced": 107,
                                       "depends_on": [1, 3]}
    assert R.depends_on({}, 5) == [] and not R.has_digests({})
    assert R.has_digests({R.CHUNK_DIGEST: R.DIGEST_NAME})
