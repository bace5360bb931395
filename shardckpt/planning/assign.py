"""Who writes what: a pure, deterministic plan computed identically on every rank.

Input: each rank's list of tensor leaves (key, dtype, global shape, local box, whether it is a
shard of a DTensor, and for replicated tensors a digest of their bytes). Output: for every piece,
the one rank that writes it. Replicated data (DDP parameters, ``Replicate`` placements, equal
tensors) is written once for the whole job, spread over ranks by size; a plain tensor whose bytes
differ between ranks (or that has no digest) is per-rank state and every rank writes its own.
The node-local tier drops the digests of its small replicated plain tensors, so that each rank's
files hold all it restores (:mod:`.localcopies`).

Ranks may hold different keys (rank-local state): the plan covers the union. A key that one rank
alone holds, or that all its holders hold with equal bytes, is written once by one of them; one
whose holders differ is per-rank state, written by each of its holders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..format.dtypes import itemsize


@dataclass(frozen=True)
class LeafSpec:
    key: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    sharded: bool
    alias_of: str | None = None
    digest: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.lengths) * itemsize(self.dtype)

    def to_json(self) -> list[Any]:
        return [self.key, self.dtype, list(self.shape), list(self.offsets), list(self.lengths),
                self.sharded, self.alias_of, self.digest]

    @classmethod
    def from_json(cls, v: list[Any]) -> LeafSpec:
        return cls(v[0], v[1], tuple(v[2]), tuple(v[3]), tuple(v[4]), v[5], v[6], v[7])


@dataclass
class WritePlan:
    """``writes[rank]``: keys that rank writes; ``kind[key]``: "shared", "per_rank" or "alias"."""

    writes: dict[int, list[str]] = field(default_factory=dict)
    kind: dict[str, str] = field(default_factory=dict)
    alias_of: dict[str, str] = field(default_factory=dict)
    load: list[int] = field(default_factory=list)


def assign(leaves_by_rank: list[list[LeafSpec]]) -> WritePlan:
    """Decide the writer of every piece. Raises ``ValueError`` on inconsistent shards."""
    world = len(leaves_by_rank)
    plan = WritePlan(writes={r: [] for r in range(world)}, load=[0] * world)
    by_key: dict[str, dict[int, LeafSpec]] = {}
    for rank, leaves in enumerate(leaves_by_rank):
        for leaf in leaves:
            by_key.setdefault(leaf.key, {})[rank] = leaf
    # Largest first, so the greedy balance ends close to even.
    items: list[tuple[int, str, list[int]]] = []
    for key, per in sorted(by_key.items()):
        specs = list(per.values())
        first = specs[0]
        if first.alias_of is not None and all(s.alias_of == first.alias_of for s in specs) \
                and len(per) == world:
            plan.kind[key] = "alias"
            plan.alias_of[key] = first.alias_of
            continue
        same_meta = all(s.dtype == first.dtype and s.shape == first.shape for s in specs)
        if any(s.sharded for s in specs):
            if not same_meta or not all(s.sharded for s in specs):
                raise ValueError(f"{key}: ranks disagree on the dtype, shape or sharding of "
                                 f"this DTensor")
            plan.kind[key] = "shared"
            boxes: dict[tuple[Any, ...], list[int]] = {}
            for rank, s in per.items():
                if math.prod(s.lengths) > 0:
                    boxes.setdefault((s.offsets, s.lengths), []).append(rank)
            for (_, lengths), ranks in boxes.items():
                items.append((math.prod(lengths) * itemsize(first.dtype), key, ranks))
            if not boxes and per:  # an empty tensor: one rank records it, writing no bytes
                items.append((0, key, [min(per)]))
            continue
        replicated = same_meta and (len(per) == 1 or (
            first.digest is not None and all(s.digest == first.digest for s in specs)))
        if replicated:
            plan.kind[key] = "shared"
            items.append((first.nbytes, key, sorted(per)))
        else:
            plan.kind[key] = "per_rank"
            for rank, s in per.items():
                plan.writes[rank].append(key)
                plan.load[rank] += s.nbytes
    for nbytes, key, ranks in sorted(items, key=lambda t: (-t[0], t[1], t[2])):
        writer = min(ranks, key=lambda r: (plan.load[r], r))
        plan.writes[writer].append(key)
        plan.load[writer] += nbytes
    return plan
