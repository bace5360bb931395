"""The JSON collectives' payloads: plain JSON when small, zstd-compressed JSON when large."""

from __future__ import annotations

import json

import pytest

from shardckpt.engine.comm import COMPRESS_ABOVE, decode_json, encode_json
from shardckpt.errors import CollectiveError


def leaf_specs(n: int) -> list[list[object]]:
    return [[f"model.layers.{i}.mlp.up_proj.weight", "bfloat16", [8192, 28672], [64 * i, 0],
             [64, 28672], True, None, None] for i in range(n)]


def test_small_payload_is_plain_json() -> None:
    payload = encode_json({"error": None, "leaves": leaf_specs(2)})
    assert payload[:1] == b"J" and b"up_proj" in payload
    assert decode_json(payload) == {"error": None, "leaves": leaf_specs(2)}


def test_large_payload_is_compressed_and_round_trips() -> None:
    specs = leaf_specs(2000)
    payload = encode_json(specs)
    assert payload[:1] == b"Z"
    raw = len(json.dumps(specs, separators=(",", ":")))
    assert raw > COMPRESS_ABOVE and len(payload) * 10 < raw  # a leaf list shrinks a lot
    assert decode_json(payload) == specs


def test_malformed_payload_is_a_collective_error() -> None:
    with pytest.raises(CollectiveError, match="malformed"):
        decode_json(b"P\x80\x04")
