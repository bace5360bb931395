"""Save -> load round trips, compared byte for byte.

* Property tests: random nested states (str- and int-keyed dicts, lists, tuples, JSON scalars)
  holding tensors of every storable dtype with random bit patterns (NaN payloads, -0.0, inf), 0-d,
  empty, transposed, strided, expanded and channels-last tensors, views of one another and tensors
  tied under several keys; saved with and without zstd, with tiny chunk sizes, to plain paths,
  ``file://`` and ``memory://`` URLs, synchronously and in the background; loaded into a state of
  the same structure holding zero tensors (contiguous or not), and into a state that only names
  the top-level keys (a load restores the caller's keys), so that the loader creates the rest.
* The reader on its own: arbitrary boxes of tensors stored as several pieces.
* Ties: a tensor under two keys is stored once; a module with tied weights comes back tied.
* Values that cannot be checkpointed raise ``TypeError`` naming their key path.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import shardckpt
from shardckpt.engine.index import full_manifest
from shardckpt.engine.reader import CheckpointReader
from shardckpt.format import manifest as M
from shardckpt.format.dtypes import dtype_name
from shardckpt.format.shard import Codec, Piece, ShardWriter
from shardckpt.planning.statedict import collect
from shardckpt.storage import open_location, step_dirname

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")

DTYPES = [
    torch.float32, torch.float16, torch.float64, torch.bfloat16,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
    torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.uint16, torch.uint32, torch.uint64,
    torch.bool, torch.complex32, torch.complex64, torch.complex128,
]
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------ helpers

def raw_bytes(t: torch.Tensor) -> bytes:
    """The tensor's elements in C order, as bytes (what must survive a round trip)."""
    c = t.detach().contiguous()
    return c.as_strided((c.numel(),), (1,)).view(torch.uint8).numpy().tobytes()


def from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    u8 = torch.tensor(list(data), dtype=torch.uint8) if len(data) < 64 else \
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return u8.view(dtype).reshape(shape)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def random_bits(rng: np.random.Generator, dtype: torch.dtype,
                shape: tuple[int, ...]) -> torch.Tensor:
    """Random elements of ``dtype``, with the nastiest bit patterns sprinkled in."""
    n, isz = math.prod(shape), element_size(dtype)
    if dtype == torch.bool:
        return torch.from_numpy(rng.integers(0, 2, n, dtype=np.uint8)).view(torch.bool) \
            .reshape(shape)
    data = bytearray(rng.integers(0, 256, n * isz, dtype=np.uint8).tobytes())
    bits = 8 * isz
    # sign bit only (-0.0), all ones (-NaN, full payload), +NaN with full payload, +0.0, 1
    specials = [1 << (bits - 1), (1 << bits) - 1, (1 << (bits - 1)) - 1, 0, 1]
    for i in range(n):
        if rng.random() < 0.3:
            pattern = specials[rng.integers(len(specials))]
            data[i * isz:(i + 1) * isz] = pattern.to_bytes(isz, "little")
    return from_bytes(bytes(data), dtype, shape)


def zeros(dtype: torch.dtype, shape: tuple[int, ...], contiguous: bool = True) -> torch.Tensor:
    """A destination tensor of all-zero bytes; optionally a non-contiguous view."""
    if contiguous or len(shape) == 0 or math.prod(shape) == 0:
        n = max(1, math.prod(shape)) if shape == () else math.prod(shape)
        return torch.zeros(n * element_size(dtype), dtype=torch.uint8).view(dtype).reshape(shape)
    if len(shape) == 1:
        return zeros(dtype, (2 * shape[0],))[::2]
    rev = zeros(dtype, tuple(reversed(shape)))
    return rev.permute(*reversed(range(len(shape))))


def float_same(a: float, b: float) -> bool:
    return a.hex() == b.hex() or (math.isnan(a) and math.isnan(b))


