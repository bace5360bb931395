"""Export a step as a Hugging Face model folder, for ``from_pretrained``.

The folder holds ``model.safetensors``, or, when the tensors exceed ``max_shard_size``,
``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json`` (``metadata.total_size``
and ``weight_map``), plus a copy of the model's ``config.json`` when one is given. Every file
carries ``{"format": "pt"}`` metadata, as ``transformers`` expects, ``shardckpt_step``, and
``shardckpt_files``: the other files the export wrote (index, config). An export writes only into
a new or empty folder or one that holds nothing but an earlier export's files (told apart by
that metadata): it never replaces or mixes with a file it did not write (a user's own
``config.json``, a tokenizer) unless ``overwrite`` is given.

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
FILES_KEY = "shardckpt_files"  # weights metadata: the other files the export wrote (JSON list)
_TMP_PREFIXES = (".model", ".config", ".generation_config")  # atomic writes in progress
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

    def config_names(self) -> list[str]:
        """The names the config files get in ``out``."""
        return [CONFIG_FILES[0] if i == 0 else os.path.basename(src)
                for i, src in enumerate(self.config)]


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


def written_by_export(out: str, names: list[str]) -> set[str]:
    """The names in ``out`` that a shardckpt hf export wrote: its weights files (``ours`` names
    carrying ``shardckpt_step`` metadata), the files their ``shardckpt_files`` metadata lists
    (the index, the copied config files) and temporary files an interrupted export left."""
    mine: set[str] = set()
    for n in names:
        if n.startswith(_TMP_PREFIXES) and TMP_MARK in n:
            mine.add(n)
        if not (n.endswith(".safetensors") and ours(n)):
            continue
        meta = st.read_metadata(os.path.join(out, n)) or {}
        if "shardckpt_step" not in meta:
            continue
        mine.add(n)
        try:
            listed = json.loads(meta.get(FILES_KEY, "[]"))
        except ValueError:
            listed = []
        if isinstance(listed, list):
            mine.update(x for x in listed if isinstance(x, str) and x in names)
    return mine


def check_out_dir(out: str, overwrite: bool = False) -> None:
    """``out`` may receive an export: it is new (its parent exists), empty, or holds nothing
    but the files of a previous shardckpt export (see :func:`written_by_export`). With
    ``overwrite``, any folder will do: the export replaces the files of the names it writes
    and leaves the others alone."""
    names = existing_names(out)
    if not names or overwrite:
        return
    foreign = sorted(set(names) - written_by_export(out, names))
    if foreign:
        weights = [n for n in foreign if n.endswith(".safetensors") and ours(n)]
        first = weights[0] if weights else foreign[0]
        raise ConversionError(
            f"{out}: folder holds {first}, which no shardckpt export wrote"
            + (f" (and {len(foreign) - 1} more such file{'s' * (len(foreign) > 2)})"
               if len(foreign) > 1 else "")
            + "; an export never replaces or mixes with files it did not write: give a new or "
            "empty folder (or a previous export's), or --force (Python: overwrite=True) to "
            "write into it anyway")


def prepare(out: str, max_shard_size: int | str = DEFAULT_MAX_SHARD,
            dtype: str | torch.dtype | None = None,
            config: str | os.PathLike[str] | None = None, *,
            overwrite: bool = False) -> Options:
    """Check every option and the output folder before anything is read or written."""
    opts = Options(out, parse_size(max_shard_size), parse_dtype(dtype), config_files(config))
    check_out_dir(out, overwrite)
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
    # files an earlier export wrote (a config.json) and this one leaves: still ours afterwards
    here = os.listdir(opts.out)
    kept = sorted(n for n in written_by_export(opts.out, here)
                  if not ours(n) and TMP_MARK not in n and n not in opts.config_names())
    # The entry points of a previous export go first: until the new one is complete, the folder
    # holds no loadable model, never a mix of two steps.
    for name in (INDEX, SINGLE):
        _remove(os.path.join(opts.out, name))
    for name in os.listdir(opts.out):
        if name.startswith(_TMP_PREFIXES) and TMP_MARK in name:  # left by an interrupted export
            _remove(os.path.join(opts.out, name))

    def load(spec: st.TensorSpec) -> torch.Tensor:
        tensor = source.read(by_name[spec.name].meta)
        if str(tensor.dtype).removeprefix("torch.") != spec.dtype:
            tensor = tensor.to(getattr(torch, spec.dtype))
        return tensor

    others = ([INDEX] if len(shards) > 1 else []) + opts.config_names() + kept
    metadata = {"format": "pt", "shardckpt_step": str(source.step),
                FILES_KEY: json.dumps(others)}  # what the next export may replace
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
    for src, name in zip(opts.config, opts.config_names()):
        dst = os.path.join(opts.out, name)
        if not (os.path.exists(dst) and os.path.samefile(src, dst)):
            with open(src, "rb") as fin, atomic_open(dst) as fout:  # mode: the umask's
                shutil.copyfileobj(fin, fout)
        files.append(os.path.basename(dst))
    return ExportResult(source.step, "hf", opts.out, len(entries), total, tuple(files))
