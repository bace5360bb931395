"""Write safetensors files one tensor at a time, and read back the metadata of one.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's dtype,
shape and byte range, plus a ``__metadata__`` map of strings) and the tensors' bytes, back to
back. Every shape and dtype is known from the manifest before any tensor is read, so the header
goes first and each tensor is then read, written and dropped: a file of any size is written with
one tensor in memory. The ``safetensors`` package is not needed to write.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..atomicfile import atomic_open
from ..engine.tensorbytes import byte_view
from . import ConversionError

# torch dtype name (as the manifest stores it) -> safetensors dtype code
CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e8m0fnu": "F8_E8M0",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}
MAX_HEADER = 100 << 20  # the limit the safetensors readers apply


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file: its name, stored dtype name, shape and byte count."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def code_of(dtype: str, name: str) -> str:
    """The safetensors dtype code of a stored dtype name; ``ConversionError`` if it has none."""
    try:
        return CODES[dtype]
    except KeyError:
        raise ConversionError(f"tensor {name!r}: dtype {dtype} has no safetensors "
                              f"equivalent") from None


def encode_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    """Length prefix and JSON header, padded with spaces so the data starts 8-byte aligned."""
    doc: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for spec in specs:
        if spec.name in doc or spec.name == "__metadata__":
            raise ConversionError(f"tensor name {spec.name!r} appears twice in one file")
        doc[spec.name] = {"dtype": code_of(spec.dtype, spec.name), "shape": list(spec.shape),
                          "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def write_file(path: str, specs: Sequence[TensorSpec],
               load: Callable[[TensorSpec], torch.Tensor],
               metadata: Mapping[str, str]) -> int:
    """Write ``specs`` to ``path``, each tensor from ``load(spec)`` in turn, and return the bytes
    of tensor data written. The file appears under its name only when complete (written to a
    temporary name in the same directory, fsynced, renamed); its mode follows the umask."""
    written = 0
    with atomic_open(path) as f:
        f.write(encode_header(specs, metadata))
        for spec in specs:
            tensor = load(spec)
            if tuple(tensor.shape) != spec.shape or \
                    str(tensor.dtype).removeprefix("torch.") != spec.dtype:
                raise ValueError(f"tensor {spec.name!r}: read {tensor.dtype} "
                                 f"{tuple(tensor.shape)}, expected {spec.dtype} {spec.shape}")
            data = tensor.detach().cpu().contiguous()
            del tensor
            n = f.write(byte_view(data))  # no NumPy needed
            del data
            if n != spec.nbytes:
                raise OSError(f"{path}: short write of tensor {spec.name!r}")
            written += n
    return written


def read_metadata(path: str) -> dict[str, str] | None:
    """The ``__metadata__`` map of a safetensors file, or None if the file is not one (too short,
    header out of bounds or not JSON) or has none."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                return None
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER:
                return None
            raw = f.read(n)
    except OSError:
        return None
    if len(raw) != n:
        return None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    meta = doc.get("__metadata__") if isinstance(doc, dict) else None
    return meta if isinstance(meta, dict) else None
