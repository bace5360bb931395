"""Unit tests of the on-disk format's pieces: strict JSON, field validation, chunks, coverage,
the codec, the shard writer/reader pair, dtype names and the manifest's checksum framing."""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any

import numpy as np
import pytest
import torch
import xxhash
import zstandard
from hypothesis import event, given, settings
from hypothesis import strategies as st

from shardckpt import CorruptCheckpointError, IncompleteCheckpointError
from shardckpt.format import dtypes as D
from shardckpt.format import fields as F
from shardckpt.format import manifest as M
from shardckpt.format import safejson
from shardckpt.format import shard as S
from shardckpt.planning import tree as T

HEX = "0123456789abcdef"


# ------------------------------------------------------------------------------ safejson

@pytest.mark.parametrize("doc, key", [
    (b'{"a":1,"a":2}', "a"),
    (b'{"a":1,"b":{"c":1,"c":1}}', "c"),
    (b'[{"x":[{"k":1,"k":1}]}]', "k"),
    (b'{"\\u00e9":1,"\xc3\xa9":2}', "\u00e9"),  # the same key, escaped and literal
])
def test_safejson_refuses_duplicate_keys(doc: bytes, key: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=f"here.json: duplicate JSON key {key!r}"):
        safejson.loads(doc, "here.json")


@pytest.mark.parametrize("doc", [b"NaN", b'{"a":NaN}', b"[Infinity]", b"[-Infinity]",
                                 b"[nan]"])
def test_safejson_refuses_non_standard_constants(doc: bytes) -> None:
    with pytest.raises(CorruptCheckpointError, match="where: invalid JSON"):
        safejson.loads(doc, "where")


@pytest.mark.parametrize("doc", [b'{"a":"\xff"}', b'{"\xc3":1}', b'"\xed\xa0\x80"',
                                 b'\xef\xbb\xbf{}', b'{"a":1', b"", b"{} {}", b"{'a':1}"])
def test_safejson_refuses_invalid_utf8_and_malformed_json(doc: bytes) -> None:
    with pytest.raises(CorruptCheckpointError, match="doc: invalid JSON"):
        safejson.loads(doc, "doc")


def test_safejson_refuses_deep_nesting_and_oversize(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CorruptCheckpointError, match="deep: invalid JSON"):
        safejson.loads(b"[" * 200_000 + b"]" * 200_000, "deep")
    monkeypatch.setattr(safejson, "MAX_JSON_BYTES", 10)
    with pytest.raises(CorruptCheckpointError, match="big: JSON document of 11 bytes"):
        safejson.loads(b'"123456789"', "big")


def test_safejson_accepts_strict_documents() -> None:
    assert safejson.loads(b'{"a":[1,2.5,"\xc3\xa9",null,true],"b":{}}', "x") == \
        {"a": [1, 2.5, "\u00e9", None, True], "b": {}}
    assert safejson.loads(bytearray(b"[10000000000000000000000]"), "x") == [10**22]
    assert safejson.loads(memoryview(b'{"a":1}'), "x") == {"a": 1}


def test_safejson_dumps_is_compact_utf8_and_refuses_nan() -> None:
    assert safejson.dumps({"b": [1, "\u00e9"], "a": None}) == '{"b":[1,"é"],"a":null}'.encode()
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            safejson.dumps({"x": bad})


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text() |
                    st.floats(allow_nan=False, allow_infinity=False),
                    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(), ch,
                                                                            max_size=4),
                    max_leaves=20))
def test_safejson_round_trips(value: Any) -> None:
    assert safejson.loads(safejson.dumps(value), "x") == value


# ------------------------------------------------------------------------------ fields

@pytest.mark.parametrize("value", [True, False, 1.0, "1", None, [1], -1, F.MAX_BYTES + 1, 2**64])
def test_fields_integer_refuses(value: Any) -> None:
    with pytest.raises(CorruptCheckpointError, match=r"^f\.x: "):
        F.integer(value, "f.x")


