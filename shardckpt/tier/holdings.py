"""``holdings.json``: which ranks' files one node's copy of a local step holds.

A node's copy of a local step is complete when its local rank 0 has written the step's
``manifest.json`` and then this record, both after every file it lists is durable. It names, for
each rank it holds (its own ranks and the peers' it copies), that rank's shard files with their
sizes and header checksums, so a node's holdings are checked with small reads (size, trailer,
header), without trusting the file names alone. Torch-free.

Layout (strict JSON, :mod:`shardckpt.format.safejson`)::

    {"format": "shardckpt-holdings", "version": 1, "step": 7, "node": "1", "copies": 2,
     "nodes": ["0", "0", "1", "1"],
     "ranks": {"2": {"name.shard": {"nbytes": 123, "header_xxh3": "0123456789abcdef"}}, ...}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import CorruptCheckpointError, ShardckptError
from ..format import fields as F
from ..format import safejson
from ..format.shard import read_header
from ..storage import Location
from .placement import NodeMap, check_node_id

HOLDINGS_NAME = "holdings.json"
FORMAT = "shardckpt-holdings"
VERSION = 1
MAX_HOLDINGS_BYTES = 64 << 20


@dataclass(frozen=True)
class HeldFile:
    nbytes: int
    header_xxh3: str


@dataclass(frozen=True)
class Holdings:
    """One node's copy of one local step: ``ranks[r]`` maps rank ``r``'s file names to their
    records (an empty map: the rank wrote no file)."""

    step: int
    node: str
    copies: int
    node_map: NodeMap
    ranks: Mapping[int, Mapping[str, HeldFile]]

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for files in self.ranks.values() for f in files.values())

    def to_bytes(self) -> bytes:
        doc = {"format": FORMAT, "version": VERSION, "step": self.step, "node": self.node,
               "copies": self.copies, "nodes": self.node_map.to_json(),
               "ranks": {str(r): {n: {"nbytes": f.nbytes, "header_xxh3": f.header_xxh3}
                                  for n, f in sorted(files.items())}
                         for r, files in sorted(self.ranks.items())}}
        return json.dumps(doc, indent=1, sort_keys=True).encode()


def parse_holdings(data: bytes, where: str = HOLDINGS_NAME) -> Holdings:
    """Validate a holdings record; ``CorruptCheckpointError`` naming ``where`` otherwise."""
    doc = F.obj(safejson.loads(data, where), where)
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise F.fail(where, f"not a version-{VERSION} {FORMAT} record")
    step = F.integer(F.get(doc, "step", where), f"{where} step", 0, 10**10 - 1)
    try:
        node = check_node_id(F.get(doc, "node", where), f"{where} node")
        nodes = F.get(doc, "nodes", where)
        if not isinstance(nodes, list):
            raise F.fail(where, "nodes is not a list")
        node_map = NodeMap.from_json(nodes)
    except ValueError as exc:
        raise CorruptCheckpointError(f"{where}: {exc}") from exc
    copies = F.integer(F.get(doc, "copies", where), f"{where} copies", 1, node_map.world_size)
    ranks: dict[int, dict[str, HeldFile]] = {}
    for key, files in F.obj(F.get(doc, "ranks", where), f"{where} ranks").items():
        if not key.isdigit() or int(key) >= node_map.world_size:
            raise F.fail(where, f"rank {key!r} is not a rank of a job of {node_map.world_size}")
        held: dict[str, HeldFile] = {}
        for name, rec in F.obj(files, f"{where} ranks[{key}]").items():
            w = f"{where} ranks[{key}][{name!r}]"
            if not name.endswith(".shard") or "/" in name or name.startswith("."):
                raise F.fail(w, "not a shard file name")
            rec = F.obj(rec, w)
            held[name] = HeldFile(F.integer(F.get(rec, "nbytes", w), f"{w} nbytes"),
                                  F.hex16(F.get(rec, "header_xxh3", w), f"{w} header_xxh3"))
        ranks[int(key)] = held
    return Holdings(step, node, copies, node_map, ranks)


def read_holdings(location: Location, step_dir: str) -> Holdings:
    """The holdings record of ``step_dir`` at ``location``; ``FileNotFoundError`` if none."""
    path = f"{step_dir}/{HOLDINGS_NAME}"
    data = location.read_file(path, MAX_HOLDINGS_BYTES)
    holdings = parse_holdings(data, f"{location.display}/{path}")
    if f"step-{holdings.step:010d}" != step_dir:
        raise CorruptCheckpointError(f"{location.display}/{path}: records step "
                                     f"{holdings.step}, but lies in {step_dir}")
    return holdings


def check_file(location: Location, step_dir: str, name: str, rec: HeldFile) -> str | None:
    """None if ``name`` is there with the recorded size and header, else why not (naming the
    file). Small reads only: the preamble, the trailer and the header."""
    path = f"{step_dir}/{name}"
    where = f"{location.display}/{path}"
    try:
        size = location.size(path)
        if size is None:
            return f"{where}: missing"
        if size != rec.nbytes:
            return f"{where}: {size} bytes, {rec.nbytes} recorded"
        header = read_header(lambda off, n: location.read_range(path, off, n), size, where, name)
        if header.header_xxh3 != rec.header_xxh3:
            return (f"{where}: header checksum {header.header_xxh3}, {rec.header_xxh3} "
                    f"recorded (the file was replaced)")
    except (ShardckptError, OSError) as exc:
        return f"{where}: {exc}" if where not in str(exc) else str(exc)
    return None


def check_holdings(location: Location, holdings: Holdings) -> dict[int, str | None]:
    """For each rank the node holds: None if all its files check out, else the first problem."""
    step_dir = f"step-{holdings.step:010d}"
    out: dict[int, str | None] = {}
    for rank, files in sorted(holdings.ranks.items()):
        out[rank] = next((why for name, rec in sorted(files.items())
                          if (why := check_file(location, step_dir, name, rec))), None)
    return out
