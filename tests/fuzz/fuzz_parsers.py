"""Fuzz target for shardckpt's parsers of untrusted bytes: the ``.shard`` preamble / trailer /
header parser (``shardckpt.format.shard.read_header``) and the manifest parser
(``shardckpt.format.manifest.parse``).

The contract checked for every input: the parser either returns, or raises a
``shardckpt.ShardckptError`` (``CorruptCheckpointError`` / ``IncompleteCheckpointError``) within a
bounded time and memory. Any other exception (``KeyError``, ``IndexError``, ``OverflowError``,
``RecursionError``, ``MemoryError``, ``struct.error``, ``UnicodeDecodeError``, ...) or a read at
a negative offset is a finding.

Random bytes almost never get past the checksums, so most modes start from a *valid* seed (a
real tiny checkpoint saved at start-up), mutate it, and then recompute the checksums (the
manifest's trailing ``"checksum"`` member, the shard trailer's header XXH3), so that the field
validation behind them is what gets fuzzed. The first input byte picks the mode (see ``MODES``).

Run by hand with atheris (not a dependency of the project)::

    python -m venv /tmp/fuzzvenv
    /tmp/fuzzvenv/bin/pip install atheris -e .       # from the repository root
    /tmp/fuzzvenv/bin/python tests/fuzz/fuzz_parsers.py -atheris_runs=200000 -rss_limit_mb=2048

(any libFuzzer flag works, e.g. a corpus directory). Without atheris, ``python
tests/fuzz/fuzz_parsers.py [N]`` runs N seeded random inputs instead. ``tests/fuzz/
test_fuzz_target.py`` runs ``TestOneInput`` on a few hundred inputs in the normal test suite.
"""

from __future__ import annotations

import copy
import json
import random
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:  # only for running by hand; the test suite imports this module without it
    import atheris
except ImportError:  # pragma: no cover - depends on the environment
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["shardckpt"]):
        import xxhash

        import shardckpt
        from shardckpt.format import manifest as M
        from shardckpt.format import shard as S
else:
    import xxhash

    import shardckpt
    from shardckpt.format import manifest as M
    from shardckpt.format import shard as S

SHARD_NAME = "rank00000-000.shard"


# ------------------------------------------------------------------------------ seeds
def _make_seeds() -> tuple[bytes, bytes]:
    """A valid ``manifest.json`` and ``.shard`` file, from a real save of a tiny state."""
    import torch

    g = torch.Generator().manual_seed(0)
    state = {"model": {"w": torch.randn(3, 5, generator=g),
                       "b": torch.arange(7, dtype=torch.int64),
                       "h": torch.randn(4, generator=g).to(torch.bfloat16)},
             "step": 1, "name": "seed"}
    with tempfile.TemporaryDirectory(prefix="shardckpt-fuzz-") as tmp:
        with shardckpt.CheckpointManager(tmp, async_save=False, capture_rng=False) as mgr:
            mgr.save(1, state, metrics={"loss": 0.5}, tags=("pinned",))
        step_dir = Path(tmp) / "step-0000000001"
        manifest = (step_dir / M.MANIFEST_NAME).read_bytes()
        shard = min(step_dir.glob("*.shard")).read_bytes()
    return manifest, shard


SEED_MANIFEST, SEED_SHARD = _make_seeds()
_CHECKSUM_TAIL = len(b',"checksum":""}\n') + 16


def reseal_manifest(body: bytes) -> bytes:
    """Manifest bytes for a JSON object ``body`` (``{...}``) with a correct checksum member."""
    prefix = body.rstrip()[:-1] if body.rstrip().endswith(b"}") else body
    return prefix + b',"checksum":"' + xxhash.xxh3_64_hexdigest(prefix).encode() + b'"}\n'


def manifest_body(data: bytes) -> bytes:
    """The JSON object of a sealed manifest, without its checksum member."""
    return data[:-_CHECKSUM_TAIL] + b"}"


def split_shard(data: bytes) -> tuple[bytes, bytes]:
    """(everything before the header, the header JSON) of a valid shard file."""
    offset, length, _, _ = S.TRAILER.unpack(data[-S.TRAILER_SIZE:])
    return data[:offset], data[offset:offset + length]


def reseal_shard(before: bytes, header: bytes) -> bytes:
    """A shard file: ``before`` (preamble + data), ``header``, and a trailer that fits them."""
    digest = xxhash.xxh3_64_intdigest(header)
    return before + header + S.TRAILER.pack(len(before), len(header), digest, S.TRAILER_MAGIC)


SEED_SHARD_BEFORE, SEED_SHARD_HEADER = split_shard(SEED_SHARD)
# The manifest without its provenance record (free-form and most of its bytes, which the parser
# rightly does not interpret): mutations then land on the fields that are validated.
SEED_DOC = {k: v for k, v in json.loads(manifest_body(SEED_MANIFEST)).items()
            if k != "provenance"}