def test_fields_accessors() -> None:
    assert F.integer(0, "x") == 0 and F.integer(F.MAX_BYTES, "x") == F.MAX_BYTES
    assert F.integer(5, "x", 5, 5) == 5
    with pytest.raises(CorruptCheckpointError, match=r"4 is outside \[5, 6\]"):
        F.integer(4, "x", 5, 6)
    assert F.hex16("0123456789abcdef", "x") == "0123456789abcdef"
    for bad in ("0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", 5, "g" * 16):
        with pytest.raises(CorruptCheckpointError, match="16-digit"):
            F.hex16(bad, "x")
    with pytest.raises(CorruptCheckpointError, match="missing field 'k'"):
        F.get({}, "k", "x")
    with pytest.raises(CorruptCheckpointError, match="expected an object, got list"):
        F.obj([], "x")
    with pytest.raises(CorruptCheckpointError, match="expected a string"):
        F.string("x" * 11, "x", max_len=10)
    assert F.int_list([0, 1, 2], "x") == [0, 1, 2]
    with pytest.raises(CorruptCheckpointError, match="at most 64"):
        F.int_list([1] * 65, "x")
    with pytest.raises(CorruptCheckpointError, match=r"x\[1\]"):
        F.int_list([1, -1], "x")
    assert F.numel([], "x") == 1 and F.numel([3, 0, 2**60], "x") == 0
    with pytest.raises(CorruptCheckpointError, match="elements"):
        F.numel([2**30, 2**30, 2**30], "x")


def test_fields_numel_never_builds_huge_products() -> None:
    # refuses as soon as the running product passes the bound, whatever follows
    with pytest.raises(CorruptCheckpointError):
        F.numel([2**50, 2], "x")
    assert F.numel([2**25, 2**25], "x") == 2**50


# ------------------------------------------------------------------------------ Chunk

def test_chunk_json_round_trip() -> None:
    for c in (S.Chunk(64, 10, 10, HEX, "raw"), S.Chunk(4096, 7, 100, HEX, "zstd")):
        assert S.Chunk.from_json(json.loads(json.dumps(c.to_json())), "w") == c


@pytest.mark.parametrize("value, match", [
    ({"offset": 64}, "a chunk is"),
    ([64, 10, 10, HEX], "a chunk is"),
    ([64, 10, 10, HEX, "raw", 0], "a chunk is"),
    ((64, 10, 10, HEX, "raw"), "a chunk is"),
    ([63, 10, 10, HEX, "raw"], "offset"),
    ([0, 10, 10, HEX, "raw"], "offset"),
    ([64.0, 10, 10, HEX, "raw"], "offset"),
    ([True, 10, 10, HEX, "raw"], "offset"),
    ([2**62, 10, 10, HEX, "raw"], "offset"),
    ([64, -1, 10, HEX, "raw"], "stored size"),
    ([64, 2**51, 2**51, HEX, "raw"], "stored size"),
    ([64, 10, 2**62, HEX, "zstd"], "raw size"),
    ([64, 10, 10, HEX.upper(), "raw"], "checksum"),
    ([64, 10, 10, HEX[:-1], "raw"], "checksum"),
    ([64, 10, 10, None, "raw"], "checksum"),
    ([64, 10, 10, HEX, "lz4"], "unknown codec"),
    ([64, 10, 10, HEX, None], "unknown codec"),
    ([64, 10, 10, HEX, "RAW"], "unknown codec"),
    ([64, 10, 11, HEX, "raw"], "raw chunk stores 10 bytes but declares 11"),
    ([64, 0, 10, HEX, "zstd"], "empty zstd chunk"),
    ([64, 10, 0, HEX, "zstd"], "empty zstd chunk"),
])
def test_chunk_from_json_refuses(value: Any, match: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        S.Chunk.from_json(value, "m.json tensor 'w'.chunks[3]")
    assert str(info.value).startswith("m.json tensor 'w'.chunks[3]")


def test_empty_raw_chunk_is_allowed() -> None:
    assert S.Chunk.from_json([64, 0, 0, HEX, "raw"], "w").raw == 0


# ------------------------------------------------------------------------------ coverage

def meta(shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]],
         dtype: str = "float32") -> M.TensorMeta:
    return M.TensorMeta(dtype, shape, tuple(S.Piece("k", dtype, o, n, (), "f.shard")
                                            for o, n in boxes))


