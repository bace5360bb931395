"""PyTorch Distributed Checkpoint (DCP) folders in and out, in one process.

DCP keeps its index (``.metadata``) as a Python pickle, and its non-tensor items as
``torch.save`` pickles. Unpickling can run code, and shardckpt never unpickles on its own account:
:func:`import_dcp` refuses unless the caller says it trusts the folder (``trust_pickle=True``,
the CLI's ``--trust-pickle``). Even then everything is read through DCP's public API: the
metadata with ``FileSystemReader.read_metadata``, the data with ``dcp.load``, tensors with
``weights_only=True`` (DCP's own choice) and non-tensor items with ``weights_only=True`` too
(our load planner), so those can only be tensors and plain Python values.

Nested state is rebuilt from the key paths DCP records (``planner_data``): a DCP checkpoint of
``{"model": ..., "optim": {"state": ..., "param_groups": [...]}}`` imports as that same tree.
Both directions hold the whole state in memory, as DCP's own single-process converters do.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import ConversionError, existing_names

if TYPE_CHECKING:
    from .source import ExportResult, StepSource

METADATA = ".metadata"
MARKER = ".shardckpt-export.json"  # marks a folder written by export_dcp (may be replaced)
DATA_FILE = re.compile(r"__\d+_\d+\.distcp")

PICKLE_REFUSAL = (
    "{path}: a DCP checkpoint's index (.metadata) and its non-tensor items are Python pickles, "
    "and unpickling a file can run arbitrary code, so shardckpt does not read them unless told "
    "to. If you trust where this checkpoint came from, pass --trust-pickle (Python: "
    "trust_pickle=True); tensors and non-tensor items are then loaded with weights_only=True")


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_dcp` stored: the step, the tensors and the other values it holds."""

    step: int
    root: str
    source: str
    tensors: int
    values: int
    nbytes: int


def _first_failure(exc: BaseException) -> BaseException:
    """The original error inside DCP's ``CheckpointException`` (a ``BaseException``)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
            return inner[0]
    return exc


def _run_dcp(fn: Callable[[], Any]) -> Any:
    """``fn()``, a DCP call in this one process, with DCP's errors unwrapped."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # "assuming the intent is to ... in a single process"
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return fn()
    except CheckpointException as exc:
        inner = _first_failure(exc)
        if inner is exc or not isinstance(inner, Exception):
            raise ConversionError(f"DCP failed: {' '.join(str(exc).split())}") from None
        raise inner from None


# ------------------------------------------------------------------------------------- import

def _load_planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        """DCP's planner, except that non-tensor items load with ``weights_only=True``."""

        def __init__(self) -> None:
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.objects: dict[str, Any] = {}

        def load_bytes(self, read_item: Any, value: Any) -> None:
            fqn = read_item.dest_index.fqn
            try:
                self.objects[fqn] = torch.load(value, weights_only=True, map_location="cpu")
            except Exception as exc:
                why = " ".join(str(exc).split())[:300]
                raise ConversionError(
                    f"DCP item {fqn!r} cannot be loaded with weights_only=True (it holds an "
                    f"object other than tensors and plain values): {why}") from None

    return WeightsOnlyPlanner()


