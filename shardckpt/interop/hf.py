"""Export a step as a Hugging Face model folder, for ``from_pretrained``.

The folder holds ``model.safetensors``, or, when the tensors exceed ``max_shard_size``,
``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json`` (``metadata.total_size``
and ``weight_map``), plus a copy of the model's ``config.json`` when one is given. Every file
carries ``{"format": "pt"}`` metadata, as ``transformers`` expects, and ``shardckpt_step``.

Shards are planned from the manifest (every shape and dtype is known before a byte is read) and
written one tensor at a time: the export holds one tensor (and its cast) in memory, never a
shard, never the model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..atomicfile import TMP_MARK, atomic_open, write_atomic
from ..format.dtypes import itemsize
from . import ConversionError, existing_names
from . import safetensors_io as st

if TYPE_CHECKING:
    from .source import Entry, ExportResult, StepSource

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
CONFIG_FILES = ("config.json", "generation_config.json")  # copied from a --config folder
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_MAX_SHARD = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class Options:
    """Checked options of one export: where, how large a shard, which dtype, which config."""

    out: str
    max_shard_size: int
    dtype: torch.dtype | None
    config: tuple[str, ...]  # config files to copy into ``out``


def parse_size(value: int | str) -> int:
    """Bytes of ``5GB`` (10^9), ``2GiB`` (2^30), ``500MB``, ``100KB`` or a plain integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise ConversionError(f"max shard size {value!r}: expected bytes or a size such as "
                                  "'5GB', '500MB', '2GiB'")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ConversionError(f"max shard size {value!r} must be positive")
    return n


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or (isinstance(value, torch.dtype) and value in DTYPES.values()):
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ConversionError(f"dtype {value!r}: expected one of {', '.join(DTYPES)}")


def config_files(path: str | os.PathLike[str] | None) -> tuple[str, ...]:
    """The files to copy for ``config``: a ``config.json`` file (any name), or a folder holding
    one (and then its ``generation_config.json`` too, if present). Each must be a JSON object."""
    if path is None:
        return ()
    path = os.fspath(path)
    if os.path.isdir(path):
        files = tuple(os.path.join(path, n) for n in CONFIG_FILES
                      if os.path.isfile(os.path.join(path, n)))
        if not files or os.path.basename(files[0]) != CONFIG_FILES[0]:
            raise ConversionError(f"config {path}: folder holds no config.json")
    elif os.path.isfile(path):
        files = (path,)
    else:
        raise ConversionError(f"config {path}: no such file or folder")
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                doc = json.load(fh)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConversionError(f"config {f}: not a readable JSON file: {exc}") from None
        if not isinstance(doc, dict):
            raise ConversionError(f"config {f}: not a JSON object")
    return files


def ours(name: str) -> bool:
    """A file name an export writes (and may therefore replace)."""
    return name in (SINGLE, INDEX) or SHARD.fullmatch(name) is not None


def check_out_dir(out: str) -> None:
    """``out`` may receive an export: it is new (its parent exists), empty, or a previous export
    (it holds safetensors files written by shardckpt, and every model file in it is one)."""
    names = existing_names(out)
    if names is None:
        return
    if not names:
        return
    weights = [n for n in names if n.endswith(".safetensors") and ours(n)]
    foreign = [n for n in weights
               if "shardckpt_step" not in (st.read_metadata(os.path.join(out, n)) or {})]
    if not weights or foreign:
        raise ConversionError(
            f"{out}: folder is not empty and is not a previous shardckpt export"
            + (f" ({foreign[0]} was not written by shardckpt)" if foreign else "")
            + "; refusing to write into it: give an empty or new folder")


def prepare(out: str, max_shard_size: int | str = DEFAULT_MAX_SHARD,
            dtype: str | torch.dtype | None = None,
            config: str | os.PathLike[str] | None = None) -> Options:
    """Check every option and the output folder before anything is read or written."""
    opts = Options(out, parse_size(max_shard_size), parse_dtype(dtype), config_files(config))
    check_out_dir(out)
    return opts


def _out_dtype(stored: str, target: torch.dtype | None) -> str:
    """The stored dtype name a tensor is exported as: cast only when floating."""
    if target is None or not getattr(torch, stored).is_floating_point:
        return stored
    return str(target).removeprefix("torch.")


def plan_shards(specs: list[st.TensorSpec], limit: int) -> list[list[st.TensorSpec]]:
    """Tensors in order, a new shard whenever the next one would take the current past
    ``limit`` (a tensor larger than ``limit`` gets a shard of its own)."""
    shards: list[list[st.TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def export_hf(source: StepSource, entries: list[Entry], opts: Options) -> ExportResult:
    """Write ``entries`` of ``source`` into ``opts.out`` (see the module docstring)."""
    from .source import ExportResult

    by_name = {e.name: e for e in entries}
    specs = []
    for e in entries:
        dtype = _out_dtype(e.meta.dtype, opts.dtype)
        n = 1
        for d in e.meta.shape:
            n *= d
        specs.append(st.TensorSpec(e.name, dtype, e.meta.shape, n * itemsize(dtype)))
        st.code_of(dtype, e.name)  # an unsupported dtype fails before anything is written
    shards = plan_shards(specs, opts.max_shard_size)
    names = [SINGLE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    os.makedirs(opts.out, exist_ok=True)
    # The entry points of a previous export go first: until the new one is complete, the folder
    # holds no loadable model, never a mix of two steps.
    for name in (INDEX, SINGLE):
        _remove(os.path.join(opts.out, name))
    for name in os.listdir(opts.out):
        if name.startswith((".model", ".config", ".generation_config")) and \
                TMP_MARK in name:  # left by an interrupted export
            _remove(os.path.join(opts.out, name))

    def load(spec: st.TensorSpec) -> torch.Tensor:
        tensor = source.read(by_name[spec.name].meta)
        if str(tensor.dtype).removeprefix("torch.") != spec.dtype:
            tensor = tensor.to(getattr(torch, spec.dtype))
        return tensor

    metadata = {"format": "pt", "shardckpt_step": str(source.step)}
    total = 0
    for name, shard in zip(names, shards):
        total += st.write_file(os.path.join(opts.out, name), shard, load, metadata)
    files = list(names)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {s.name: n for n, shard in zip(names, shards) for s in shard}}
        write_atomic(os.path.join(opts.out, INDEX), json.dumps(index, indent=2) + "\n")
        files.append(INDEX)
    for name in os.listdir(opts.out):  # shards of a previous export with another shard count
        if ours(name) and name not in files:
            _remove(os.path.join(opts.out, name))
    for src in opts.config:
        dst = os.path.join(opts.out, CONFIG_FILES[0] if src == opts.config[0] else
                           os.path.basename(src))
        if not (os.path.exists(dst) and os.path.samefile(src, dst)):
            with open(src, "rb") as fin, atomic_open(dst) as fout:  # mode: the umask's
                shutil.copyfileobj(fin, fout)
        files.append(os.path.basename(dst))
    return ExportResult(source.step, "hf", opts.out, len(entries), total, tuple(files))