@pytest.mark.parametrize("shape, boxes", [
    ((4, 6), [((0, 0), (4, 6))]),
    ((4, 6), [((0, 0), (2, 6)), ((2, 0), (2, 6))]),
    ((4, 6), [((0, 0), (4, 3)), ((0, 3), (4, 3))]),
    ((4, 6), [((2, 3), (2, 3)), ((0, 0), (2, 3)), ((2, 0), (2, 3)), ((0, 3), (2, 3))]),
    ((4, 6), [((0, 0), (1, 6)), ((1, 0), (3, 1)), ((1, 1), (3, 5))]),  # L-shaped tiling
    ((), [((), ())]),
    ((0, 3), []),
    ((0, 3), [((0, 0), (0, 3))]),
    ((0, 3), [((0, 0), (0, 3)), ((0, 0), (0, 3))]),  # empty boxes never overlap anything
    ((5,), [((0,), (5,)), ((2,), (0,))]),
])
def test_check_coverage_accepts_exact_tilings(shape: tuple[int, ...], boxes: Any) -> None:
    M.check_coverage(meta(shape, boxes), "w")


@pytest.mark.parametrize("shape, boxes", [
    ((4, 6), [((0, 0), (4, 6)), ((0, 0), (4, 6))]),
    ((4, 6), [((0, 0), (3, 6)), ((2, 0), (2, 6))]),
    ((4, 6), [((0, 0), (4, 4)), ((0, 3), (4, 3))]),
    ((4, 6), [((0, 0), (2, 6)), ((2, 0), (2, 3)), ((1, 2), (1, 1)), ((2, 3), (2, 3))]),
    # overlapping boxes that are not neighbours in sorted order
    ((6, 6), [((0, 0), (6, 1)), ((0, 1), (1, 5)), ((1, 1), (5, 5)), ((4, 0), (1, 1))]),
    ((), [((), ()), ((), ())]),
])
def test_check_coverage_detects_overlap(shape: tuple[int, ...], boxes: Any) -> None:
    with pytest.raises(CorruptCheckpointError, match=r"^w: pieces at offsets .* overlap"):
        M.check_coverage(meta(shape, boxes), "w")


@pytest.mark.parametrize("shape, boxes, covered", [
    ((4, 6), [], 0),
    ((4, 6), [((0, 0), (2, 6))], 12),
    ((4, 6), [((0, 0), (4, 3)), ((0, 3), (3, 3))], 21),
    ((), [], 0),
    ((3,), [((0,), (1,)), ((2,), (1,))], 2),
])
def test_check_coverage_detects_gaps(shape: tuple[int, ...], boxes: Any, covered: int) -> None:
    total = math.prod(shape)
    with pytest.raises(IncompleteCheckpointError, match=f"cover {covered} of {total} elements"):
        M.check_coverage(meta(shape, boxes), "w")


@st.composite
def box_sets(draw: st.DrawFn) -> tuple[tuple[int, ...], list[tuple[tuple[int, ...],
                                                                tuple[int, ...]]]]:
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    # start from an exact grid tiling, then maybe drop, duplicate, grow or add boxes
    grid = []
    for n in shape:
        cuts = sorted(set(draw(st.lists(st.integers(1, n), max_size=2))) | {n})
        grid.append(list(zip([0, *cuts[:-1]], cuts)))
    boxes = [((), ())]
    for spans in grid:
        boxes = [((*o, a), (*ln, b - a)) for o, ln in boxes for a, b in spans]
    boxes = list(boxes)
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["drop", "dup", "grow", "add"]))
        i = draw(st.integers(0, len(boxes) - 1)) if boxes else 0
        if op == "drop" and boxes:
            boxes.pop(i)
        elif op == "dup" and boxes:
            boxes.append(boxes[i])
        elif op == "grow" and boxes:
            o, ln = boxes[i]
            d = draw(st.integers(0, len(shape) - 1))
            if o[d] + ln[d] < shape[d]:
                boxes[i] = (o, tuple(x + (j == d) for j, x in enumerate(ln)))
        else:
            o = tuple(draw(st.integers(0, n - 1)) for n in shape)
            ln = tuple(draw(st.integers(1, n - a)) for a, n in zip(o, shape))
            boxes.append((o, ln))
    return shape, draw(st.permutations(boxes))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(box_sets())
def test_check_coverage_agrees_with_brute_force(case: Any) -> None:
    shape, boxes = case
    count = np.zeros(shape, dtype=np.int64)
    for o, ln in boxes:
        count[tuple(slice(a, a + n) for a, n in zip(o, ln))] += 1
    event("overlap" if (count > 1).any() else "gap" if (count == 0).any() else "exact")
    if (count > 1).any():
        with pytest.raises(CorruptCheckpointError, match="overlap"):
            M.check_coverage(meta(shape, boxes), "w")
    elif (count == 0).any():
        with pytest.raises(IncompleteCheckpointError):
            M.check_coverage(meta(shape, boxes), "w")
    else:
        M.check_coverage(meta(shape, boxes), "w")


