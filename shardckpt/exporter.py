"""Consolidated, unsharded copies of a committed step, outside shardckpt's own format.

``consolidated_state_dict`` returns plain CPU tensors in one process; ``export`` writes them as one
safetensors or ``torch.save`` file, as a Hugging Face model folder (sharded safetensors and an
index) or as a DCP checkpoint. Every tensor is read through the checksummed reader, failing over
to the replicas. Names are the state's flattened tensor keys (``model/layers.0.weight``); with
``only`` the keys under that prefix, prefix stripped (``layers.0.weight``). shardckpt's own
bookkeeping under the reserved ``__shardckpt*`` keys (RNG states, golden batches) is left out.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .catalog import find_manifest, latest_manifest_step
from .consolidate import read_full, tensor_keys
from .engine.index import full_manifest
from .engine.reader import CheckpointReader
from .errors import IncompleteCheckpointError
from .format import manifest as M
from .golden import RESERVED_PREFIX
from .interop import ConversionError
from .storage import Location, open_location, step_dirname
from .storage.probe import reachable_all

FORMATS = ("safetensors", "torch", "hf", "dcp")
FILE_FORMATS = ("safetensors", "torch")


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: ``files`` are paths (for folders, relative to ``out``)."""

    step: int
    format: str
    out: str
    tensors: int
    nbytes: int
    files: tuple[str, ...]


@dataclass(frozen=True)
class Entry:
    """One exported tensor: its exported name and where its bytes are (an alias: its target's)."""

    name: str
    meta: M.TensorMeta
    alias_of: str | None = None  # exported name of the tensor it shares storage with

    @property
    def nbytes(self) -> int:
        return self.meta.nbytes


def latest_step(locations: Sequence[Location]) -> int:
    """The step a read command uses without ``--step``: the newest step directory that holds a
    manifest file at any reachable location, valid or not (reading a corrupt one then raises
    ``CorruptCheckpointError``, so a broken newest checkpoint is never skipped silently).
    ``IncompleteCheckpointError`` when no step directory holds one."""
    return latest_manifest_step(locations, locations[0].display)


class StepSource:
    """A committed step opened for reading whole tensors, one at a time."""

    def __init__(self, locations: Sequence[Location], step: int | None = None,
                 on_read: Callable[[int], None] | None = None) -> None:
        self.step = latest_step(locations) if step is None else step
        manifest, _ = find_manifest(locations, self.step)
        self.reader = CheckpointReader(list(locations), step_dirname(self.step), manifest)
        self.manifest = full_manifest(self.reader)
        self.on_read = on_read

    def entries(self, only: str | None) -> list[Entry]:
        """The tensors to export, in manifest order (per-rank tensors as ``KEY@rankN``)."""
        want = None if not only else only.rstrip("/") + "/"
        out: list[Entry] = []
        for key, meta, target in tensor_keys(self.manifest):
            if key.startswith(RESERVED_PREFIX) and not (want and key.startswith(want)):
                continue
            if want is not None and not key.startswith(want):
                continue
            name = key if want is None else key[len(want):]
            if meta is not None:
                out.append(Entry(name, meta))
                continue
            assert target is not None
            meta = self.manifest.resolve(key)
            if meta is None:  # pragma: no cover - validated manifests resolve every alias
                raise IncompleteCheckpointError(f"tensor {key!r}: alias of nothing")
            inside = want is None or target.startswith(want)
            alias = (target if want is None else target[len(want):]) if inside else None
            out.append(Entry(name, meta, alias))
        return out

    def read(self, meta: M.TensorMeta) -> torch.Tensor:
        """One whole tensor as a new CPU tensor, every chunk verified."""
        tensor = read_full(self.reader, meta)
        if self.on_read is not None:
            self.on_read(meta.nbytes)
        return tensor

    def require(self, entries: list[Entry], only: str | None) -> list[Entry]:
        if not entries:
            raise ConversionError(f"step {self.step} has no tensors" +
                                  (f" under {only!r}" if only else ""))
        return entries


def open_locations(root: str, replicas: Iterable[str] = (),
                   storage_options: Mapping[str, Mapping[str, Any]] | None = None
                   ) -> list[Location]:
    """The locations of ``root`` and ``replicas`` (fsspec options by longest URL prefix),
    unreachable ones standing in as :class:`~shardckpt.storage.probe.Unreachable`."""
    urls = [str(root), *(str(r) for r in replicas)]
    locs = []
    for url in urls:
        best, opts = -1, {}
        for prefix, kwargs in (storage_options or {}).items():
            if url.startswith(prefix) and len(prefix) > best:
                best, opts = len(prefix), dict(kwargs)
        locs.append(open_location(url, opts))
    return reachable_all(locs)  # a dead replica: skipped after a probe of seconds


