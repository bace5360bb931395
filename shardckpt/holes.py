"""Give back the space of a retired step's chunks that no kept step references (local disks).

A retired step keeps every file that a kept step references (:mod:`.prune_refs`), but a kept
step usually references only some chunks of such a file (the frozen weights, not the adapters
that changed since). On a local Linux filesystem the other chunks' space is returned with
``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)``: the file keeps its size, preamble,
header and the referenced chunks byte for byte; the punched ranges read as zeros, and nothing
reads them (a reader reads a retired step's files only through references, and ``verify`` /
``repair`` check a referenced file by the chunks referenced). Elsewhere (object stores, other
systems) nothing is punched, and neither is a file that a *signed* kept step references (its
signature covers the SHA-256 of the whole file). Never imports torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterable, Mapping

from .errors import ShardckptError
from .format import manifest as M
from .format.refs import references
from .format.shard import PREAMBLE_SIZE, read_header
from .storage import Location, step_dirname

_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_BLOCK = 4096


def referenced_ranges(location: Location, kept: Mapping[int, M.Manifest], target: int
                      ) -> dict[str, list[tuple[int, int]]]:
    """File of step ``target`` -> the byte ranges of it that the ``kept`` steps' chunks
    reference (read from their headers, each checked against its manifest's record)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for step, m in kept.items():
        if target not in {r.step for r in references(m.extra, step)}:
            continue
        for name, rec in m.files.items():
            rel = f"{step_dirname(step)}/{name}"
            head = read_header(lambda o, n, rel=rel: location.read_range(rel, o, n), rec.nbytes,
                               f"{location.display}/{rel}")
            if (head.header_offset, head.header_xxh3) != (rec.header_offset, rec.header_xxh3):
                raise ShardckptError(f"{location.display}/{rel}: not the file its manifest "
                                     f"records; nothing punched")
            for p in head.pieces:
                for c in p.chunks:
                    if c.ref is not None and c.ref[0] == target:
                        out.setdefault(c.ref[1], []).append((c.offset, c.offset + c.stored))
    return out


def gaps(keep: Iterable[tuple[int, int]], end: int) -> list[tuple[int, int]]:
    """Block-aligned ranges of ``[PREAMBLE_SIZE, end)`` that overlap no range of ``keep``."""
    out = []
    pos = PREAMBLE_SIZE
    for a, b in sorted([*keep, (end, end)]):
        lo, hi = -(-pos // _BLOCK) * _BLOCK, a // _BLOCK * _BLOCK
        if hi > lo:
            out.append((lo, hi))
        pos = max(pos, b)
    return out


def punch(location: Location, rel: str, ranges: Iterable[tuple[int, int]]) -> int:
    """Punch ``ranges`` of a local file; returns the bytes punched (0 where unsupported)."""
    path_of = getattr(location, "_path", None)
    libc = _libc()
    ranges = list(ranges)
    if not location.is_local or path_of is None or libc is None or not ranges:
        return 0
    fd = os.open(path_of(rel), os.O_WRONLY)
    done = 0
    try:
        for a, b in ranges:
            if libc.fallocate(fd, _PUNCH, ctypes.c_long(a), ctypes.c_long(b - a)) != 0:
                return done  # a filesystem without hole punching: keep the bytes
            done += b - a
    finally:
        os.close(fd)
    return done


def punch_retired(location: Location, kept: Mapping[int, M.Manifest], target: M.Manifest,
                  files: Iterable[str]) -> int:
    """Punch out the chunks of the retired step ``target``'s ``files`` that no kept step
    references. Returns the bytes punched."""
    if not location.is_local or _libc() is None:
        return 0
    ranges = referenced_ranges(location, kept, target.step)
    signed = _signed_whole(location, kept, target.step)
    total = 0
    for name in files:
        rec = target.files.get(name)
        if rec is not None and name not in signed:
            total += punch(location, f"{step_dirname(target.step)}/{name}",
                           gaps(ranges.get(name, []), rec.header_offset))
    return total


def _signed_whole(location: Location, kept: Mapping[int, M.Manifest], target: int) -> set[str]:
    """Files of ``target`` that a *signed* kept step references: kept whole, unpunched (its
    signature covers the SHA-256 of each whole file it references: shardckpt/sign/step.py)."""
    from .sign.step import SIGNATURE_NAME  # no cryptography import: names only

    out: set[str] = set()
    for s, m in kept.items():
        refs = [r.file for r in references(m.extra, s) if r.step == target]
        if refs and location.size(f"{step_dirname(s)}/{SIGNATURE_NAME}") is not None:
            out.update(refs)
    return out


_LIBC: list[object] = []


def _libc() -> ctypes.CDLL | None:
    if not _LIBC:
        name = ctypes.util.find_library("c")
        lib = ctypes.CDLL(name, use_errno=True) if name else None
        if lib is not None and hasattr(lib, "fallocate"):
            lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        _LIBC.append(lib if lib is not None and hasattr(lib, "fallocate") else None)
    found = _LIBC[0]
    return found if isinstance(found, ctypes.CDLL) else None


__all__ = ["gaps", "punch", "punch_retired", "referenced_ranges"]
