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
from typing import Any

import torch

from .audit import record_export
from .interop import ConversionError, refuse_special
from .interop.source import (
    ExportResult,
    StepSource,
    open_locations,
    tensors_of,
)
from .storage import Location

FORMATS = ("safetensors", "torch", "hf", "dcp")
FILE_FORMATS = ("safetensors", "torch")


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
           out: str | os.PathLike[str] | None = None, only: str | None = None,
           overwrite: bool = False, *, replicas: Iterable[str] = (),
           storage_options: Mapping[str, Mapping[str, Any]] | None = None,
           **options: Any) -> ExportResult:
    """Write ``step`` (default: the latest) of the checkpoints under ``root`` to ``out``, as the
    CLI's ``export`` does. ``format``: ``safetensors`` or ``torch`` (one file), ``hf`` (a model
    folder; options ``max_shard_size="5GB"``, ``dtype="bf16"|"fp16"|"fp32"``, ``config=PATH``)
    or ``dcp`` (a DCP checkpoint folder). An export never replaces a file it did not write: an
    existing ``out`` file, or a folder holding files no shardckpt export of that format wrote,
    is refused unless ``overwrite`` (the CLI's ``--force``). ``ConversionError`` (a
    ``ValueError``) for options or outputs that cannot work; checkpoint errors as for
    ``load``."""
    locations = open_locations(root, replicas, storage_options)
    result = export_step(locations, step, format, out, only, options, overwrite=overwrite)
    record_export(locations[0], result)  # issue 32: the audit trail (never raises)
    return result


def export_step(locations: Sequence[Location], step: int | None, format: str,
                out: str | os.PathLike[str] | None, only: str | None,
                options: Mapping[str, Any], on_read: Callable[[int], None] | None = None,
                on_plan: Callable[[int, int], None] | None = None, *,
                overwrite: bool = False) -> ExportResult:
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
        check_out_file(out, overwrite)
    prepared: Any = None
    if format == "hf":
        from .interop import hf

        # options and output checked before any read
        prepared = hf.prepare(out, **options, overwrite=overwrite)
    elif format == "dcp":
        from .interop import dcp

        dcp.check_out_dir(out, overwrite)
    source = StepSource(locations, step, on_read)
    if format == "dcp":
        from .interop import dcp

        return dcp.export_dcp(source, out, only, on_plan, overwrite=overwrite)
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


def check_out_file(path: str, overwrite: bool = False) -> None:
    """``ConversionError`` unless ``path``'s directory exists and ``path`` is not a directory,
    nor, unless ``overwrite``, an existing file (or link)."""
    parent = os.path.dirname(os.path.abspath(path))
    refuse_special(path, directories=True)
    if os.path.isdir(path):
        raise ConversionError(f"{path}: is a directory")
    if not os.path.isdir(parent):
        raise ConversionError(f"{path}: directory {parent} does not exist")
    if not overwrite and os.path.lexists(path):
        raise ConversionError(f"{path}: file exists; an export does not replace it unless told "
                              "to: --force (Python: overwrite=True), or give another --out")