def tensors_of(source: StepSource, entries: list[Entry]) -> dict[str, torch.Tensor]:
    """Every entry in full; an alias is the same tensor object as its target."""
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        if e.alias_of is None:
            out[e.name] = source.read(e.meta)
    for e in entries:
        if e.alias_of is not None:
            out[e.name] = out[e.alias_of] if e.alias_of in out else source.read(e.meta)
    return {e.name: out[e.name] for e in entries}


def consolidated_state_dict(root: str, step: int | None = None, only: str | None = None, *,
                            replicas: Iterable[str] = (),
                            storage_options: Mapping[str, Mapping[str, Any]] | None = None
                            ) -> dict[str, torch.Tensor]:
    """Every tensor of ``step`` (default: the latest, see :func:`latest_step`) as a plain CPU
    tensor, keyed by its flattened name; with ``only``, the tensors under that key prefix, prefix
    stripped. Tied weights come back as one tensor under both names. Runs in one process."""
    source = StepSource(open_locations(root, replicas, storage_options), step)
    return tensors_of(source, source.entries(only))


def export(root: str, step: int | None = None, format: str = "safetensors",
           out: str | os.PathLike[str] | None = None, only: str | None = None, *,
           replicas: Iterable[str] = (),
           storage_options: Mapping[str, Mapping[str, Any]] | None = None,
           **options: Any) -> ExportResult:
    """Write ``step`` (default: the latest) of the checkpoints under ``root`` to ``out``, as the
    CLI's ``export`` does. ``format``: ``safetensors`` or ``torch`` (one file), ``hf`` (a model
    folder; options ``max_shard_size="5GB"``, ``dtype="bf16"|"fp16"|"fp32"``, ``config=PATH``)
    or ``dcp`` (a DCP checkpoint folder). ``ConversionError`` (a ``ValueError``) for options or
    outputs that cannot work; checkpoint errors as for ``load``."""
    locations = open_locations(root, replicas, storage_options)
    return export_step(locations, step, format, out, only, options)


def export_step(locations: Sequence[Location], step: int | None, format: str,
                out: str | os.PathLike[str] | None, only: str | None,
                options: Mapping[str, Any], on_read: Callable[[int], None] | None = None,
                on_plan: Callable[[int, int], None] | None = None) -> ExportResult:
    """:func:`export` on opened locations. ``on_plan(step, nbytes)`` is told what will be read
    before the first read; ``on_read(nbytes)`` after each tensor."""
    if format not in FORMATS:
        raise ConversionError(f"unknown export format {format!r} (one of {', '.join(FORMATS)})")
    if out is None:
        raise ConversionError("export needs out=PATH")
    out = os.fspath(out)
    allowed = {"max_shard_size", "dtype", "config"} if format == "hf" else set()
    extra = sorted(set(options) - allowed)
    if extra:
        raise ConversionError(f"format {format!r} takes no option {', '.join(extra)}")
    if format in FILE_FORMATS:
        check_out_file(out)
    prepared: Any = None
    if format == "hf":
        from .interop import hf

        prepared = hf.prepare(out, **options)  # options and output checked before any read
    elif format == "dcp":
        from .interop import dcp

        dcp.check_out_dir(out)
    source = StepSource(locations, step, on_read)
    if format == "dcp":
        from .interop import dcp

        return dcp.export_dcp(source, out, only, on_plan)
    entries = source.require(source.entries(only), only)
    if on_plan is not None:
        on_plan(source.step, sum(e.nbytes for e in entries))
    if format == "hf":
        from .interop import hf

        return hf.export_hf(source, entries, prepared)
    if format == "safetensors":
        from .interop import safetensors_io as st

        specs = [st.TensorSpec(e.name, e.meta.dtype, e.meta.shape, e.nbytes) for e in entries]
        by_name = {e.name: e for e in entries}
        written = st.write_file(out, specs, lambda s: source.read(by_name[s.name].meta),
                                {"format": "pt", "shardckpt_step": str(source.step)})
        return ExportResult(source.step, format, out, len(entries), written, (out,))
    tensors = tensors_of(source, entries)
    torch.save(tensors, out)  # plain tensors for users' tools; shardckpt never reads these
    return ExportResult(source.step, format, out, len(tensors),
                        sum(e.nbytes for e in entries), (out,))


def check_out_file(path: str) -> None:
    """``ConversionError`` unless ``path``'s directory exists and ``path`` is not a directory."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConversionError(f"{path}: is a directory")
    if not os.path.isdir(parent):
        raise ConversionError(f"{path}: directory {parent} does not exist")
