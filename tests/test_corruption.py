"""Damaged or hostile checkpoints are refused with the right error, never loaded as wrong data.

* every single-byte flip of a ``.shard`` file or of ``manifest.json``;
* truncation (and extension) of either file at many points, missing files;
* pickles (with side effects) in place of either file: refused, never unpickled;
* manifests with a correctly recomputed checksum that lie: duplicate JSON keys, paths leaving the
  step directory, absurd sizes, overflowing shapes, overlapping chunks, gaps in coverage, unknown
  dtypes, a bad version: each refused before any large allocation;
* :func:`shardckpt.format.shard.read_header` against tampered shard files.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
import struct
import tracemalloc
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import xxhash

import shardckpt
from shardckpt import CorruptCheckpointError, IncompleteCheckpointError
from shardckpt.format import manifest as M
from shardckpt.format import safejson
from shardckpt.format import shard as S

STEP = 1
STEP_DIR = "step-0000000001"
CHUNK = "48"  # small chunks: several per tensor, with zero padding between them


def make_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    return {
        "w": torch.randn(5, 7, generator=g),
        "ids": torch.arange(13, dtype=torch.int64) * 1_000_003,
        "half": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "mask": torch.rand(9, generator=g) > 0.5,
        "scalar": torch.tensor(-0.0, dtype=torch.float64),
        "zeros": torch.zeros(150, dtype=torch.uint8),
        "cfg": {"lr": 0.1, "name": "run"},
    }


def zero_like(state: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(raw(a[k]) == raw(b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
               for k in a)


@pytest.fixture(scope="module", params=[None, "zstd"], ids=["raw", "zstd"])
def template(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed checkpoint of :func:`make_state` at step 1 (never modified by tests)."""
    root = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHARDCKPT_CHUNK_SIZE", CHUNK)
        # without the manager's RNG state: a few KB that 48-byte chunks would make thousands
        with shardckpt.CheckpointManager(str(root), async_save=False, capture_rng=False,
                                         compression=request.param) as mgr:
            mgr.save(STEP, make_state())
    return root


@pytest.fixture
def ckpt(template: Path, tmp_path: Path) -> Path:
    """A private copy of the template checkpoint."""
    root = tmp_path / "ckpt"
    shutil.copytree(template, root)
    return root


@pytest.fixture
def one_io_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests that load hundreds of times: a reader thread pool of one starts faster."""
    monkeypatch.setenv("SHARDCKPT_IO_THREADS", "1")


def shard_files(root: Path) -> list[Path]:
    files = sorted((root / STEP_DIR).glob("*.shard"))
    assert len(files) >= 2
    return files


def load_fresh(root: Path | str, step: int | None = STEP) -> dict[str, Any]:
    """Load with a brand-new manager (no cached manifest) into zero tensors; return them."""
    dest = zero_like(make_state())
    with shardckpt.CheckpointManager(str(root)) as mgr:
        assert mgr.load(dest, step=step) == STEP
    return dest


def test_template_loads_intact(ckpt: Path) -> None:
    assert same_state(make_state(), load_fresh(ckpt))
    assert same_state(make_state(), load_fresh(ckpt, step=None))


# ------------------------------------------------------------------------------ layout

def regions(path: Path) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of a shard file by role: preamble, chunks, header, trailer, padding."""
    data = path.read_bytes()
    head = S.read_header(lambda o, n: data[o:o + n], len(data), path.name)
    covered = {
        "preamble": [(0, S.PREAMBLE_SIZE)],
        "chunk": sorted((c.offset, c.offset + c.stored) for p in head.pieces for c in p.chunks),
        "header": [(head.header_offset, len(data) - S.TRAILER_SIZE)],
        "trailer": [(len(data) - S.TRAILER_SIZE, len(data))],
    }
    marks = bytearray(len(data))
    for spans in covered.values():
        for a, b in spans:
            marks[a:b] = b"\x01" * (b - a)
    padding, start = [], None
    for i, m in enumerate([*marks, 1]):
        if not m and start is None:
            start = i
        elif m and start is not None:
            padding.append((start, i))
            start = None
    covered["padding"] = padding
    assert sum(b - a for spans in covered.values() for a, b in spans) == len(data)
    assert all(data[a:b] == bytes(b - a) for a, b in padding)
    return covered


def role_of(pos: int, layout: dict[str, list[tuple[int, int]]]) -> str:
    return next(role for role, spans in layout.items() for a, b in spans if a <= pos < b)


@contextmanager
def flipped(path: Path, pos: int, mask: int) -> Iterator[None]:
    with open(path, "r+b") as f:
        f.seek(pos)
        old = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([old ^ mask]))
    try:
        yield
    finally:
        with open(path, "r+b") as f:
            f.seek(pos)
            f.write(bytes([old]))


