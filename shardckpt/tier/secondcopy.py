"""After a local step failed to restore: find the copies that were bad, and whether the step can
still be restored from the other holders of those ranks' files.

The holdings check (:meth:`~shardckpt.tier.local.LocalTierStore.report`) reads sizes, trailers
and headers only, so a copy whose tensor data is damaged is first found by the load, which
checks every chunk; the wire check of a transfer cannot find it either (the sender hashes the
bytes it has). :func:`bad_copies` then reads in full (every chunk checksum) each copy that the
failed candidate used: the rank that provided each rank's files checks them on its own node
(:func:`~shardckpt.tier.fetchplan.providers`), and every rank gathers what was bad.
:func:`without` marks those copies invalid in the nodes' reports; the caller plans again, and
tries the same step once more if every rank's files are still valid on some node (the other
copy), else moves on to the next candidate. Collective, like the rest of the restore.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..catalog import read_manifest
from ..engine.failures import describe
from ..repair import verify_file
from .choice import Candidate, NodeReport
from .fetchplan import providers
from .local import LocalTierStore


def bad_copies(store: LocalTierStore, cand: Candidate) -> list[tuple[str, int, str]]:
    """Collective: (node, rank, why) for each copy of a rank's files that ``cand`` used and
    that fails a full check."""
    comm = store.comm
    mine: list[list[Any]] = []
    ranks = [r for r, p in enumerate(providers(store.node_map, cand.sources)) if p == comm.rank]
    if ranks:
        try:
            manifest = read_manifest(store.location, cand.step)
            for rank in ranks:
                for name in sorted(n for n, f in manifest.files.items() if f.rank == rank):
                    why = verify_file(store.location, cand.step, manifest, name)
                    if why is not None:
                        where = f"{store.location.display}/step-{cand.step:010d}/{name}"
                        mine.append([store.node, rank, why if name in why else f"{where}: {why}"])
                        break
        except Exception as exc:  # no finding from here; the next candidate is tried
            mine = [[store.node, r, f"cannot be checked: {describe(exc)}"] for r in ranks]
    found = comm.all_gather_json(mine, "load: which copies were bad")
    return [(str(n), int(r), str(w)) for part in found for n, r, w in part]


def without(reports: Sequence[NodeReport], step: int,
            bad: Sequence[tuple[str, int, str]]) -> list[NodeReport]:
    """The reports with the ``bad`` copies of ``step`` marked invalid."""
    out = []
    for rep in reports:
        drop = {r: why for n, r, why in bad if n == rep.node}
        steps = tuple(
            replace(s, valid=s.valid - set(drop), problems={**s.problems, **drop})
            if s.step == step and drop else s for s in rep.steps)
        out.append(replace(rep, steps=steps))
    return out