def test_check_chunk_layout() -> None:
    def piece(key: str, *spans: tuple[int, int]) -> S.Piece:
        return S.Piece(key, "uint8", (0,), (sum(n for _, n in spans),),
                       tuple(S.Chunk(o, n, n, HEX) for o, n in spans), "f.shard")

    S.check_chunk_layout([piece("a", (64, 10), (128, 5)), piece("b", (74, 54))], 200, "f")
    S.check_chunk_layout([piece("a", (64, 136))], 200, "f")
    with pytest.raises(CorruptCheckpointError, match="'b' at offset 70 overlaps 'a'"):
        S.check_chunk_layout([piece("a", (64, 10)), piece("b", (70, 5))], 200, "f")
    with pytest.raises(CorruptCheckpointError, match="overlaps 'a'"):
        S.check_chunk_layout([piece("a", (64, 100)), piece("b", (128, 5))], 200, "f")
    with pytest.raises(CorruptCheckpointError, match="runs past the data region ending at 200"):
        S.check_chunk_layout([piece("a", (64, 137))], 200, "f")
    with pytest.raises(CorruptCheckpointError, match="overlaps 'preamble'"):
        S.check_chunk_layout([S.Piece("a", "uint8", (0,), (1,), (S.Chunk(10, 1, 1, HEX),))],
                             200, "f")


# ------------------------------------------------------------------------------ Codec

@pytest.mark.parametrize("spec, level", [(None, None), ("none", None), ("zstd", 3),
                                         ("zstd:5", 5), ("zstd:1", 1), ("zstd:-7", -7),
                                         ("zstd:22", 22), ("zstd:0", 0)])
def test_codec_spec_parsing(spec: str | None, level: int | None) -> None:
    codec = S.Codec(spec)
    assert codec.level == level and codec.spec == spec


@pytest.mark.parametrize("spec", ["gzip", "ZSTD", "zstd:", "zstd:abc", "zstd:5:6", "zstd:23",
                                  "zstd:-8", "", "zstd:1.5", "zstd:1_0", "zstd: 5", " zstd",
                                  "zstd:+5", "lz4:1", "zstd5"])
def test_codec_refuses_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError, match=r"compression|level"):
        S.Codec(spec)


@pytest.mark.parametrize("spec", [5, True, b"zstd", ["zstd"]])
def test_codec_refuses_non_strings(spec: Any) -> None:
    with pytest.raises(TypeError, match="compression"):
        S.Codec(spec)


def test_incompressible_chunks_are_stored_raw() -> None:
    codec = S.Codec("zstd:19")
    noise = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    stored, name = codec.encode(memoryview(noise))
    assert name == "raw" and bytes(stored) == noise
    zeros = bytes(5000)
    stored, name = codec.encode(memoryview(zeros))
    assert name == "zstd" and len(stored) < 100
    assert zstandard.ZstdDecompressor().decompress(stored) == zeros
    for tiny in (b"", b"\0", bytes(9)):  # a zstd frame is longer than these
        stored, name = codec.encode(memoryview(tiny))
        assert name == "raw" and bytes(stored) == tiny
    stored, name = S.Codec(None).encode(memoryview(zeros))
    assert name == "raw"


def test_shard_writer_mixes_raw_and_zstd_chunks_and_reads_back() -> None:
    noise = np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes()
    data = noise + bytes(300) + noise[:100]
    sink = io.BytesIO()
    writer = S.ShardWriter(sink, "a.shard", save_id="s" * 32, step=4, rank=2, chunk_size=100,
                           codec=S.Codec("zstd"))
    piece = writer.add("x", "uint8", (0,), (700,), memoryview(data))
    empty = writer.add("e", "float32", (0, 0), (0, 3), memoryview(b""))
    record = writer.finish()
    blob = sink.getvalue()
    assert [c.codec for c in piece.chunks] == ["raw"] * 3 + ["zstd"] * 3 + ["raw"]
    assert empty.chunks == ()
    assert record.nbytes == len(blob) and record.rank == 2
    head = S.read_header(lambda o, n: blob[o:o + n], len(blob), "a.shard")
    assert head.pieces == (piece, empty) and head.step == 4 and head.save_id == "s" * 32
    assert (head.header_offset, head.header_xxh3) == (record.header_offset, record.header_xxh3)
    out = b"".join(bytes(S.decode_chunk(blob[c.offset:c.offset + c.stored], c, "a.shard"))
                   for c in piece.chunks)
    assert out == data
    assert all(c.offset % 64 == 0 for c in piece.chunks)
    with pytest.raises(ValueError, match="x: 3 bytes given for a piece of 4"):
        writer.add("x", "float32", (0,), (1,), memoryview(b"abc"))


