"""References between steps (incremental saves): the manifest's ``references`` section.

A chunk record of a shard header may be a *reference* (``[..., xxh128, [step, file]]``): its
bytes lie at its offset in ``file`` of an earlier ``step`` of the same root, the file that
physically holds them (never another reference: no chains). The manifest lists every
(step, file) its headers reference, with that file's record as the target's manifest has it
and the stored bytes referenced::

    "references":[{"step":40,"file":"rank00000-000.shard","nbytes":123,"header_offset":64,
                   "header_xxh3":"...","bytes":100}]

Names are a step number and a plain file name, never a path. A manifest whose chunks carry the
XXH3-128 of their raw bytes says so (``"chunk_digest":"xxh3_128"``): only such a step can be
the base of an incremental save. Never imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import fields as F
from .shard import PREAMBLE_SIZE, Chunk, Piece

REFERENCES = "references"
CHUNK_DIGEST = "chunk_digest"
DIGEST_NAME = "xxh3_128"
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.shard")


@dataclass(frozen=True)
class Reference:
    """One (step, file) a checkpoint references: the target file's record, as the target's
    manifest lists it, and the stored bytes of this checkpoint's chunks that lie in it."""

    step: int
    file: str
    nbytes: int
    header_offset: int
    header_xxh3: str
    bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "file": self.file, "nbytes": self.nbytes,
                "header_offset": self.header_offset, "header_xxh3": self.header_xxh3,
                "bytes": self.bytes}


def parse_references(value: Any, step: int, where: str) -> tuple[Reference, ...]:
    """Validate a ``references`` section (absent: none) of the manifest of ``step``: each
    names an *earlier* step (the same step is a cycle, a later one is refused) and a plain
    shard file name (a path would lie outside the root); no (step, file) twice."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > 1 << 24:
        raise F.fail(where, "references must be a list")
    out: list[Reference] = []
    seen: set[tuple[int, str]] = set()
    for i, item in enumerate(value):
        w = f"{where} references[{i}]"
        d = F.obj(item, w)
        target = F.integer(F.get(d, "step", w), f"{w}.step", 0, 10**10 - 1)
        name = F.get(d, "file", w)
        if not isinstance(name, str) or not _FILE.fullmatch(name) or ".." in name:
            raise F.fail(w, f"file {name!r} lies outside the root: a reference names a shard "
                            f"file of a step by its plain name"[:300])
        if target == step:
            raise F.fail(w, f"step {step} references itself (a cycle)")
        if target > step:
            raise F.fail(w, f"step {step} references the later step {target}: a reference "
                            f"names an earlier step")
        if (target, name) in seen:
            raise F.fail(w, f"step {target} file {name!r} is listed twice")
        seen.add((target, name))
        nbytes = F.integer(F.get(d, "nbytes", w), f"{w}.nbytes")
        hoff = F.integer(F.get(d, "header_offset", w), f"{w}.header_offset", PREAMBLE_SIZE,
                         nbytes)
        out.append(Reference(target, name, nbytes, hoff, F.hex16(F.get(d, "header_xxh3", w), w),
                             F.integer(d.get("bytes", 0), f"{w}.bytes")))
    return tuple(out)


def references(extra: Mapping[str, Any], step: int, where: str = "manifest.json"
               ) -> tuple[Reference, ...]:
    """The references of a parsed manifest (``manifest.extra``, ``manifest.step``)."""
    return parse_references(extra.get(REFERENCES), step, where)


def has_digests(extra: Mapping[str, Any]) -> bool:
    """Whether the step's chunks carry the XXH3-128 of their raw bytes (a possible base)."""
    return extra.get(CHUNK_DIGEST) == DIGEST_NAME


def depends_on(extra: Mapping[str, Any], step: int) -> list[int]:
    """The earlier steps whose files this step references, ascending."""
    return sorted({r.step for r in references(extra, step)})


def summary(extra: Mapping[str, Any], step: int, nbytes: int) -> dict[str, Any]:
    """Bytes a step wrote itself (``nbytes``: its own files), bytes it references, and the
    earlier steps it depends on."""
    refs = references(extra, step)
    return {"bytes_written": nbytes, "bytes_referenced": sum(r.bytes for r in refs),
            "depends_on": sorted({r.step for r in refs})}


def check_chunk(chunk: Chunk, targets: Mapping[tuple[int, str], Reference], where: str) -> None:
    """A reference chunk names a (step, file) of the manifest's references and lies inside
    that file's data region."""
    assert chunk.ref is not None
    ref = targets.get(chunk.ref)
    if ref is None:
        raise F.fail(where, f"chunk references step {chunk.ref[0]} file {chunk.ref[1]!r}, "
                            f"which the manifest's references do not list")
    if chunk.offset < PREAMBLE_SIZE or chunk.offset + chunk.stored > ref.header_offset:
        raise F.fail(where, f"chunk references [{chunk.offset}, {chunk.offset + chunk.stored}) "
                            f"of step {ref.step} file {ref.file!r}, outside its data region "
                            f"[{PREAMBLE_SIZE}, {ref.header_offset})")


def check_pieces(pieces: Iterable[Piece], targets: Mapping[tuple[int, str], Reference],
                 where: str) -> None:
    for p in pieces:
        for c in p.chunks:
            if c.ref is not None:
                check_chunk(c, targets, where)


def referenced_bytes(pieces: Iterable[Piece]) -> dict[tuple[int, str], int]:
    """Stored bytes referenced per (step, file), over the chunks of ``pieces``."""
    out: dict[tuple[int, str], int] = {}
    for p in pieces:
        for c in p.chunks:
            if c.ref is not None:
                out[c.ref] = out.get(c.ref, 0) + c.stored
    return out


__all__ = ["CHUNK_DIGEST", "DIGEST_NAME", "REFERENCES", "Reference", "check_chunk",
           "check_pieces", "depends_on", "has_digests", "parse_references", "referenced_bytes",
           "references", "summary"]