def assert_same(expected: Any, actual: Any, path: str = "<root>") -> None:
    """Structural equality with bitwise tensors and floats (-0.0 != 0.0, NaN == NaN)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: {type(actual)}"
        assert actual.dtype == expected.dtype, f"{path}: {actual.dtype} != {expected.dtype}"
        assert tuple(actual.shape) == tuple(expected.shape), f"{path}: shape"
        assert raw_bytes(actual) == raw_bytes(expected), f"{path}: bytes differ"
        return
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        for k in expected:
            assert_same(expected[k], actual[k], f"{path}/{k!r}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{path}: length"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_same(e, a, f"{path}/{i}")
    elif isinstance(expected, float):
        assert float_same(expected, actual), f"{path}: {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def fresh_for(state: dict[str, Any]) -> dict[str, Any]:
    """A load target naming the top-level keys to restore (a load restores only the caller's
    keys) and holding nothing: every value below the top is created by the loader."""
    return dict.fromkeys(state)


def mirror(value: Any, contiguous: bool, memo: dict[int, torch.Tensor]) -> Any:
    """The same structure with zero tensors (ties kept) and placeholder scalars."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = zeros(value.dtype, tuple(value.shape), contiguous)
        return memo[id(value)]
    if isinstance(value, dict):
        return {k: mirror(v, contiguous, memo) for k, v in value.items()}
    if isinstance(value, list):
        return [mirror(v, contiguous, memo) for v in value]
    if isinstance(value, tuple):
        return tuple(mirror(v, contiguous, memo) for v in value)
    return "placeholder"


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v)


@contextlib.contextmanager
def checkpoint_root(kind: str) -> Iterator[str]:
    """A fresh, empty root of the given kind ("path", "file" or "memory"), removed afterwards."""
    if kind == "memory":
        name = f"rt-{uuid.uuid4().hex}"
        try:
            yield f"memory://{name}"
        finally:
            fs = fsspec.filesystem("memory")
            with contextlib.suppress(FileNotFoundError):
                fs.rm(f"/{name}", recursive=True)
        return
    with tempfile.TemporaryDirectory(prefix="shardckpt-rt-") as d:
        yield d if kind == "path" else f"file://{d}"


def save_and_reload(root: str, state: dict[str, Any], *, compression: str | None = None,
                    async_save: bool = False, step: int = 7,
                    capture_rng: bool = False) -> shardckpt.CheckpointManager:
    """Save ``state`` with one manager; return a fresh one (no cached manifest) to load with.

    The RNG state the manager adds to every checkpoint is left out unless asked for: it is
    several KB, which tiny test chunk sizes would turn into thousands of chunks."""
    with shardckpt.CheckpointManager(root, async_save=async_save, compression=compression,
                                     capture_rng=capture_rng) as mgr:
        mgr.save(step, state).wait()
    return shardckpt.CheckpointManager(root, async_save=False)


# ------------------------------------------------------------------------------ strategies

@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["contiguous", "scalar", "empty", "transposed", "strided",
                                 "offset", "expanded", "channels_last", "one_strided"]))
    dim = st.integers(1, 5)
    if kind == "scalar":
        return random_bits(rng, dtype, ())
    if kind == "empty":
        return random_bits(rng, dtype, draw(st.sampled_from([(0, 3), (2, 0), (0,), (3, 0, 2)])))
    if kind == "contiguous":
        return random_bits(rng, dtype, tuple(draw(st.lists(dim, min_size=1, max_size=3))))
    if kind == "transposed":
        return random_bits(rng, dtype, (draw(dim) + 1, draw(dim) + 1)).t()
    if kind == "strided":
        base = random_bits(rng, dtype, (draw(dim), 3 * draw(dim)))
        return base[:, ::3] if draw(st.booleans()) else base.reshape(-1)[1::2]
    if kind == "offset":
        return random_bits(rng, dtype, (draw(dim) + 1, draw(dim)))[1:]
    if kind == "one_strided":  # "contiguous", yet its size-1 dims have strides other than 1
        base = random_bits(rng, dtype, (4, 6))
        return draw(st.sampled_from([base.reshape(-1)[3::24], base[1:2, 2::6], base[2:3]]))
    if kind == "expanded":
        return random_bits(rng, dtype, (1, draw(dim))).expand(draw(dim), -1)
    base = random_bits(rng, dtype, (2, draw(dim), 2, draw(dim)))
    return base.permute(0, 3, 1, 2)  # channels-last strides