# ------------------------------------------------------------------------------ (a) bit flips

def flip_positions(layout: dict[str, list[tuple[int, int]]], budget: int = 700) -> list[int]:
    """Every byte of a small file. Of a larger one (the manager adds RNG state to every
    checkpoint): every byte of preamble and trailer, the first and last bytes of every chunk,
    padding run and the header, and an even sample of the rest, ``budget`` positions or so."""
    size = max(b for spans in layout.values() for _, b in spans)
    if size <= budget:
        return list(range(size))
    stride = max(1, size // budget)
    out: set[int] = set()
    for role, spans in layout.items():
        for a, b in spans:
            if role in ("preamble", "trailer"):
                out.update(range(a, b))
            out.update(range(a, min(b, a + 2)), range(max(a, b - 2), b),
                       range(a + (a * 7) % stride, b, stride))
    return sorted(out)


def test_byte_flips_of_every_shard_are_caught(ckpt: Path, one_io_thread: None) -> None:
    """A flip anywhere but in zero padding raises CorruptCheckpointError. Padding is covered by
    no checksum; a flip there must still never produce wrong data."""
    expected = make_state()
    for path in shard_files(ckpt):
        layout = regions(path)
        assert layout["chunk"] and layout["padding"]
        positions = flip_positions(layout)
        assert len(positions) >= 200 and {role_of(p, layout) for p in positions} == set(layout)
        for pos in positions:
            role = role_of(pos, layout)
            with flipped(path, pos, 1 << (pos % 8)):
                try:
                    got = load_fresh(ckpt)
                except CorruptCheckpointError as exc:
                    assert path.name in str(exc), (pos, role, str(exc))
                    continue
            assert role == "padding", f"{path.name}: flip at {pos} ({role}) went unnoticed"
            assert same_state(expected, got), f"{path.name}: flip at {pos} changed the data"


def test_flips_over_memory_url_are_caught(template: Path, one_io_thread: None) -> None:
    """The same over fsspec (no read_into fast path): a deterministic sample of positions."""
    fs = fsspec.filesystem("memory")
    name = f"corrupt-{uuid.uuid4().hex}"
    try:
        for src in (template / STEP_DIR).iterdir():
            fs.pipe_file(f"/{name}/{STEP_DIR}/{src.name}", src.read_bytes())
        url = f"memory://{name}"
        assert same_state(make_state(), load_fresh(url))
        for src in shard_files(template):
            data = src.read_bytes()
            layout = regions(src)
            target = f"/{name}/{STEP_DIR}/{src.name}"
            positions = sorted({*range(0, len(data), max(1, len(data) // 150)),
                                *range(len(data) - 40, len(data)), *range(0, 20)})
            for pos in positions:
                bad = bytearray(data)
                bad[pos] ^= 0x80
                fs.pipe_file(target, bytes(bad))
                try:
                    got = load_fresh(url)
                except CorruptCheckpointError:
                    continue
                finally:
                    fs.pipe_file(target, data)
                assert role_of(pos, layout) == "padding", pos
                assert same_state(make_state(), got)
    finally:
        fs.rm(f"/{name}", recursive=True)


def manifest_positions(size: int, budget: int = 400) -> list[int]:
    """The first and last 64 bytes (format tag, checksum member) and an even sample between."""
    stride = max(1, (size - 128) // budget)
    return sorted({*range(min(64, size)), *range(max(0, size - 64), size),
                   *range(64, size - 64, stride)})


def test_every_byte_flip_of_the_manifest_is_caught(ckpt: Path, one_io_thread: None) -> None:
    path = ckpt / STEP_DIR / M.MANIFEST_NAME
    data = path.read_bytes()
    # every byte, every bit, against the parser (cheap: the checksum fails first) ...
    for pos in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[pos] ^= 1 << bit
            with pytest.raises(CorruptCheckpointError, match=r"m\.json: "):
                M.parse(bytes(bad), "m.json")
    # ... and a sample through a fresh manager's load
    for i, pos in enumerate(manifest_positions(len(data))):
        for mask in (1 << (pos % 8), 0xFF) if i % 4 == 0 else (1 << (pos % 8),):
            with flipped(path, pos, mask):
                with shardckpt.CheckpointManager(str(ckpt)) as mgr:
                    with pytest.raises(CorruptCheckpointError, match=r"manifest\.json"):
                        mgr.load(zero_like(make_state()), step=STEP)
    # A corrupt manifest means "not committed": listing skips it with a warning, and a load of
    # the latest step finds nothing to load.
    for pos in range(0, len(data), max(97, len(data) // 20)):
        with flipped(path, pos, 0x04):
            with shardckpt.CheckpointManager(str(ckpt)) as mgr:
                with pytest.warns(UserWarning, match="skipping step 1"):
                    assert mgr.steps() == []
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with pytest.raises(IncompleteCheckpointError, match="no committed"):
                        mgr.load(zero_like(make_state()))


# ------------------------------------------------------------------------------ (b) truncation

def test_truncated_shards_are_caught(ckpt: Path, one_io_thread: None) -> None:
    for path in shard_files(ckpt):
        data = path.read_bytes()
        edges = {x for spans in regions(path).values() for a, b in spans for x in (a, b)}
        stride = max(13, len(data) // 150)
        for cut in range(len(data)):
            with pytest.raises(CorruptCheckpointError, match=r"x\.shard"):
                S.read_header(lambda o, n, d=data[:cut]: d[o:o + n], cut, "x.shard")
            if cut % stride and not {cut - 1, cut, cut + 1} & edges:
                continue  # loading is slower: a regular sample and around every region's edges
            path.write_bytes(data[:cut])
            with pytest.raises(CorruptCheckpointError, match=path.name):
                load_fresh(ckpt)
        path.write_bytes(data + b"\0")
        with pytest.raises(CorruptCheckpointError, match="bytes on storage"):
            load_fresh(ckpt)
        path.write_bytes(data)
    assert same_state(make_state(), load_fresh(ckpt))


def test_truncated_manifest_is_caught(ckpt: Path, one_io_thread: None) -> None:
    path = ckpt / STEP_DIR / M.MANIFEST_NAME
    data = path.read_bytes()
    for cut in range(len(data)):
        with pytest.raises(CorruptCheckpointError, match=r"m\.json: "):
            M.parse(data[:cut], "m.json")
    for cut in manifest_positions(len(data), budget=150):
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptCheckpointError, match=r"manifest\.json"):
            load_fresh(ckpt)


def test_missing_files(ckpt: Path) -> None:
    victim = shard_files(ckpt)[0]
    saved = victim.read_bytes()
    victim.unlink()
    with pytest.raises(IncompleteCheckpointError, match=victim.name):
        load_fresh(ckpt)
    victim.write_bytes(saved)
    (ckpt / STEP_DIR / M.MANIFEST_NAME).unlink()
    with pytest.raises(IncompleteCheckpointError, match="not committed"):
        load_fresh(ckpt)
    with shardckpt.CheckpointManager(str(ckpt)) as mgr:
        assert mgr.steps() == []


def test_shards_of_another_save_or_swapped_are_refused(template: Path, ckpt: Path,
                                                       tmp_path: Path) -> None:
    """Bytes that pass their chunk checksums, but belong to another save, are still refused."""
    other = tmp_path / "other"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHARDCKPT_CHUNK_SIZE", CHUNK)
        compression = "zstd" if template.name.startswith("ckpt-zstd") else None
        with shardckpt.CheckpointManager(str(other), async_save=False, capture_rng=False,
                                         compression=compression) as mgr:
            mgr.save(STEP, make_state())  # same data, same layout, another save
    for path in shard_files(ckpt):
        original = path.read_bytes()
        replacement = (other / STEP_DIR / path.name).read_bytes()
        assert len(replacement) == len(original) and replacement != original
        path.write_bytes(replacement)
        with pytest.raises(CorruptCheckpointError, match="not the one the manifest recorded"):
            load_fresh(ckpt)
        path.write_bytes(original)
    a, b = shard_files(ckpt)[:2]
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    with pytest.raises(CorruptCheckpointError):
        load_fresh(ckpt)


# ------------------------------------------------------------------------------ (c) pickles

class Boom:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_pickle_payload_is_live(tmp_path: Path) -> None:
    """The payload used below really does run code when unpickled (else the tests prove nothing)."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(Boom(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("target", ["manifest", "shard", "shard-same-size"])
def test_pickles_are_never_unpickled(ckpt: Path, tmp_path: Path, target: str) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"state": Boom(marker)}, protocol=pickle.HIGHEST_PROTOCOL)
    if target == "manifest":
        (ckpt / STEP_DIR / M.MANIFEST_NAME).write_bytes(payload)
        with pytest.raises(CorruptCheckpointError, match=r"manifest\.json"):
            load_fresh(ckpt)
        with shardckpt.CheckpointManager(str(ckpt)) as mgr, pytest.warns(UserWarning):
            assert mgr.steps() == []
    else:
        path = shard_files(ckpt)[0]
        if target == "shard-same-size":  # pickle ignores bytes after STOP: pad to the real size
            size = path.stat().st_size
            assert len(payload) < size
            payload += bytes(size - len(payload))
        path.write_bytes(payload)
        with pytest.raises(CorruptCheckpointError, match=path.name):
            load_fresh(ckpt)
    assert not marker.exists()
    # a torch.save file (a zip of pickles) in place of a shard
    path = shard_files(ckpt)[-1]
    torch.save({"x": Boom(marker)}, path)
    with pytest.raises(CorruptCheckpointError):
        load_fresh(ckpt)
    assert not marker.exists()


# ------------------------------------------------------------------------------ (d), (e) lies

def raw_manifest(root: Path) -> dict[str, Any]:
    data = (root / STEP_DIR / M.MANIFEST_NAME).read_bytes()
    return json.loads(data[:-M._SUFFIX_LEN] + b"}")


def read_shard_header(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    offset, length, _, _ = S.TRAILER.unpack(data[-S.TRAILER_SIZE:])
    return json.loads(data[offset:offset + length])


def manifest_doc(root: Path) -> dict[str, Any]:
    """The manifest with the pieces of every shard header folded back into its tensors (each
    with its ``file``), as one document that the lies below tamper with."""
    doc = raw_manifest(root)
    for name in sorted(doc["files"]):
        for p in read_shard_header(root / STEP_DIR / name)["pieces"]:
            entry = doc["tensors"][p["key"]]
            if "per_rank" in entry:
                entry = entry["per_rank"][doc["files"][name]["rank"]]
            entry.setdefault("pieces", []).append(
                {"file": name, **{k: p[k] for k in ("offsets", "lengths", "chunks")}})
    for entry in doc["tensors"].values():
        if "alias_of" not in entry and "per_rank" not in entry:
            entry.setdefault("pieces", [])
    return doc


def reseal(prefix: bytes) -> bytes:
    """Manifest bytes for a JSON body without its final ``}``, with a correct checksum."""
    return prefix + b',"checksum":"' + xxhash.xxh3_64_hexdigest(prefix).encode() + b'"}\n'


def write_header(path: Path, pieces: list[dict[str, Any]], old_offset: int) -> dict[str, int | str]:
    """Rewrite a shard file's header (and trailer) with ``pieces``, resealed; its new record."""
    data = path.read_bytes()
    head = read_shard_header(path)
    head["pieces"] = pieces
    raw_head = safejson.dumps(head)
    digest = xxhash.xxh3_64_intdigest(raw_head)
    out = data[:old_offset] + raw_head + S.TRAILER.pack(old_offset, len(raw_head), digest,
                                                        S.TRAILER_MAGIC)
    path.write_bytes(out)
    return {"nbytes": len(out), "header_offset": old_offset, "header_xxh3": f"{digest:016x}"}


def write_doc(root: Path, doc: dict[str, Any]) -> bytes:
    """Split a document of :func:`manifest_doc` back into shard headers and a manifest, each
    resealed with correct checksums, so that only validation can catch a lie."""
    doc = json.loads(json.dumps(doc))
    original = raw_manifest(root)["files"]
    by_file: dict[str, list[dict[str, Any]]] = {name: [] for name in doc["files"]}
    for key, entry in doc["tensors"].items():
        metas = entry.get("per_rank", [entry]) if isinstance(entry, dict) else []
        for meta in metas:
            for p in meta.pop("pieces", None) or []:
                by_file.setdefault(p["file"], []).append(
                    {"key": key, "dtype": meta.get("dtype"), "file": p["file"],
                     **{k: p[k] for k in ("offsets", "lengths", "chunks")}})
    doc["tensors"] = {k: e for k, e in doc["tensors"].items() if not e.get("header_only")}
    for name, pieces in by_file.items():
        path = root / STEP_DIR / name
        if name in original and name in doc["files"] and path.is_file():
            before = read_shard_header(path)["pieces"]
            if json.dumps(pieces) != json.dumps(before):  # 48.0 == 48, but not in JSON
                record = write_header(path, pieces, original[name]["header_offset"])
                doc["files"][name].update(record)
    data = reseal(safejson.dumps(doc)[:-1])
    (root / STEP_DIR / M.MANIFEST_NAME).write_bytes(data)
    return data


def test_reseal_reproduces_the_original(ckpt: Path) -> None:
    original = (ckpt / STEP_DIR / M.MANIFEST_NAME).read_bytes()
    assert write_doc(ckpt, manifest_doc(ckpt)) == original


@pytest.mark.parametrize("dup", [
    (b'"step":1,', b'"step":1,"step":1,', "step"),
    (b'"tags":[],', b'"tags":[],"tags":["pinned"],', "tags"),
    (b'"tensors":{', b'"tensors":{"w":{},', "w"),
    (b'"cfg":["d",{', b'"cfg":["d",{"lr":["n"],', "lr"),
], ids=["top-level", "top-level-different-value", "tensor-key", "tree-key"])
def test_duplicate_json_keys_are_refused(ckpt: Path, dup: tuple[bytes, bytes, str]) -> None:
    old, new, key = dup
    data = (ckpt / STEP_DIR / M.MANIFEST_NAME).read_bytes()
    prefix = data[:-M._SUFFIX_LEN]
    assert prefix.count(old) == 1
    (ckpt / STEP_DIR / M.MANIFEST_NAME).write_bytes(reseal(prefix.replace(old, new)))
    with pytest.raises(CorruptCheckpointError, match=f"duplicate JSON key '{key}'") as info:
        load_fresh(ckpt)
    assert "manifest.json" in str(info.value)


@contextmanager
def bounded_memory(limit: int = 50 << 20) -> Iterator[list[int]]:
    """Fails if Python allocations peak above ``limit`` or torch is asked for a large tensor."""
    requested: list[int] = []
    real_empty, real_zeros = torch.empty, torch.zeros

    def numel(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) \
            else args
        shape = kwargs.get("size", shape)
        return math.prod(int(s) for s in shape)

    def spy(real: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
            requested.append(numel(args, kwargs))
            return real(*args, **kwargs)
        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", spy(real_empty))
        mp.setattr(torch, "zeros", spy(real_zeros))
        tracemalloc.start()
        try:
            yield requested
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < limit, f"peak Python allocation {peak} bytes"
    assert max(requested, default=0) < 1 << 20, f"torch asked for {max(requested)} elements"


def first_tensor(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["tensors"]["w"]


def rename_file(doc: dict[str, Any], new: str) -> None:
    old = first_tensor(doc)["pieces"][0]["file"]
    doc["files"] = {new if k == old else k: v for k, v in doc["files"].items()}
    for entry in doc["tensors"].values():
        for p in entry.get("pieces", []):
            if p["file"] == old:
                p["file"] = new


def set_chunk(i: int, value: Any) -> Callable[[dict[str, Any]], None]:
    def tamper(doc: dict[str, Any]) -> None:
        first_tensor(doc)["pieces"][0]["chunks"][0][i] = value
    return tamper


def set_shape(shape: list[int]) -> Callable[[dict[str, Any]], None]:
    def tamper(doc: dict[str, Any]) -> None:
        first_tensor(doc)["shape"] = shape
        first_tensor(doc)["pieces"][0]["lengths"] = shape
    return tamper


def overlap_chunks(doc: dict[str, Any]) -> None:
    chunks = first_tensor(doc)["pieces"][0]["chunks"]
    chunks[1][0] = chunks[0][0] + 1


def overlap_tensors(doc: dict[str, Any]) -> None:
    """The second tensor's first chunk moved onto the first tensor's first chunk."""
    w = first_tensor(doc)["pieces"][0]
    for entry in doc["tensors"].values():
        p = entry["pieces"][0] if entry.get("pieces") else None
        if p and p is not w and p["file"] == w["file"] and p["chunks"]:
            p["chunks"][0][0] = w["chunks"][0][0]
            return
    raise AssertionError("no second tensor in the same file")


def overlap_pieces(doc: dict[str, Any]) -> None:
    """Two pieces claiming the same box of ``w``."""
    w = first_tensor(doc)
    w["pieces"].append(json.loads(json.dumps(w["pieces"][0])))


def drop_piece(doc: dict[str, Any]) -> None:
    first_tensor(doc)["pieces"] = []


def grow_shape(doc: dict[str, Any]) -> None:
    first_tensor(doc)["shape"] = [6, 7]  # the single piece covers 5 of 6 rows


def set_top(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def tamper(doc: dict[str, Any]) -> None:
        doc[key] = value
    return tamper


def set_file_field(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def tamper(doc: dict[str, Any]) -> None:
        for rec in doc["files"].values():
            rec[key] = value
    return tamper


def set_dtype(name: Any) -> Callable[[dict[str, Any]], None]:
    def tamper(doc: dict[str, Any]) -> None:
        first_tensor(doc)["dtype"] = name
    return tamper


def rename_piece_key(key: str) -> Callable[[dict[str, Any]], None]:
    """A header piece of ``w`` relabelled as a tensor the manifest does not list."""
    def tamper(doc: dict[str, Any]) -> None:
        doc["tensors"][key] = {"dtype": "float32", "pieces": first_tensor(doc).pop("pieces"),
                               "header_only": True}  # the header has it; the manifest does not
        first_tensor(doc)["pieces"] = []
    return tamper


def set_ranks(runs: list[list[int]]) -> Callable[[dict[str, Any]], None]:
    def tamper(doc: dict[str, Any]) -> None:
        first_tensor(doc)["ranks"] = runs
    return tamper


def renamed(path: str) -> Callable[[dict[str, Any]], None]:
    return lambda doc: rename_file(doc, path)


BIG = 2**62
LIES: dict[str, tuple[Callable[[dict[str, Any]], None], type[Exception], str]] = {
    "path-dotdot": (renamed("../x.shard"), CorruptCheckpointError, "file name"),
    "path-absolute": (renamed("/etc/passwd"), CorruptCheckpointError, "file name"),
    "path-inner-dotdot": (renamed("a/../../b.shard"), CorruptCheckpointError, "file name"),
    "path-percent-encoded": (renamed("%2e%2e/x.shard"), CorruptCheckpointError, "file name"),
    "path-dots-only": (renamed("...shard"), CorruptCheckpointError, "file name"),
    "path-backslash": (renamed("..\\x.shard"), CorruptCheckpointError, "file name"),
    "path-nul": (renamed("x\x00.shard"), CorruptCheckpointError, "file name"),
    "path-not-shard": (renamed("manifest.json"), CorruptCheckpointError, "file name"),
    "piece-of-unlisted-tensor": (rename_piece_key("ghost"), CorruptCheckpointError,
                                 "does not list"),
    "writer-rank-out-of-world": (set_ranks([[0, 3]]), CorruptCheckpointError, "ranks"),
    "writer-rank-without-file": (set_ranks([[0, 1], [2, 3]]), CorruptCheckpointError, "ranks"),
    "writer-runs-unsorted": (set_ranks([[0, 1], [0, 1]]), CorruptCheckpointError, "ranks"),
    "writer-run-one-number": (set_ranks([[0]]), CorruptCheckpointError, "ranks"),
    "writer-runs-not-a-list": (set_ranks("0-1"), CorruptCheckpointError, "ranks"),  # type: ignore
    "file-nbytes-huge": (set_file_field("nbytes", BIG), CorruptCheckpointError, "nbytes"),
    "file-nbytes-negative": (set_file_field("nbytes", -1), CorruptCheckpointError, "nbytes"),
    "file-header-offset-huge": (set_file_field("header_offset", BIG), CorruptCheckpointError,
                                "header_offset"),
    "file-rank-out-of-world": (set_file_field("rank", 3), CorruptCheckpointError, "rank"),
    "chunk-offset-huge": (set_chunk(0, BIG), CorruptCheckpointError, "offset"),
    "chunk-offset-in-preamble": (set_chunk(0, 10), CorruptCheckpointError, "offset"),
    "chunk-stored-huge": (set_chunk(1, BIG), CorruptCheckpointError, "stored"),
    "chunk-raw-huge": (set_chunk(2, BIG), CorruptCheckpointError, "raw"),
    "chunk-size-float": (set_chunk(1, 48.0), CorruptCheckpointError, "integer"),
    "chunk-size-bool": (set_chunk(1, True), CorruptCheckpointError, "integer"),
    "chunk-codec-unknown": (set_chunk(4, "lz4"), CorruptCheckpointError, "codec"),
    "chunk-checksum-not-hex": (set_chunk(3, "zz" * 8), CorruptCheckpointError, "checksum"),
    "chunks-overlap": (overlap_chunks, CorruptCheckpointError, "overlaps"),
    "chunks-of-two-tensors-overlap": (overlap_tensors, CorruptCheckpointError, "overlaps"),
    "shape-huge": (set_shape([BIG]), CorruptCheckpointError, "shape|lengths"),
    "shape-product-overflows": (set_shape([2**31, 2**31, 2**31]), CorruptCheckpointError,
                                "elements"),
    "shape-product-overflows-int64": (set_shape([2**40] * 4), CorruptCheckpointError,
                                      "elements"),
    "shape-too-many-dims": (set_shape([1] * 65), CorruptCheckpointError, "at most 64"),
    "pieces-overlap": (overlap_pieces, CorruptCheckpointError, "overlap"),
    "pieces-missing": (drop_piece, IncompleteCheckpointError, "cover 0 of 35"),
    "pieces-leave-a-gap": (grow_shape, IncompleteCheckpointError, "cover 35 of 42"),
    "dtype-unknown": (set_dtype("float128"), CorruptCheckpointError, "unknown dtype"),
    "dtype-not-a-string": (set_dtype(["float32"]), CorruptCheckpointError, "dtype"),
    "version-1": (set_top("version", 1), CorruptCheckpointError, "version"),
    "version-3": (set_top("version", 3), CorruptCheckpointError, "version"),
    "version-string": (set_top("version", "1"), CorruptCheckpointError, "version"),
    "format-other": (set_top("format", "pytorch"), CorruptCheckpointError, "format"),
    "byteorder-big": (set_top("byteorder", "big"), CorruptCheckpointError, "little-endian"),
    "step-other": (set_top("step", 2), CorruptCheckpointError, "step 2"),
    "world-size-zero": (set_top("world_size", 0), CorruptCheckpointError, "world_size"),
    "alias-dangling": (lambda d: d["tensors"].update({"x": {"alias_of": "nope"}}),
                       CorruptCheckpointError, "alias"),
    "tree-not-a-node": (set_top("tree", {"w": 1}), CorruptCheckpointError, "tree node"),
    "tree-unknown-tensor": (set_top("tree", ["d", {"w": ["T", "ghost"]}]), CorruptCheckpointError,
                            "ghost"),
}


@pytest.mark.parametrize("case", sorted(LIES))
def test_lying_manifest_is_refused_before_any_large_allocation(ckpt: Path, case: str) -> None:
    tamper, error, match = LIES[case]
    doc = manifest_doc(ckpt)
    tamper(doc)
    write_doc(ckpt, doc)
    for dest in (zero_like(make_state()), dict.fromkeys(make_state())):
        if case == "pieces-leave-a-gap" and dest["w"] is not None:
            # the given tensor's shape is checked against the manifest's before any piece
            error, match = ValueError, "checkpoint shape \\[6, 7\\] differs"
        else:
            error, match = LIES[case][1:]
        with bounded_memory():
            with shardckpt.CheckpointManager(str(ckpt)) as mgr:
                with pytest.raises(error, match=match) as info:
                    mgr.load(dest, step=STEP, strict=False)
        # the error names the manifest or the shard file whose header holds the lie
        assert re.search(r"manifest\.json|\.shard", str(info.value)) or \
            case.startswith("tree-") or error is ValueError


def test_declared_size_beyond_the_files_is_refused_before_allocating(ckpt: Path) -> None:
    doc = manifest_doc(ckpt)
    w = first_tensor(doc)
    n = 2**48  # float32: 1 PiB, within the format's bounds but far beyond the files
    w["shape"] = w["pieces"][0]["lengths"] = [n]
    w["pieces"][0]["offsets"] = [0]
    chunks = w["pieces"][0]["chunks"]
    chunks[-1][2] = 4 * n - sum(c[2] for c in chunks[:-1])
    chunks[-1][4] = "zstd"
    write_doc(ckpt, doc)
    with shardckpt.CheckpointManager(str(ckpt)) as mgr:
        with pytest.raises(CorruptCheckpointError):
            mgr.load({"w": None}, step=STEP)


def test_lying_zstd_frame_is_refused_before_allocating(tmp_path: Path) -> None:
    """A zstd chunk whose frame header claims 8 GiB (and whose checksums are all consistent)."""
    import zstandard

    frame = zstandard.ZstdCompressor().compress(bytes(4096))
    fcs_flag = frame[4] >> 6
    size_bytes = {0: 1, 1: 2, 2: 4, 3: 8}[fcs_flag]
    assert frame[4] & 0x20  # single segment: the content size follows the descriptor
    claim = 8 << 30
    lying = frame[:4] + bytes([(frame[4] & 0x3F) | 0xC0]) + struct.pack("<Q", claim) + \
        frame[5 + size_bytes:]
    assert zstandard.frame_content_size(lying) == claim

    def encode(self: S.Codec, raw: memoryview) -> tuple[Any, str]:
        return lying, "zstd"

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S.Codec, "encode", encode)
        with shardckpt.CheckpointManager(str(tmp_path), async_save=False, capture_rng=False,
                                         compression="zstd") as mgr:
            mgr.save(STEP, {"w": torch.zeros(1024)})
    with bounded_memory():
        with shardckpt.CheckpointManager(str(tmp_path)) as mgr:
            with pytest.raises(CorruptCheckpointError, match="declares"):
                mgr.load({"w": torch.zeros(1024)})


# ------------------------------------------------------------------------------ read_header

def header_of(data: bytes, name: str = "t.shard") -> S.ShardHeader:
    return S.read_header(lambda o, n: data[o:o + n], len(data), name)


def retrailer(data: bytes, offset: int, length: int, digest: int | None = None,
              magic: bytes = S.TRAILER_MAGIC) -> bytes:
    body = data[:-S.TRAILER_SIZE]
    if digest is None:
        digest = S.TRAILER.unpack(data[-S.TRAILER_SIZE:])[2]
    return body + S.TRAILER.pack(offset, length, digest, magic)


def rewrite_header(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """Replace the JSON header with an edited one, trailer and its checksum recomputed."""
    offset, length, _, _ = S.TRAILER.unpack(data[-S.TRAILER_SIZE:])
    head = json.loads(data[offset:offset + length])
    edit(head)
    new = safejson.dumps(head)
    return data[:offset] + new + S.TRAILER.pack(offset, len(new), xxhash.xxh3_64_intdigest(new),
                                                S.TRAILER_MAGIC)


@pytest.fixture
def shard_bytes(template: Path) -> bytes:
    data = shard_files(template)[0].read_bytes()
    assert header_of(data).pieces
    return data


def _setitem(d: dict[str, Any], key: str, value: Any) -> None:
    d[key] = value


def _chunk0(h: dict[str, Any], i: int, v: Any) -> None:
    h["pieces"][0]["chunks"][0][i] = v


HEADER_TAMPERING: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "bad-magic": (lambda d: b"PK\x03\x04" + d[4:], "bad magic"),
    "bad-version": (lambda d: d[:8] + struct.pack("<I", 2) + d[12:], "version 2"),
    "unknown-flags": (lambda d: d[:12] + struct.pack("<I", 1) + d[16:], "flags"),
    "reserved-not-zero": (lambda d: d[:40] + b"\x01" + d[41:], "reserved"),
    "bad-trailer-magic": (lambda d: d[:-8] + b"SHRDEND2", "trailer magic"),
    "header-offset-zero": (lambda d: retrailer(d, 0, 10), "does not fit"),
    "header-offset-past-end": (lambda d: retrailer(d, len(d) + 5, 10), "does not fit"),
    "header-offset-huge": (lambda d: retrailer(d, 2**62, 10), "does not fit"),
    "header-length-huge": (lambda d: retrailer(d, 64, 2**62), "does not fit"),
    "header-offset-wraps": (lambda d: retrailer(d, 2**64 - 1, 2**64 - 1), "does not fit"),
    "header-checksum": (lambda d: retrailer(d, *S.TRAILER.unpack(d[-32:])[:2], digest=1),
                        "header checksum"),
    "header-not-json": (lambda d: rewrite_header_raw(d, b'"format":', b'"format"'),
                        "invalid JSON"),
    "header-format": (lambda d: rewrite_header(d, lambda h: _setitem(h, "format", "x")),
                      "not a version-1"),
    "header-pieces-not-list": (lambda d: rewrite_header(d, lambda h: _setitem(h, "pieces", {})),
                               "must be a list"),
    "header-chunk-past-header": (lambda d: rewrite_header(d, lambda h: _chunk0(h, 0, len(d))),
                                 "runs past"),
    "header-chunk-overlap": (lambda d: rewrite_header(
        d, lambda h: h["pieces"].append(json.loads(json.dumps(h["pieces"][0])))), "overlaps"),
    "header-chunk-raw-huge": (lambda d: rewrite_header(d, lambda h: _chunk0(h, 2, 2**62)),
                              "raw size"),
    "header-step-huge": (lambda d: rewrite_header(d, lambda h: _setitem(h, "step", 10**12)),
                         "step"),
    "header-duplicate-key": (lambda d: rewrite_header_raw(d, b'"step":', b'"step":1,"step":'),
                             "duplicate JSON key 'step'"),
}


def rewrite_header_raw(data: bytes, old: bytes, new: bytes) -> bytes:
    offset, length, _, _ = S.TRAILER.unpack(data[-S.TRAILER_SIZE:])
    head = data[offset:offset + length].replace(old, new, 1)
    return data[:offset] + head + S.TRAILER.pack(offset, len(head),
                                                 xxhash.xxh3_64_intdigest(head), S.TRAILER_MAGIC)


@pytest.mark.parametrize("case", sorted(HEADER_TAMPERING))
def test_read_header_refuses_tampered_shards(shard_bytes: bytes, case: str) -> None:
    tamper, match = HEADER_TAMPERING[case]
    bad = tamper(shard_bytes)
    reads: list[tuple[int, int]] = []

    def read(offset: int, n: int) -> bytes:
        reads.append((offset, n))
        assert n <= len(bad) + 1, f"asked to read {n} bytes"
        return bad[offset:offset + n]

    with pytest.raises(CorruptCheckpointError, match=match) as info:
        S.read_header(read, len(bad), "rank00000-000.shard")
    assert "rank00000-000.shard" in str(info.value)
    assert sum(n for _, n in reads) <= len(bad) + S.PREAMBLE_SIZE + S.TRAILER_SIZE


def test_read_header_of_an_intact_shard(shard_bytes: bytes) -> None:
    head = header_of(shard_bytes)
    assert head.step == STEP and head.rank == 0 and len(head.save_id) == 32
    assert head.header_offset % 64 == 0
    assert all(c.offset % 64 == 0 for p in head.pieces for c in p.chunks)
    assert {p.key for p in head.pieces} <= set(make_state())


def test_read_header_too_short() -> None:
    for n in range(S.PREAMBLE_SIZE + S.TRAILER_SIZE):
        with pytest.raises(CorruptCheckpointError, match="too short"):
            header_of(bytes(n))


def test_tampered_shard_header_fails_the_load(ckpt: Path) -> None:
    """A shard whose header was rewritten consistently (its own checksum fixed) no longer matches
    the manifest's record of it."""
    path = shard_files(ckpt)[0]
    data = path.read_bytes()
    bad = rewrite_header(data, lambda h: _setitem(h, "save_id", "f" * 32))
    assert len(bad) == len(data)
    path.write_bytes(bad)
    with pytest.raises(CorruptCheckpointError, match="not the one the manifest recorded"):
        load_fresh(ckpt)