def test_large_chunks_are_page_aligned() -> None:
    assert S.chunk_alignment(64 * 1024) == 4096 and S.chunk_alignment(64 * 1024 - 1) == 64
    sink = io.BytesIO()
    writer = S.ShardWriter(sink, "a.shard", save_id="s", step=0, rank=0, chunk_size=70_000)
    piece = writer.add("x", "uint8", (0,), (140_001,), memoryview(os.urandom(140_001)))
    writer.finish()
    assert [c.offset % 4096 for c in piece.chunks[:2]] == [0, 0]
    assert piece.chunks[2].offset % 64 == 0 and piece.chunks[2].stored == 1


# ------------------------------------------------------------------------------ decode_chunk

def test_decode_chunk_checks_before_decompressing() -> None:
    frame = zstandard.ZstdCompressor().compress(bytes(1000))
    good = S.Chunk(64, len(frame), 1000, S.checksum(frame), "zstd")
    assert S.decode_chunk(frame, good, "f") == bytes(1000)
    with pytest.raises(CorruptCheckpointError, match="f: chunk at offset 64: read 5 of"):
        S.decode_chunk(frame[:5], good, "f")
    bad = bytearray(frame)
    bad[-1] ^= 1
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch in chunk at offset 64"):
        S.decode_chunk(bytes(bad), good, "f")
    # a consistent checksum over bytes that are not a zstd frame
    junk = b"not a zstd frame at all"
    with pytest.raises(CorruptCheckpointError, match="does not decompress"):
        S.decode_chunk(junk, S.Chunk(64, len(junk), 1000, S.checksum(junk), "zstd"), "f")
    # a frame that declares another size than the chunk
    with pytest.raises(CorruptCheckpointError, match="declares 1000 bytes of content, expected"):
        S.decode_chunk(frame, S.Chunk(64, len(frame), 999, S.checksum(frame), "zstd"), "f")
    # a frame without a declared size: decoded size checked, output bounded
    bare = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1000))
    assert zstandard.frame_content_size(bare) == -1
    assert S.decode_chunk(bare, S.Chunk(64, len(bare), 1000, S.checksum(bare), "zstd"),
                          "f") == bytes(1000)
    for claimed in (999, 1001):
        with pytest.raises(CorruptCheckpointError, match="f: chunk at offset 64"):
            S.decode_chunk(bare, S.Chunk(64, len(bare), claimed, S.checksum(bare), "zstd"), "f")


# ------------------------------------------------------------------------------ dtypes

@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_dtype_table_matches_torch() -> None:
    for name, size in D.ITEMSIZE.items():
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            assert torch.empty(0, dtype=dtype).element_size() == size, name
            assert D.dtype_name(dtype) == name and D.torch_dtype(name) is dtype


def test_dtype_names_refused() -> None:
    for bad in ("float128", "torch.float32", "", None, ["float32"], "Float32"):
        with pytest.raises(CorruptCheckpointError, match="unknown dtype"):
            D.itemsize(bad, "t")  # type: ignore[arg-type]
    for dtype in (torch.qint8, torch.bits8, torch.uint4):
        with pytest.raises(TypeError, match="cannot be checkpointed"):
            D.dtype_name(dtype)


# ------------------------------------------------------------------------------ manifest

def small_manifest(**extra: Any) -> M.Manifest:
    chunk = S.Chunk(64, 8, 8, HEX)
    piece = S.Piece("w", "float32", (0,), (2,), (chunk,), "rank00000-000.shard")
    return M.Manifest(
        step=3, save_id="abc", time="2024-01-01T00:00:00+00:00", unix_time=1.5, world_size=1,
        files={"rank00000-000.shard": S.FileRecord("rank00000-000.shard", 200, 128, HEX, 0)},
        tensors={"w": M.TensorEntry(meta=M.TensorMeta("float32", (2,), (piece,))),
                 "v": M.TensorEntry(alias_of="w")},
        tree=["d", {"w": ["T", "w"], "v": ["T", "v"], "x": ["f", (0.1).hex()]}],
        metrics={"loss": math.nan, "acc": 0.5, "best": -math.inf}, tags=("pinned",),
        extra=extra)