@st.composite
def tensor_pool(draw: st.DrawFn) -> list[torch.Tensor]:
    """Independent tensors plus views of them (sharing their storage)."""
    pool = draw(st.lists(tensors(), min_size=1, max_size=4))
    for t in list(pool):
        if t.dim() >= 2 and draw(st.booleans()):
            pool.append(t.transpose(0, 1))
        if t.dim() >= 1 and t.shape[0] >= 2 and draw(st.booleans()):
            pool.append(t[1:])
    return pool


CHARS = st.one_of(st.characters(), st.sampled_from(["/", "~", "0", "1", ".", " "]))
KEYS = st.text(CHARS, max_size=6)
ROOT_KEYS = st.text(CHARS, min_size=1, max_size=6)
INT_KEYS = st.integers(-(2**70), 2**70)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(),
    st.integers(-(2**300), 2**300),
    st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**100]),
    st.floats(),
    st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 5e-324, 1.8e308 / 10]),
    st.text(CHARS, max_size=10),
)


@st.composite
def states(draw: st.DrawFn) -> dict[str, Any]:
    pool = draw(tensor_pool())
    tensor_leaf = st.sampled_from(pool)
    leaves = st.one_of(SCALARS, tensor_leaf, tensor_leaf, tensor_leaf)
    tree = st.recursive(leaves, lambda ch: st.one_of(
        st.lists(ch, max_size=4), st.lists(ch, max_size=3).map(tuple),
        st.dictionaries(KEYS, ch, max_size=4), st.dictionaries(INT_KEYS, ch, max_size=3)),
        max_leaves=12)
    state = draw(st.dictionaries(ROOT_KEYS, tree, min_size=1, max_size=5))
    if draw(st.booleans()) or not any(True for _ in tensors_in(state)):
        key = "pool"
        while key in state:
            key += "~"
        state[key] = draw(st.permutations(pool).map(draw(st.sampled_from([list, tuple]))))
    return state


OPTIONS = st.fixed_dictionaries({
    "root": st.sampled_from(["path", "file", "memory"]),
    "compression": st.sampled_from([None, "zstd", "zstd:1", "zstd:-3", "zstd:19"]),
    "chunk_size": st.sampled_from([None, "7", "64", "1K"]),
    "files_per_rank": st.sampled_from([None, "1", "3"]),
    "async_save": st.booleans(),
    "contiguous_dest": st.booleans(),
})


def _env(mp: pytest.MonkeyPatch, name: str, value: str | None) -> None:
    if value is None:
        mp.delenv(name, raising=False)
    else:
        mp.setenv(name, value)


# ------------------------------------------------------------------------------ properties

