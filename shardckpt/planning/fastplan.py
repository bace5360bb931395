"""Rank 0's write plan at thousands of ranks: the common case, vectorized.

When every rank has the same skeleton (keys, dtypes, shapes, sharding, aliases: an FSDP, HSDP
or DDP job), the boxes of all ranks form one ``(ranks, leaves, 2 * dims)`` tensor, and the plan
of :func:`~shardckpt.planning.assign.assign` plus the coverage check of the manifest's
directory are a few tensor operations instead of a Python loop over every (rank, leaf):

- a sharded leaf whose boxes cover dims 1.. whole is checked along dim 0: sorted by offset,
  each non-empty box starts where the previous one ends (or repeats it exactly: a replica), the
  first at 0, the last ending at the shape. Anything else (2-D sharding, a gap, an overlap)
  returns None, and the caller runs the general planner, which checks every box exactly and
  names what is wrong;
- a box held by one rank is written by it; a box held by several ranks (replicas) and a plain
  tensor with equal digests on every rank are written once, largest first, by the holder with
  the fewest bytes so far (the forced writes counted first); a plain tensor whose digests
  differ (or that has no digest: :mod:`.localcopies`) is per-rank state, written by every rank.

Every check of the general path is made; the plan is the same wherever no rank has a choice.
"""

from __future__ import annotations

import math

import torch

from ..format import manifest as M
from ..format.dtypes import itemsize
from .plancache import Resolved, Skeleton


def runs(mask: torch.Tensor) -> list[M.Ranges]:
    """Each row of a 2-D bool tensor as sorted ``[start, stop)`` runs of its true columns."""
    n, width = mask.shape
    full = mask.all(1)
    out: list[list[tuple[int, int]]] = [[(0, width)] if width else [] for _ in range(n)]
    rest = (~full).nonzero().flatten()
    for r in rest.tolist():
        out[r] = []
    if len(rest):
        part = mask[rest]
        pad = torch.zeros(len(rest), 1, dtype=torch.int8)
        step = torch.diff(torch.cat([pad, part.to(torch.int8), pad], 1), dim=1)
        starts, ends = (step == 1).nonzero(), (step == -1).nonzero()
        rows = rest[starts[:, 0]].tolist()
        for r, a, b in zip(rows, starts[:, 1].tolist(), ends[:, 1].tolist()):
            out[r].append((a, b))
    return [tuple(x) for x in out]


