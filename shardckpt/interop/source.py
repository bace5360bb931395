"""A committed step opened for export: its tensors, read whole, one at a time, through the
checksummed reader with failover to the replicas; and what an export reports. Shared by
:mod:`shardckpt.exporter` and the format writers in :mod:`shardckpt.interop`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..catalog import find_manifest, latest_manifest_step
from ..consolidate import read_full, tensor_keys
from ..engine.index import full_manifest
from ..engine.reader import CheckpointReader
from ..errors import IncompleteCheckpointError
from ..format import manifest as M
from ..format.manifest import RESERVED_PREFIX
from ..storage import Location, open_location, step_dirname
from ..storage.location import options_for
from ..storage.probe import reachable_all
from . import ConversionError


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
        locs.append(open_location(url, options_for(url, storage_options)))
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