@SETTINGS
@given(state=states(), opts=OPTIONS)
def test_random_states_round_trip_bit_exact(state: dict[str, Any], opts: dict[str, Any]) -> None:
    original = copy.deepcopy(state)
    leaves = list(tensors_in(state))
    event(f"tensor leaves: {min(len(leaves), 4)}{'+' if len(leaves) >= 4 else ''}")
    event(f"tied: {len({id(t) for t in leaves}) < len(leaves)}")
    with pytest.MonkeyPatch.context() as mp, checkpoint_root(opts["root"]) as root:
        _env(mp, "SHARDCKPT_CHUNK_SIZE", opts["chunk_size"])
        _env(mp, "SHARDCKPT_FILES_PER_RANK", opts["files_per_rank"])
        with save_and_reload(root, state, compression=opts["compression"],
                             async_save=opts["async_save"]) as mgr:
            assert mgr.steps() == [7]
            # 1. into the same structure holding zero tensors: tensors are filled in place
            dest = mirror(state, opts["contiguous_dest"], {})
            dest_tensors = list(tensors_in(dest))
            assert mgr.load(dest) == 7
            assert_same(state, dest)
            assert all(a is b for a, b in zip(tensors_in(dest), dest_tensors, strict=True))
            # 2. into a state that names the top-level keys only: the loader creates the rest
            fresh = fresh_for(state)
            assert mgr.load(fresh, step=7) == 7
            assert_same(state, fresh)
    # saving (and loading elsewhere) never changes the saved state
    assert_same(original, state)