def read_dcp(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> dict[str, Any]:
    """Every item of the DCP folder ``path`` as the nested state it was saved from, tensors as
    plain CPU tensors whatever their sharding was. Its metadata is unpickled, so this too is
    refused unless ``trust_pickle`` is true."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    path = os.fspath(path)
    if not trust_pickle:
        raise ConversionError(PICKLE_REFUSAL.format(path=path))
    if not os.path.isfile(os.path.join(path, METADATA)):
        raise ConversionError(f"{path}: no {METADATA} file: not a DCP checkpoint folder")
    metadata = dcp.FileSystemReader(path).read_metadata()
    flat: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            flat[fqn] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        elif isinstance(md, BytesStorageMetadata):
            flat[fqn] = None  # filled by the planner
        else:
            raise ConversionError(f"{path}: item {fqn!r} has unknown storage "
                                  f"{type(md).__name__}")
    planner = _load_planner()
    _run_dcp(lambda: dcp.load(flat, storage_reader=dcp.FileSystemReader(path),
                              planner=planner, no_dist=True))
    flat.update(planner.objects)
    mappings = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    return unflatten(flat, mappings, path)


class _Node(dict):  # type: ignore[type-arg]
    """A container rebuilt from key paths (a leaf value may itself be a plain dict)."""


def unflatten(flat: Mapping[str, Any], mappings: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Nest DCP's flat items again along their recorded key paths (str: dict key, int: list
    index); an item without a recorded path stays at the top level under its DCP name."""
    root = _Node()
    for fqn, value in flat.items():
        path = mappings.get(fqn, (fqn,))
        if not isinstance(path, (tuple, list)) or not path or not isinstance(path[0], str) or \
                not all(type(p) in (str, int) for p in path):
            raise ConversionError(f"{where}: item {fqn!r} has a malformed key path {path!r}")
        node = root
        for part in path[:-1]:
            child = node.setdefault(part, _Node())
            if not isinstance(child, _Node):
                raise ConversionError(f"{where}: item {fqn!r}: {part!r} is both a value and a "
                                      "container")
            node = child
        if path[-1] in node:
            raise ConversionError(f"{where}: two items map to the key path {list(path)}")
        node[path[-1]] = value

    def build(value: Any) -> Any:
        if not isinstance(value, _Node):
            return value
        if value and all(type(k) is int for k in value):  # list indices; a gap (an empty
            return [build(value.get(i)) for i in range(max(value) + 1)]  # container) is None
        if any(type(k) is int for k in value):
            raise ConversionError(f"{where}: a container has both list indices and names")
        return {k: build(v) for k, v in value.items()}

    return build(root)


def import_dcp(dcp_dir: str | os.PathLike[str], root: str, step: int, *,
               trust_pickle: bool = False, replicas: Iterable[str] = (),
               storage_options: Mapping[str, Mapping[str, Any]] | None = None,
               file_mode: int | None = None) -> ImportResult:
    """Convert the DCP checkpoint in ``dcp_dir`` into a shardckpt checkpoint of ``root`` at
    ``step``, in this one process (no process group may be initialized). Refused
    (``ConversionError``) unless ``trust_pickle`` is true (see the module docstring), when
    ``step`` is already committed, or when the state holds values shardckpt cannot store."""
    import torch.distributed as dist

    from ..manager import CheckpointManager

    path = os.fspath(dcp_dir)
    if not trust_pickle:
        raise ConversionError(PICKLE_REFUSAL.format(path=path))
    if dist.is_available() and dist.is_initialized():
        raise ConversionError("import_dcp runs in one process: call it outside a process group")
    if type(step) is not int or step < 0:
        raise ConversionError(f"step must be a non-negative int, got {step!r}")
    if not os.path.isfile(os.path.join(path, METADATA)):
        raise ConversionError(f"{path}: no {METADATA} file: not a DCP checkpoint folder")
    with CheckpointManager(root, replicas=replicas, storage_options=storage_options,
                           async_save=False, capture_rng=False, file_mode=file_mode,
                           config={"imported_from_dcp": os.path.abspath(path)}) as mgr:
        if step in mgr.steps():
            raise ConversionError(f"{mgr.location.display}: step {step} is already committed; "
                                  "import into another step or root")
        state = read_dcp(path, trust_pickle=True)
        bad = [k for k in state if str(k).startswith("__shardckpt")]
        if bad:
            raise ConversionError(f"{path}: item {bad[0]!r} uses a key reserved by shardckpt")
        try:
            mgr.save(step, state).wait()
        except (TypeError, ValueError) as exc:
            raise ConversionError(f"{path}: cannot be stored by shardckpt: {exc}") from None
    tensors, values, nbytes = count(state)
    return ImportResult(step, str(root), path, tensors, values, nbytes)


def count(value: Any) -> tuple[int, int, int]:
    """(tensors, other leaf values, tensor bytes) in a nested state."""
    if isinstance(value, torch.Tensor):
        return 1, 0, value.numel() * value.element_size()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        t = v = n = 0
        for item in value:
            a, b, c = count(item)
            t, v, n = t + a, v + b, n + c
        return t, v, n
    return 0, 1, 0


# ------------------------------------------------------------------------------------- export

def check_out_dir(out: str, overwrite: bool = False) -> None:
    """``out`` may receive a DCP export: it is new (its parent exists), empty, or a previous
    DCP export by shardckpt (it holds the marker file and DCP's files only); with
    ``overwrite``, any folder (DCP's own names are replaced, other files left alone)."""
    names = existing_names(out)
    if names is None or overwrite:
        return
    if names and (MARKER not in names or
                  any(n not in (MARKER, METADATA) and not DATA_FILE.fullmatch(n)
                      for n in names)):
        raise ConversionError(f"{out}: folder is not empty and is not a previous shardckpt DCP "
                              "export; refusing to write into it: give an empty or new folder, "
                              "or --force (Python: overwrite=True)")


def _select(source: StepSource, only: str | None) -> tuple[Any, str]:
    """The tree node under ``only`` (modules, optimizers and objects unwrapped) and its path."""
    from ..format.manifest import RESERVED_PREFIX
    from ..planning import tree as T

    node = T.check_node(source.manifest.tree, "<root>")
    if not only:
        if node[0] == "d" and isinstance(node[1], dict):
            node = ["d", {k: v for k, v in node[1].items()
                          if not str(k).startswith(RESERVED_PREFIX)}]
        return node, ""
    path = ""
    for part in only.strip("/").split("/"):
        while node[0] in ("M", "O", "S") and len(node) == 2:
            node = T.check_node(node[1], path)
        child = None
        if node[0] == "d" and isinstance(node[1], dict):
            child = next((c for k, c in node[1].items() if T.escape(k) == part), None)
        elif node[0] == "D" and isinstance(node[1], list):
            child = next((c for k, c in node[1]
                          if T.escape(T.decode_scalar(T.check_node(k, path), path)) == part),
                         None)
        elif node[0] in ("l", "t") and part.isdigit() and int(part) < len(node[1]):
            child = node[1][int(part)]
        if child is None:
            raise ConversionError(f"step {source.step} has nothing under {only!r}")
        path = f"{path}/{part}" if path else part
        node = T.check_node(child, path)
    return node, path


def export_dcp(source: StepSource, out: str, only: str | None,
               on_plan: Callable[[int, int], None] | None = None, *,
               overwrite: bool = False) -> ExportResult:
    """Write the state of ``source`` (under ``only``, prefix stripped) as a DCP checkpoint in
    ``out`` with ``dcp.save`` in this process: ``dcp.load`` into a state of the same shape reads
    it back. Non-tensor values become DCP byte items (pickled by DCP, as DCP always does)."""
    import torch.distributed.checkpoint as dcp

    from ..planning.restore import rebuild
    from .source import ExportResult

    check_out_dir(out, overwrite)
    node, path = _select(source, only)
    manifest = source.manifest
    cache: dict[str, torch.Tensor] = {}
    if on_plan is not None:
        on_plan(source.step, sum(e.nbytes for e in source.entries(only)))

    def tensor(key: str, where: str) -> torch.Tensor:
        entry = manifest.tensors.get(key)
        if entry is None:
            raise ConversionError(f"{where}: tree refers to unknown tensor {key!r}")
        target = entry.alias_of or key
        if target not in cache:
            meta = manifest.resolve(target)
            assert meta is not None
            cache[target] = source.read(meta)
        return cache[target]

    state = rebuild(node, path, tensor, None, manifest.world_size)
    if not isinstance(state, dict) or not state:
        raise ConversionError(f"step {source.step}: {only or 'the state'!r} is not a non-empty "
                              "dict of values; DCP saves dicts")
    os.makedirs(out, exist_ok=True)
    for name in [METADATA, MARKER, *sorted(os.listdir(out))]:  # the index first
        if name in (METADATA, MARKER) or DATA_FILE.fullmatch(name):
            try:
                os.unlink(os.path.join(out, name))
            except FileNotFoundError:
                pass
    writer = dcp.FileSystemWriter(out, single_file_per_rank=True, sync_files=True)
    _run_dcp(lambda: dcp.save(state, storage_writer=writer, no_dist=True))
    with open(os.path.join(out, MARKER), "w", encoding="utf-8") as f:
        json.dump({"format": "dcp", "step": source.step, "only": only}, f)
        f.write("\n")
    tensors, _, nbytes = count(state)
    files = tuple(sorted(n for n in os.listdir(out) if n == METADATA or DATA_FILE.fullmatch(n)))
    return ExportResult(source.step, "dcp", out, tensors, nbytes, files)