# ------------------------------------------------------------------------------ mutations
class Bytes:
    """Draws numbers from the fuzz input, byte by byte (zeros once it is used up)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def below(self, n: int) -> int:
        """An int in [0, n) (n >= 1)."""
        if n <= 256:
            return self.byte() % n
        return (self.byte() | self.byte() << 8 | self.byte() << 16) % n

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        return self.take(len(self.data))


def edit_bytes(data: bytes, src: Bytes, max_edits: int = 4) -> bytes:
    """Byte-level edits driven by ``src``: overwrite, delete, insert, duplicate a span."""
    buf = bytearray(data)
    for _ in range(1 + src.below(max_edits)):
        if not buf:
            buf += src.take(8)
            continue
        at = src.below(len(buf))
        op = src.below(5)
        if op == 0:  # overwrite one byte
            buf[at] = src.byte()
        elif op == 1:  # flip one bit
            buf[at] ^= 1 << src.below(8)
        elif op == 2:  # delete a span
            del buf[at:at + 1 + src.below(64)]
        elif op == 3:  # insert bytes of the input
            buf[at:at] = src.take(1 + src.below(16))
        else:  # duplicate a span elsewhere
            span = bytes(buf[at:at + 1 + src.below(64)])
            to = src.below(len(buf))
            buf[to:to] = span
    return bytes(buf)


INTERESTING: list[Any] = [
    0, 1, -1, 7, 63, 64, 4096, 2**31, 2**32 + 1, 2**53 + 1, 2**62, 2**63, 2**64, -(2**63),
    10**30, 0.5, -0.0, 1e308, "", "x", "..", "../x", "a/../../b", "/etc/passwd", "%2e%2e/x",
    "x\u0000y", "\u00e9", SHARD_NAME, "manifest.json", "step-0000000001/" + SHARD_NAME,
    "float32", "bfloat16", "int64", "complex128", "zstd", "raw", "0123456789abcdef",
    "ffffffffffffffff", None, True, False, [], {}, [[]], [0], [2**62, 2**62], [-1],
    [0, 1, 2, 3, 4], {"a": 1}, [[0, 64, 64, "0123456789abcdef", "raw"]],
]


def _nodes(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _nodes(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _nodes(v, (*path, i))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def edit_json(doc: Any, src: Bytes, max_edits: int = 3) -> Any:
    """Structured edits of a JSON document: replace a value (with an interesting one, or with
    another node of the document), delete a key or element, duplicate an element, nest deeper,
    rename a key."""
    for _ in range(1 + src.below(max_edits)):
        paths = _nodes(doc)
        path = paths[src.below(len(paths))]
        op = src.below(6)
        if not path:  # the root itself
            continue
        parent, key = _get(doc, path[:-1]), path[-1]
        if op == 0:  # a copy: later edits must never change the shared table
            parent[key] = copy.deepcopy(INTERESTING[src.below(len(INTERESTING))])
        elif op == 1:
            parent[key] = json.loads(json.dumps(_get(doc, paths[src.below(len(paths))])))
        elif op == 2:
            del parent[key]
        elif op == 3 and isinstance(parent, list):
            parent.insert(key, json.loads(json.dumps(parent[key])))
        elif op == 4:
            parent[key] = [parent[key]] if src.byte() & 1 else {"x": parent[key]}
        elif isinstance(parent, dict):
            parent[f"{key}{src.byte() % 3}"] = parent.pop(key)
    return doc


def dump(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=True).encode("utf-8", "surrogatepass")


# ------------------------------------------------------------------------------ the parsers
def parse_manifest(data: bytes) -> None:
    M.parse(data, "fuzz/manifest.json")


def parse_shard(data: bytes) -> None:
    def read(offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise AssertionError(f"read at offset {offset}, length {length}: the parser did "
                                 f"not bound-check before reading")
        return data[offset:offset + length]

    S.read_header(read, len(data), SHARD_NAME)


def _manifest_raw(src: Bytes) -> None:
    parse_manifest(src.rest())


def _manifest_text(src: Bytes) -> None:
    parse_manifest(reseal_manifest(edit_bytes(dump(SEED_DOC), src)))


def _manifest_json(src: Bytes) -> None:
    doc = edit_json(json.loads(dump(SEED_DOC)), src)
    parse_manifest(reseal_manifest(dump(doc)))


def _shard_raw(src: Bytes) -> None:
    parse_shard(src.rest())


def _shard_bytes(src: Bytes) -> None:
    parse_shard(edit_bytes(SEED_SHARD, src))  # trailer and preamble lie; header unsealed


def _shard_text(src: Bytes) -> None:
    parse_shard(reseal_shard(SEED_SHARD_BEFORE, edit_bytes(SEED_SHARD_HEADER, src)))


def _shard_json(src: Bytes) -> None:
    doc = edit_json(json.loads(SEED_SHARD_HEADER), src)
    parse_shard(reseal_shard(SEED_SHARD_BEFORE, dump(doc)))


MODES: list[Callable[[Bytes], None]] = [
    _manifest_raw, _manifest_text, _manifest_json, _shard_raw, _shard_bytes, _shard_text,
    _shard_json,
]


def TestOneInput(data: bytes) -> None:  # the name atheris expects
    """One input: the first byte picks a mode, the rest drives it. Raises on a finding."""
    if not data:
        return
    src = Bytes(data[1:])
    try:
        MODES[data[0] % len(MODES)](src)
    except shardckpt.ShardckptError:
        pass  # the contract: refused with the package's own error


def random_inputs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` inputs cycling through the modes, with random drive bytes."""
    rng = random.Random(seed)
    return [bytes([i % len(MODES)]) + rng.randbytes(rng.randrange(0, 96)) for i in range(n)]


def main(argv: list[str]) -> None:
    if atheris is not None:
        atheris.Setup(argv, TestOneInput)
        atheris.Fuzz()
        return
    n = int(argv[1]) if len(argv) > 1 else 10_000
    for data in random_inputs(n):
        TestOneInput(data)
    print(f"atheris is not installed: ran {n} seeded random inputs, no finding")

if __name__ == "__main__":
    main(sys.argv)