@st.composite
def pieces_and_boxes(draw: st.DrawFn) -> tuple[torch.Tensor, list[tuple[tuple[int, ...],
                                                                            tuple[int, ...]]],
                                              list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """A tensor cut into a grid of pieces, and some boxes to read back."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    t = random_bits(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), dtype, shape)
    cuts = [sorted(set(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=2))) - {n})
            for n in shape]
    pieces = []
    grid = [list(zip([0, *c], [*c, n])) for c, n in zip(cuts, shape)]
    for cell in _product(grid):
        pieces.append((tuple(a for a, _ in cell), tuple(b - a for a, b in cell)))
    boxes = []
    for _ in range(draw(st.integers(1, 4))):
        lo = [draw(st.integers(0, n - 1)) for n in shape]
        ln = [draw(st.integers(1, n - o)) for o, n in zip(lo, shape)]
        boxes.append((tuple(lo), tuple(ln)))
    return t, pieces, boxes


def _product(lists: list[list[Any]]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = [()]
    for options in lists:
        out = [(*prefix, o) for prefix in out for o in options]
    return out


def write_handmade(root: str, step: int, tensors: dict[str, tuple[torch.Tensor, list[Any]]],
                   *, codec: Codec, chunk_size: int, nfiles: int = 3) -> M.Manifest:
    """A checkpoint written piece by piece with the format's ShardWriter, each tensor cut into
    the given boxes, the pieces dealt round-robin over ``nfiles`` shard files."""
    location = open_location(root)
    step_dir = step_dirname(step)
    location.makedirs(step_dir)
    save_id = uuid.uuid4().hex
    sinks = [location.open_sink(f"{step_dir}/part{i}.shard") for i in range(nfiles)]
    writers = [ShardWriter(sink, f"part{i}.shard", save_id=save_id, step=step, rank=0,
                           chunk_size=chunk_size, codec=codec) for i, sink in enumerate(sinks)]
    written: dict[str, list[Piece]] = {}
    n = 0
    for key, (t, boxes) in tensors.items():
        for offsets, lengths in boxes:
            region = t[tuple(slice(o, o + k) for o, k in zip(offsets, lengths))]
            data = raw_bytes(region)
            piece = writers[n % nfiles].add(key, dtype_name(t.dtype), offsets, lengths,
                                            memoryview(data))
            written.setdefault(key, []).append(piece)
            n += 1
    files = {}
    for writer, sink in zip(writers, sinks):
        record = writer.finish()
        sink.commit()
        files[record.name] = record
    entries = {key: M.TensorEntry(meta=M.TensorMeta(dtype_name(t.dtype), tuple(t.shape),
                                                    tuple(written.get(key, ()))))
               for key, (t, _) in tensors.items()}
    manifest = M.Manifest(step=step, save_id=save_id, time="2024-01-01T00:00:00+00:00",
                          unix_time=1.0, world_size=1, files=files, tensors=entries,
                          tree=["d", {k: ["T", k] for k in tensors}])
    data = M.serialize(manifest)
    location.write_atomic(f"{step_dir}/{M.MANIFEST_NAME}", data)
    return full_manifest(CheckpointReader(location, step_dir, M.parse(data)))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(case=pieces_and_boxes(), compression=st.sampled_from([None, "zstd"]),
       chunk_size=st.sampled_from([1, 5, 64]), contiguous=st.booleans())
def test_reader_reassembles_any_box_from_pieces(case: Any, compression: str | None,
                                                chunk_size: int, contiguous: bool) -> None:
    t, pieces, boxes = case
    with checkpoint_root("memory") as root:
        manifest = write_handmade(root, 3, {"x": (t, pieces)}, codec=Codec(compression),
                                  chunk_size=chunk_size)
        meta = manifest.resolve("x")
        assert meta is not None and len(meta.pieces) == len(pieces)
        reader = CheckpointReader(open_location(root), step_dirname(3), manifest)
        for offsets, lengths in [((0,) * t.dim(), tuple(t.shape)), *boxes]:
            out = zeros(t.dtype, lengths, contiguous)
            reader.read_box(meta, offsets, lengths, out)
            want = t[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
            assert raw_bytes(out) == raw_bytes(want), (offsets, lengths)
        # the manager loads the same multi-piece tensor whole, as a new tensor and into one
        with shardckpt.CheckpointManager(root) as mgr:
            fresh: dict[str, Any] = {"x": None}
            mgr.load(fresh)
            assert raw_bytes(fresh["x"]) == raw_bytes(t)
            given_t = {"x": zeros(t.dtype, tuple(t.shape), contiguous)}
            mgr.load(given_t)
            assert raw_bytes(given_t["x"]) == raw_bytes(t)


# ------------------------------------------------------------------------------ every dtype

@pytest.mark.parametrize("compression", [None, "zstd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES])
def test_every_dtype_and_layout(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                compression: str | None) -> None:
    monkeypatch.setenv("SHARDCKPT_CHUNK_SIZE", "7")
    rng = np.random.default_rng(1234)
    base = random_bits(rng, dtype, (6, 10))
    state = {
        "contiguous": base,
        "scalar": random_bits(rng, dtype, ()),
        "empty": random_bits(rng, dtype, (0, 3)),
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "row_view": base[2],
        "one_strided": base.reshape(-1)[7::100],  # shape (1,), stride 100: "contiguous"
        "expanded": random_bits(rng, dtype, (1, 4)).expand(3, 4),
        "big": random_bits(rng, dtype, (33, 17)),
        "zeros_compressible": torch.zeros(64, 64, dtype=torch.uint8).view(dtype),
    }
    with save_and_reload(str(tmp_path), state, compression=compression) as mgr:
        for contiguous in (True, False):
            dest = mirror(state, contiguous, {})
            mgr.load(dest)
            assert_same(state, dest)
        fresh = fresh_for(state)
        mgr.load(fresh)
        assert_same(state, fresh)
        manifest = mgr.manifest(7, pieces=True)
        assert manifest.resolve("big") is not None
        chunks = manifest.resolve("big").pieces[0].chunks  # type: ignore[union-attr]
        assert len(chunks) == math.ceil(33 * 17 * element_size(dtype) / 7)
        # 7 bytes never shrink under zstd (a frame alone is longer): every chunk is stored raw
        zchunks = manifest.resolve("zeros_compressible").pieces[0].chunks  # type: ignore
        assert {c.codec for c in zchunks} == {"raw"}


def test_special_float_values_survive_exactly(tmp_path: Any) -> None:
    specials = [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, -5e-324, 1.0 / 3]
    f64 = torch.tensor(specials, dtype=torch.float64)
    # NaNs with sign and payloads that arithmetic would lose
    payload_nans = torch.tensor([0x7FF0000000000001, 0xFFF8000000000000 - 2**64,
                                 0x7FF7FFFFFFFFFFFF, -1], dtype=torch.int64).view(torch.float64)
    state = {"t": f64, "nans": payload_nans, "py": list(specials), "half": f64.to(torch.float16)}
    with save_and_reload(str(tmp_path), state, compression="zstd") as mgr:
        fresh = fresh_for(state)
        mgr.load(fresh)
    assert_same(state, fresh)
    assert raw_bytes(fresh["nans"]) == raw_bytes(payload_nans)
    assert [x.hex() for x in fresh["py"][:2]] == ["0x0.0p+0", "-0x0.0p+0"]


def test_load_restores_only_the_callers_top_level_keys(tmp_path: Any) -> None:
    state = {"model": {"w": torch.randn(3)}, "optim": {"lr": 0.5}, "step": 9}
    with save_and_reload(str(tmp_path), state) as mgr:
        nothing: dict[str, Any] = {}
        assert mgr.load(nothing) == 7 and nothing == {}
        part: dict[str, Any] = {"model": None}
        mgr.load(part)
        assert list(part) == ["model"] and torch.equal(part["model"]["w"], state["model"]["w"])
        with pytest.raises(KeyError, match="absent"):
            mgr.load({"model": None, "absent": 1})


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_url_roots_round_trip(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDCKPT_CHUNK_SIZE", "64")
    rng = np.random.default_rng(5)
    state = {"model": {"w": random_bits(rng, torch.bfloat16, (8, 9)).t(),
                       "b": random_bits(rng, torch.float8_e5m2, (11,))},
             "meta": {"name": "r~u/n", 3: (1, 2.5, None)}, "step": 2**80,
             "zeros": torch.zeros(100)}
    with checkpoint_root(kind) as root:
        with save_and_reload(root, state, compression="zstd:5", async_save=True,
                             capture_rng=True) as mgr:
            assert mgr.steps() == [7]
            assert mgr.info(7).nbytes > 0
            zeros_meta = mgr.manifest(7, pieces=True).resolve("zeros")
            assert zeros_meta is not None
            assert "zstd" in {c.codec for c in zeros_meta.pieces[0].chunks}
            dest = mirror(state, False, {})
            mgr.load(dest)
            assert_same(state, dest)
            fresh = fresh_for(state)
            mgr.load(fresh)
            assert_same(state, fresh)
        if kind == "memory":
            fs = fsspec.filesystem("memory")
            names = fs.ls(root.removeprefix("memory://") + "/" + step_dirname(7), detail=False)
        else:
            names = os.listdir(os.path.join(root.removeprefix("file://"), step_dirname(7)))
        base = sorted(n.rsplit("/", 1)[-1] for n in names)
        assert "manifest.json" in base and any(n.endswith(".shard") for n in base)


def test_load_into_parameters_in_a_plain_dict(tmp_path: Any) -> None:
    """Parameters (requires_grad leaves) in a plain dict are filled in place, any layout."""
    src = {"p": torch.randn(4, 6), "q": torch.randn(5), "h": torch.randn(3, 3)}
    dest = {"p": torch.nn.Parameter(torch.zeros(6, 4)).t(),  # a non-contiguous view
            "q": torch.nn.Parameter(torch.zeros(5)),
            "h": torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))}
    with save_and_reload(str(tmp_path), src) as mgr:
        mgr.load(dest, strict=False)  # "h" is converted float32 -> float64
    assert torch.equal(dest["p"], src["p"])
    assert torch.equal(dest["q"], src["q"]) and dest["q"].requires_grad
    assert torch.equal(dest["h"], src["h"].double())


def test_strict_dtype_mismatch_is_refused_and_lenient_converts(tmp_path: Any) -> None:
    src = {"w": torch.randn(3, 4)}
    with save_and_reload(str(tmp_path), src) as mgr:
        with pytest.raises(ValueError, match="w"):
            mgr.load({"w": torch.zeros(3, 4, dtype=torch.bfloat16)})
        with pytest.raises(ValueError, match=r"\[3, 4\]"):
            mgr.load({"w": torch.zeros(4, 3)})
        dest = {"w": torch.zeros(3, 4, dtype=torch.bfloat16)}
        mgr.load(dest, strict=False)
    assert torch.equal(dest["w"], src["w"].to(torch.bfloat16))


# ------------------------------------------------------------------------------ ties

def test_tied_tensors_are_stored_once(tmp_path: Any) -> None:
    w = torch.randn(4, 5)
    state = {"enc": {"w": w}, "dec": {"w": w}, "also": [w, w.detach()], "t": w.t()}
    with save_and_reload(str(tmp_path), state) as mgr:
        manifest = mgr.manifest(7, pieces=True)
        entries = manifest.tensors
        assert entries["enc/w"].meta is not None
        assert entries["dec/w"].alias_of == "enc/w"
        assert entries["also/0"].alias_of == "enc/w"
        assert entries["also/1"].alias_of == "enc/w"
        assert entries["t"].alias_of is None  # another view, stored as itself
        stored = [p for k, e in entries.items() if e.meta and not k.startswith("__shardckpt")
                  for p in e.meta.pieces]
        assert len(stored) == 2
        shared = torch.zeros(4, 5)
        dest = {"enc": {"w": shared}, "dec": {"w": shared}, "also": [shared, shared],
                "t": torch.zeros(5, 4)}
        mgr.load(dest)
    assert_same(state, dest)
    assert dest["dec"]["w"] is shared and dest["also"][1] is shared


def test_tied_tensors_load_tied_into_a_fresh_dict(tmp_path: Any) -> None:
    w = torch.randn(4, 5)
    with save_and_reload(str(tmp_path), {"a": w, "b": {"c": w}}) as mgr:
        fresh: dict[str, Any] = {"a": None, "b": None}
        mgr.load(fresh)
    assert torch.equal(fresh["a"], w)
    assert fresh["b"]["c"] is fresh["a"]


class TiedLM(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(11, 6)
        self.mid = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight


def test_module_with_tied_weights_round_trips(tmp_path: Any) -> None:
    src = TiedLM(0)
    opt = torch.optim.AdamW(src.parameters(), lr=0.1)
    src.head(src.mid(src.emb(torch.arange(4)))).sum().backward()
    opt.step()
    with save_and_reload(str(tmp_path), {"model": src, "optim": opt, "step": 1}) as mgr:
        dst = TiedLM(1)
        dst_opt = torch.optim.AdamW(dst.parameters(), lr=0.5)
        assert not torch.equal(dst.emb.weight, src.emb.weight)
        state = {"model": dst, "optim": dst_opt, "step": 0}
        mgr.load(state)
    assert state["step"] == 1
    assert dst.head.weight is dst.emb.weight
    for (name, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert raw_bytes(a) == raw_bytes(b), name
    assert dst_opt.param_groups[0]["lr"] == 0.1
    sa, sb = opt.state_dict()["state"], dst_opt.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert raw_bytes(sa[k][field]) == raw_bytes(sb[k][field])


# ------------------------------------------------------------------------------ refusals

UNSUPPORTED = {
    "set": ({"a": {"b": [0, 1, 2, {1, 2}]}}, "a/b/3"),
    "object": ({"a": {"b": [0, 1, 2, object()]}}, "a/b/3"),
    "numpy": ({"a": {"b": [0, 1, 2, np.zeros(3)]}}, "a/b/3"),
    "lambda": ({"a": {"b": [0, 1, 2, lambda: 0]}}, "a/b/3"),
    "tuple_key": ({"a": {"b": {(1, 2): 0}}}, "a/b"),
    "numpy_float": ({"a": {"b": [0, 1, 2, np.float64(1.0)]}}, "a/b/3"),
    "bytes": ({"a": {"b": [0, 1, 2, b"x"]}}, "a/b/3"),
    "sparse": ({"a": {"b": [0, 1, 2, torch.eye(3).to_sparse()]}}, "a/b/3"),
    "bits_dtype": ({"a": {"b": [0, 1, 2, torch.zeros(2, dtype=torch.uint8)
                                .view(torch.bits8)]}}, "a/b/3"),
    # torch has no copy kernels for float4 in many layouts, so it is refused outright
    "float4_dtype": ({"a": {"b": [0, 1, 2, torch.zeros(2, dtype=torch.uint8)
                                  .view(torch.float4_e2m1fn_x2)]}}, "a/b/3"),
}


def assert_save_refused(root: str, state: dict[str, Any], path: str) -> BaseException:
    """``save`` fails naming ``path`` (possibly wrapped by the collective protocol), commits
    nothing and leaves no files behind."""
    with shardckpt.CheckpointManager(root, async_save=True) as mgr:
        with pytest.raises((TypeError, ValueError, shardckpt.ShardckptError)) as info:
            mgr.save(1, state).wait()
        assert f"{path}:" in str(info.value)
        assert mgr.steps() == []
    leftovers = [os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs]
    assert leftovers == []
    return info.value


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_values_raise_type_error_naming_the_path(tmp_path: Any, case: str) -> None:
    state, path = UNSUPPORTED[case]
    with pytest.raises(TypeError, match=re.escape(path) + ":"):
        collect(state)
    assert_save_refused(str(tmp_path), state, path)


@pytest.mark.parametrize("async_save", [False, True], ids=["blocking", "async"])
def test_unsupported_value_raises_type_error_from_save(tmp_path: Any, async_save: bool) -> None:
    with shardckpt.CheckpointManager(str(tmp_path), async_save=async_save) as mgr:
        with pytest.raises(TypeError, match="a/b/3"):
            mgr.save(1, {"a": {"b": [0, 1, 2, {1, 2}]}}).wait()


@pytest.mark.parametrize("state, path", [
    ({"x": {1: torch.zeros(2), "1": torch.ones(2)}}, "x/1"),
    ({"": {"a": torch.zeros(2)}, "a": torch.ones(2)}, "a"),
    ({"": [torch.zeros(2)], "0": torch.ones(2)}, "0"),
    ({"x": {None: torch.zeros(2), "None": torch.ones(2)}}, "x/None"),
], ids=["int-vs-str", "empty-root-key", "empty-root-list", "none-vs-str"])
def test_tensor_key_collisions_are_refused(tmp_path: Any, state: dict[str, Any],
                                           path: str) -> None:
    """Two tensors whose key paths print alike must not be saved as one (silent data loss)."""
    with pytest.raises(ValueError, match="same tensor key"):
        collect(state)
    err = assert_save_refused(str(tmp_path), state, path)
    assert "same tensor key" in str(err)


def test_equal_looking_keys_without_tensors_are_fine(tmp_path: Any) -> None:
    state = {"x": {1: "int", "1": "str", None: 0.5, "None": [1]}, "": {"a": 1}, "a": 2}
    with save_and_reload(str(tmp_path), state) as mgr:
        fresh = fresh_for(state)
        mgr.load(fresh)
    assert_same(state, fresh)


@pytest.mark.parametrize("value, what", [
    (10**5000, "digits"),
    ("caf\udce9", "UTF-8"),
    ({"k\ud800": 1}, "UTF-8"),
], ids=["int-too-long-for-json", "lone-surrogate", "lone-surrogate-key"])
def test_unstorable_scalars_raise_value_error_naming_the_path(tmp_path: Any, value: Any,
                                                              what: str) -> None:
    with pytest.raises(ValueError, match=what):
        collect({"cfg": [0, value]})
    err = assert_save_refused(str(tmp_path), {"cfg": [0, value]}, "cfg/1")
    assert what in str(err)
