"""Full, unsharded tensors out of a committed checkpoint (for export, diff and inspection).

Single process, no torch.distributed: every piece is read and placed into one full tensor per
key. Aliases (tied weights) come back as the same tensor object; per-rank tensors come back once
per rank under ``KEY@rankN``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .catalog import find_manifest, read_manifest
from .engine.index import full_manifest
from .engine.reader import CheckpointReader
from .errors import CorruptCheckpointError
from .format.dtypes import torch_dtype
from .format.manifest import Manifest, TensorMeta
from .planning import tree as T
from .planning.restore import rebuild
from .storage import Location, step_dirname


def tensor_keys(manifest: Manifest) -> Iterator[tuple[str, TensorMeta | None, str | None]]:
    """(name, meta, alias target) for every tensor; per-rank tensors expanded to ``KEY@rankN``."""
    for key, entry in manifest.tensors.items():
        if entry.alias_of is not None:
            yield key, None, entry.alias_of
        elif entry.per_rank is not None:
            for r, meta in enumerate(entry.per_rank):
                if meta is not None:  # None: rank r did not hold this key
                    yield f"{key}@rank{r}", meta, None
        else:
            yield key, entry.meta, None


def read_full(reader: CheckpointReader, meta: TensorMeta) -> torch.Tensor:
    out = torch.empty(meta.shape, dtype=torch_dtype(meta.dtype))
    reader.read_box(meta, (0,) * len(meta.shape), meta.shape, out)
    return out


def consolidate(location: Location, step: int, prefix: str | None = None,
                ) -> dict[str, torch.Tensor]:
    """Every tensor of ``step`` in full. With ``prefix``, only keys under it, prefix stripped."""
    reader = CheckpointReader(location, step_dirname(step), read_manifest(location, step))
    manifest = full_manifest(reader)
    out: dict[str, torch.Tensor] = {}
    aliases = {}
    want = None if not prefix else prefix.rstrip("/") + "/"
    for name, meta, target in tensor_keys(manifest):
        if want is not None and not name.startswith(want):
            continue
        if meta is None:
            aliases[name] = target
        else:
            out[name] = read_full(reader, meta)
    for name, target in aliases.items():
        out[name] = out[target] if target in out else read_full(reader, manifest.resolve(name))
    if want is not None:
        out = {k[len(want):]: v for k, v in out.items()}
    return out


def read_value(locations: Sequence[Location], step: int, key: str) -> Any:
    """The value stored under top-level ``key`` of ``step``, rebuilt as plain Python (dicts,
    lists, tuples, scalars) with full CPU tensors. Per-rank parts are not included.

    ``KeyError`` if the checkpoint has no such key.
    """
    manifest, _ = find_manifest(locations, step)
    node = T.check_node(manifest.tree, "<root>")
    if node[0] != "d" or not isinstance(node[1], dict) or key not in node[1]:
        raise KeyError(f"step {step} has no top-level key {key!r}")
    reader = CheckpointReader(locations, step_dirname(step), manifest)
    manifest = full_manifest(reader)

    def on_tensor(tkey: str, where: str) -> torch.Tensor:
        if tkey not in manifest.tensors:
            raise CorruptCheckpointError(f"{where}: tree refers to unknown tensor {tkey!r}")
        meta = manifest.resolve(tkey)
        if meta is None:
            return None
        return read_full(reader, meta)

    return rebuild(node[1][key], T.escape(key), on_tensor, None, manifest.world_size)