def test_manifest_round_trip_and_framing() -> None:
    data = M.serialize(small_manifest(note="\u00e9"))
    assert data.endswith(b'"}\n') and b'"checksum":"' in data[-40:]
    prefix = data[:-M._SUFFIX_LEN]
    assert data[-M._SUFFIX_LEN:] == b',"checksum":"' + \
        xxhash.xxh3_64_hexdigest(prefix).encode() + b'"}\n'
    m = M.parse(data)
    assert m.step == 3 and m.tags == ("pinned",) and m.extra == {"note": "\u00e9"}
    assert math.isnan(m.metrics["loss"]) and m.metrics["best"] == -math.inf
    assert m.resolve("v") == m.resolve("w") and m.nbytes == 200
    assert M.serialize(m) == data


@pytest.mark.parametrize("mutate", [
    lambda d: d[:-1],                       # newline lost
    lambda d: d + b"\n",                    # extra byte after the checksum
    lambda d: d[:-1] + b"\r\n",
    lambda d: d.replace(b'"checksum"', b'"Checksum"'),
    lambda d: d[:-20] + d[-20:].upper(),    # uppercase hex
    lambda d: b" " + d,
    lambda d: d[:10],
    lambda d: b"",
], ids=["no-newline", "trailing-byte", "crlf", "renamed", "uppercase-hex", "leading-space",
        "truncated", "empty"])
def test_manifest_framing_is_strict(mutate: Any) -> None:
    data = M.serialize(small_manifest())
    with pytest.raises(CorruptCheckpointError, match=r"m\.json"):
        M.parse(mutate(data), "m.json")


def test_manifest_checksum_member_must_be_last_and_unique() -> None:
    data = M.serialize(small_manifest())
    prefix = data[:-M._SUFFIX_LEN]
    # an inner "checksum" member duplicates the framing one: refused as a duplicate key
    forged = prefix + b',"checksum":"' + HEX.encode() + b'"'
    resealed = forged + b',"checksum":"' + xxhash.xxh3_64_hexdigest(forged).encode() + b'"}\n'
    with pytest.raises(CorruptCheckpointError, match="duplicate JSON key 'checksum'"):
        M.parse(resealed, "m.json")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, 5e-324])
def test_manifest_floats(value: float) -> None:
    enc = M.encode_float(value)
    back = M.decode_float(json.loads(json.dumps(enc)), "x")
    assert (math.isnan(back) and math.isnan(value)) or back.hex() == value.hex()


@pytest.mark.parametrize("bad", ["NaN", "1.0", None, True, [1.0], "Infinity"])
def test_manifest_decode_float_refuses(bad: Any) -> None:
    with pytest.raises(CorruptCheckpointError, match="expected a number"):
        M.decode_float(bad, "x")


# ------------------------------------------------------------------------------ tree

@pytest.mark.parametrize("parts, path", [
    (["a", "b"], "a/b"), (["a/b", "c"], "a~1b/c"), (["~", "~1"], "~0/~01"), ([1, "x"], "1/x"),
    (["", "a"], "a"),  # (sic) an empty top-level key is invisible in paths: see collect()
])
def test_tree_paths(parts: list[Any], path: str) -> None:
    out = ""
    for p in parts:
        out = T.join(out, p)
    assert out == path


@pytest.mark.parametrize("node", [
    ["i", True], ["i", 1.0], ["b", 1], ["s", 1], ["f", 1.0], ["f", "0x" + "1" * 60], ["f", "zz"],
    ["n", None], ["q", 1], ["i"], ["i", 1, 2],
])
def test_tree_decode_scalar_refuses_malformed_nodes(node: list[Any]) -> None:
    with pytest.raises(CorruptCheckpointError, match="where"):
        T.decode_scalar(node, "where")


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text()))
def test_tree_scalars_round_trip_exactly(value: Any) -> None:
    node = json.loads(safejson.dumps(T.encode_scalar(value, "p")))
    back = T.decode_scalar(node, "p")
    assert type(back) is type(value)
    assert T.float_equal(back, value) if isinstance(value, float) else back == value
