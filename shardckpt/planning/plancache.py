"""Plan caching: a job saves the same structure over and over, so plan it once.

Rank 0's planning costs O(ranks x tensors) (about 26 us a leaf, see ``docs/scaling.md``): at
1,024 ranks that is a minute of CPU per save. But between two saves the *structure* of a rank's
leaves (keys, dtypes, shapes, boxes) almost never changes; only the digests of replicated
tensors (which decide what is written once) may. So each rank sends its full leaf list only when
its structure hash differs from the one rank 0 acknowledged last time, plus the digests it has
(few: FSDP shards carry none), and rank 0 reuses the previous plan whenever every rank's hash
and digests are unchanged.

Rank 0's cache and each rank's notion of what rank 0 knows are updated from the same broadcast,
so they cannot drift apart; if they ever did, the save fails on every rank and the next one
sends everything again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import xxhash

from ..format import safejson
from .assign import LeafSpec


def structure_hash(specs: list[LeafSpec]) -> str:
    """XXH3 of a rank's leaves without their digests."""
    return xxhash.xxh3_64_hexdigest(safejson.dumps([s.to_json()[:7] for s in specs]))


@dataclass
class PlanCache:
    """One per manager. ``acked``: on every rank, the structure hash rank 0 holds for it. On
    rank 0: every rank's leaves by hash, and the last plan with the key it was computed for."""

    acked: str | None = None
    specs: dict[int, tuple[str, list[LeafSpec]]] = field(default_factory=dict)
    key: str | None = None
    plan: Any = None

    def outgoing(self, specs: list[LeafSpec]) -> dict[str, Any]:
        """What this rank sends rank 0: its hash, its digests, and its leaves if needed."""
        h = structure_hash(specs)
        return {"hash": h, "digests": {str(i): s.digest for i, s in enumerate(specs) if s.digest},
                "leaves": None if h == self.acked else [s.to_json() for s in specs]}

    def resolve(self, parts: list[dict[str, Any]]) -> list[list[LeafSpec]]:
        """Rank 0: every rank's leaves, with this save's digests. ``ValueError`` names a rank
        that sent no leaves for a structure rank 0 does not hold."""
        out = []
        for rank, part in enumerate(parts):
            if part["leaves"] is not None:
                specs = [LeafSpec.from_json(v) for v in part["leaves"]]
                self.specs[rank] = (part["hash"], [replace(s, digest=None) for s in specs])
            held = self.specs.get(rank)
            if held is None or held[0] != part["hash"]:
                self.specs.pop(rank, None)
                raise ValueError(f"rank {rank} sent no leaves and its structure "
                                 f"{part['hash']} is not cached on rank 0")
            digests = part["digests"]
            out.append([replace(s, digest=digests.get(str(i))) for i, s in enumerate(held[1])]
                       if digests else held[1])
        return out

    @staticmethod
    def plan_key(parts: list[dict[str, Any]]) -> str:
        return xxhash.xxh3_64_hexdigest(safejson.dumps(
            [[p["hash"], sorted(p["digests"].items())] for p in parts]))

    def known(self, world: int) -> list[str | None]:
        """Rank 0: the hash it holds for each rank (broadcast, so every rank can ``ack``)."""
        return [self.specs[r][0] if r in self.specs else None for r in range(world)]

    def ack(self, known: list[str | None] | None, rank: int) -> None:
        self.acked = known[rank] if known else None
