"""Self-sufficient files for the node-local tier: small replicated tensors on every rank.

The ordinary plan (:mod:`.assign`, :mod:`.fastplan`) writes a tensor that is equal on every rank
once, by one rank: right for a persistent store, where every rank reads from the same place. In
the node-local tier a rank whose node was replaced receives, from a peer node, the files it
reads; if a replicated scalar (an RNG stream's state, an optimizer's ``step``) lies only in
another rank's file, that whole file must travel too (twice the bytes, for a few bytes of
state). So a local save writes its small replicated plain tensors on every rank that holds them
(``per_rank`` entries in the manifest, each rank's own copy): each rank's files then hold all it
reads back at the same world size and sharding (the only case the local tier restores).

Which tensors: every plain (not DTensor, not alias) tensor whose bytes are equal on all its
holders (two or more ranks), RNG streams first (``always``: every key under those prefixes),
then the rest smallest first while the total stays within ``budget`` bytes (each rank writes
at most that much more). Sharded DTensor replicas (``Replicate`` or HSDP placements) keep one
writer: two pieces of one box cannot both be in a manifest.

This works on the planner's input: :class:`SelfSufficientPlanCache` drops the digests of the
chosen tensors from what rank 0 decoded, and a plain tensor without a digest is per-rank state
for both planners. Persistent saves use the ordinary :class:`~.plancache.PlanCache`: their
dedup is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..format.dtypes import itemsize
from .plancache import PlanCache, Resolved

LOCAL_COPY_BUDGET = 1 << 20  # bytes of replicated tensors each rank may write again


def copied_keys(res: Resolved, budget: int, always: Sequence[str] = ()) -> set[str]:
    """The replicated plain tensors to write on every holder (see the module)."""
    digests: dict[str, set[str]] = {}
    meta: dict[str, set[tuple[str, tuple[int, ...]]]] = {}
    holders: dict[str, int] = {}
    for rank, h in enumerate(res.skeleton_of):
        skel = res.skeletons[h]
        for i, digest in res.digests[rank].items():
            key = skel.keys[int(i)]
            digests.setdefault(key, set()).add(digest)
            meta.setdefault(key, set()).add((skel.dtypes[int(i)], skel.shapes[int(i)]))
            holders[key] = holders.get(key, 0) + 1
    sizes: dict[str, int] = {}
    for key, seen in digests.items():
        if len(seen) == 1 and len(meta[key]) == 1 and holders[key] > 1:
            dtype, shape = next(iter(meta[key]))
            sizes[key] = math.prod(shape) * itemsize(dtype)
    first = {k for k in sizes if any(k == p or k.startswith(p + "/") for p in always)}
    chosen, total = set(first), sum(sizes[k] for k in first)
    for key in sorted(set(sizes) - first, key=lambda k: (sizes[k], k)):
        if total + sizes[key] > budget:
            break
        chosen.add(key)
        total += sizes[key]
    return chosen


def self_sufficient(res: Resolved, budget: int, always: Sequence[str] = ()) -> Resolved:
    """``res`` without the digests of the tensors :func:`copied_keys` chooses: both planners
    then have every holder write its own copy."""
    chosen = copied_keys(res, budget, always)
    if not chosen:
        return res
    digests = []
    for rank, h in enumerate(res.skeleton_of):
        keys = res.skeletons[h].keys
        digests.append({i: d for i, d in res.digests[rank].items() if keys[int(i)] not in chosen})
    return replace(res, digests=digests)


@dataclass
class SelfSufficientPlanCache(PlanCache):
    """The local tier's plan cache: plans from :func:`self_sufficient` of what rank 0
    decoded (the cache itself, and the plan key, are those of the ranks' own messages)."""

    budget: int = LOCAL_COPY_BUDGET
    always: tuple[str, ...] = ()

    def resolve_compact(self, parts: list[dict[str, Any]]) -> Resolved:
        return self_sufficient(super().resolve_compact(parts), self.budget, self.always)


__all__ = ["LOCAL_COPY_BUDGET", "SelfSufficientPlanCache", "copied_keys", "self_sufficient"]