def _tiled_dim0(boxes: torch.Tensor, shapes: torch.Tensor, dims: int
                ) -> tuple[bool, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whether the boxes (ranks, leaves, 2 * dims) of every leaf tile its shape along dim 0
    (every box whole in dims 1..); and (non-empty mask, sort order along ranks, replica mask
    in that order)."""
    whole = bool((boxes[..., 1:dims] == 0).all()) and \
        bool((boxes[..., dims + 1:] == shapes[..., 1:]).all())
    if not whole:
        return False, torch.empty(0), torch.empty(0), torch.empty(0)
    o0, l0, shape0 = boxes[..., 0], boxes[..., dims], shapes[..., 0]
    if not bool(((o0 >= 0) & (l0 >= 0) & (o0 + l0 <= shape0)).all()):
        return False, torch.empty(0), torch.empty(0), torch.empty(0)
    nonempty = (l0 > 0) & (shapes[..., 1:].prod(-1) > 0)
    big = torch.iinfo(torch.int64).max
    key = torch.where(nonempty, o0, big)
    s_len = torch.where(nonempty, l0, 0)
    if bool((key[1:] >= key[:-1]).all()):  # ranks in box order already (FSDP): no sort
        s_off, s_ne = key, nonempty
        order = torch.arange(key.shape[0]).unsqueeze(1).expand_as(key)
    else:
        s_off, order = torch.sort(key, dim=0, stable=True)
        s_len, s_ne = torch.gather(s_len, 0, order), torch.gather(nonempty, 0, order)
    same = (s_off[1:] == s_off[:-1]) & (s_len[1:] == s_len[:-1]) & s_ne[:-1]
    chain = s_off[1:] == s_off[:-1] + s_len[:-1]
    pairs = bool((~s_ne[1:] | (s_ne[:-1] & (same | chain))).all())
    first = bool((~s_ne[0] | (s_off[0] == 0)).all())
    end = torch.where(s_ne, s_off + s_len, 0).max(0).values
    numel = shapes[0].prod(-1)
    covered = bool(torch.where(s_ne.any(0), end == shapes[0, :, 0], numel == 0).all())
    dup = torch.cat([torch.zeros(1, same.shape[1], dtype=torch.bool), same], 0)
    return pairs and first and covered, nonempty, order, dup


def uniform_plan(res: Resolved, world: int) -> tuple[dict[str, M.TensorEntry],
                                                     list[M.Ranges]] | None:
    """The directory entries and each rank's writes (index runs), or None where the general
    planner must decide (ranks with different skeletons, boxes that are not dim-0 tilings)."""
    skel = res.uniform()
    if skel is None or not skel.keys:
        return None
    n, dims = len(skel.keys), skel.dims
    boxes = res.stacked()
    writes = torch.zeros(world, n, dtype=torch.bool)
    load = torch.zeros(world, dtype=torch.int64)
    kind: dict[int, str] = {}
    # (nbytes, leaf, holders; None: every rank): written once, by one of the holders
    choices: list[tuple[int, int, list[int] | None]] = []
    sharded = [i for i in range(n) if skel.sharded[i] and skel.alias[i] is None]
    if sharded and dims:
        idx = torch.tensor(sharded)
        sub = boxes if len(sharded) == n else boxes[:, idx]
        shapes = torch.tensor([list(skel.shapes[i]) + [1] * (dims - len(skel.shapes[i]))
                               for i in sharded], dtype=torch.int64).unsqueeze(0)
        ok, nonempty, order, dup = _tiled_dim0(sub, shapes, dims)
        if not ok:
            return None
        sizes = (torch.tensor([itemsize(skel.dtypes[i]) for i in sharded]) *
                 shapes[0, :, 1:].prod(-1)) * torch.where(nonempty, sub[..., dims], 0)
        replicas = dup.any(0)
        single = ~replicas
        if len(sharded) == n and not bool(replicas.any()):
            writes = nonempty.clone()
            load += sizes.sum(1)
        else:
            writes[:, idx[single]] = nonempty[:, single]
            load += (sizes[:, single]).sum(1)
        for j in replicas.nonzero().flatten().tolist():  # replica groups: a choice each
            holders: list[int] = []
            for rank, again in zip(order[:, j].tolist(), dup[:, j].tolist()):
                if not nonempty[rank, j]:
                    continue
                if not again and holders:
                    choices.append((int(sizes[holders[0], j]), sharded[j], sorted(holders)))
                    holders = []
                holders.append(rank)
            if holders:
                choices.append((int(sizes[holders[0], j]), sharded[j], sorted(holders)))
        empty = ~nonempty.any(0)
        writes[0, idx[empty & single]] = True  # an empty tensor: rank 0 records it
        for i in sharded:
            kind[i] = "shared"
    elif sharded:  # 0-dim sharded leaves cannot be: let the general planner say so
        return None
    same_digests = all(d == res.digests[0] for d in res.digests[1:])
    for i in range(n):
        if skel.alias[i] is not None:
            kind[i] = "alias"
        elif not skel.sharded[i]:
            nbytes = math.prod(skel.shapes[i]) * itemsize(skel.dtypes[i])
            if tuple(boxes[0, i, dims:dims + len(skel.shapes[i])].tolist()) != skel.shapes[i]:
                return None
            digest = res.digests[0].get(str(i))
            if world == 1 or (digest is not None and (same_digests or all(
                    d.get(str(i)) == digest for d in res.digests[1:]))):
                kind[i] = "shared"
                choices.append((nbytes, i, None))
            else:
                kind[i] = "per_rank"
                writes[:, i] = True
                load += nbytes
    for nbytes, i, holders in sorted(choices, key=lambda c: (-c[0], skel.keys[c[1]],
                                                              c[2] or [])):
        if holders is None:
            writer = int(torch.argmin(load))
        else:
            writer = min(holders, key=lambda r: (int(load[r]), r))
        writes[writer, i] = True
        load[writer] += nbytes
    return _entries(skel, kind, writes, world), runs(writes)


def _entries(skel: Skeleton, kind: dict[int, str], writes: torch.Tensor,
             world: int) -> dict[str, M.TensorEntry]:
    writers = runs(writes.t().contiguous())
    out: dict[str, M.TensorEntry] = {}
    for i in sorted(range(len(skel.keys)), key=lambda i: skel.keys[i]):
        key, dtype, shape = skel.keys[i], skel.dtypes[i], skel.shapes[i]
        if kind[i] == "alias":
            out[key] = M.TensorEntry(alias_of=skel.alias[i])
        elif kind[i] == "per_rank":
            out[key] = M.TensorEntry(per_rank=tuple(
                M.TensorMeta(dtype, shape, (), ((r, r + 1),)) for r in range(world)))
        else:
            out[key] = M.TensorEntry(meta=M.TensorMeta(dtype, shape, (), writers[i]))
    return out


__all__ = ["runs", "uniform_plan"]
