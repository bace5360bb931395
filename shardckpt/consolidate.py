"""Full, unsharded tensors out of a committed checkpoint (for export, diff and inspection).

Single process, no torch.distributed: every piece is read and placed into one full tensor per
key. Aliases (tied weights) come back as the same tensor object; per-rank tensors come back once
per rank under ``KEY@rankN``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .engine.reader import CheckpointReader
from .format.dtypes import torch_dtype
from .format.manifest import Manifest, TensorMeta
from .manager import read_manifest
from .storage import Location, step_dirname


def tensor_keys(manifest: Manifest) -> Iterator[tuple[str, TensorMeta | None, str | None]]:
    """(name, meta, alias target) for every tensor; per-rank tensors expanded to ``KEY@rankN``."""
    for key, entry in manifest.tensors.items():
        if entry.alias_of is not None:
            yield key, None, entry.alias_of
        elif entry.per_rank is not None:
            for r, meta in enumerate(entry.per_rank):
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
    manifest = read_manifest(location, step)
    reader = CheckpointReader(location, step_dirname(step), manifest)
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
