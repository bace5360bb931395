"""Which ranks' files a loading rank reads from a local step, exactly: the load's own plan,
run against headers that other nodes read for it.

A rank's load reads the headers of a tensor's writers in its own order until its box is covered
(:class:`~shardckpt.engine.index.PieceIndex`): at the same world size and sharding, its own
files. To receive only those files, each rank needs to know the pieces in files its node may
not hold. So the rank that provides each rank's files (:func:`providers`: the rank itself when
its own node holds them, else the rank of the holder node that sends them) reads their headers
(small reads) and every rank gathers the pieces, without chunks. Each rank then runs the load's
plan phase (nothing of ``state`` changes) against a reader that serves those pieces, and the
ranks whose headers that plan asks for are the ones it needs (:func:`planned_ranks`). Any
failure there falls back to the conservative answer (:func:`~shardckpt.tier.needs.needed_ranks`:
every writer of every key); the real load then checks every byte anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..engine.load import LoadPlanner
from ..format import manifest as M
from ..format.shard import Piece, read_header
from ..planning.restore import LoadContext, restore
from ..storage import Location
from .placement import NodeMap

PieceRows = dict[str, list[list[Any]]]  # file -> [[key, dtype, offsets, lengths], ...]


def providers(node_map: NodeMap, sources: Sequence[str]) -> list[int]:
    """For each rank ``r``, the rank whose node path holds the copy of ``r``'s files that
    the candidate uses (``sources[r]``): ``r`` itself on its own node, else the rank of that
    node that received ``r``'s files at the save (and sends them now)."""
    return [r if node_map.nodes[r] == src else node_map.receiver(r, src)
            for r, src in enumerate(sources)]


def read_pieces(location: Location, step_dir: str, manifest: M.Manifest,
                ranks: Sequence[int]) -> PieceRows:
    """The pieces (no chunks) of the files of ``ranks`` at ``location``."""
    out: PieceRows = {}
    for name, rec in sorted(manifest.files.items()):
        if rec.rank not in ranks:
            continue
        path = f"{step_dir}/{name}"
        size = location.size(path)
        if size is None:
            raise FileNotFoundError(f"{location.display}/{path}: missing")
        header = read_header(lambda off, n, path=path: location.read_range(path, off, n),
                             size, f"{location.display}/{path}", name)
        out[name] = [[p.key, p.dtype, list(p.offsets), list(p.lengths)] for p in header.pieces]
    return out


class _Header:
    def __init__(self, pieces: tuple[Piece, ...]) -> None:
        self.pieces = pieces


class _PieceReader:
    """What the load's planner asks of a reader, served from gathered pieces; records which
    files' headers it was asked for."""

    def __init__(self, manifest: M.Manifest, rows: Mapping[str, list[list[Any]]],
                 display: str, step_dir: str) -> None:
        self.manifest, self._rows, self.step_dir = manifest, rows, step_dir
        self.location = type("_Where", (), {"display": display})()
        self.asked: set[str] = set()

    def check_any(self, file: str) -> _Header:
        self.asked.add(file)
        return _Header(tuple(Piece(str(k), str(d), tuple(o), tuple(n), (), file)
                             for k, d, o, n in self._rows[file]))


def planned_ranks(manifest: M.Manifest, rows: Mapping[str, list[list[Any]]],
                  target: dict[str, Any], strict: bool, rank: int, world_size: int,
                  display: str, step_dir: str) -> set[int]:
    """The ranks whose files this rank's load of ``target`` reads (see the module). Raises
    what the plan raises (the caller then falls back)."""
    same_world = manifest.world_size == world_size
    reader = _PieceReader(manifest, rows, display, step_dir)
    planner = LoadPlanner(reader, rank if same_world else None, strict)  # type: ignore[arg-type]
    ctx = LoadContext(planner.request, rank if same_world else None, manifest.world_size,
                      strict, caller_rank=rank, defer=True)
    restore(target, manifest.tree, ctx)
    return {manifest.files[name].rank for name in reader.asked}
