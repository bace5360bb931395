"""Plan caching, and plan messages that stay small as the job grows.

A job saves the same structure over and over, so rank 0 plans it once. Between two saves the
*structure* of a rank's leaves (keys, dtypes, shapes, boxes) almost never changes; only the
digests of replicated tensors (which decide what is written once) may. So each rank sends its
leaves only when its structure hash differs from the one rank 0 acknowledged last time, plus the
digests it has (few: FSDP shards carry none), and rank 0 reuses the previous plan whenever every
rank's hash and digests are unchanged.

What a rank sends is compact, because at thousands of ranks rank 0 would otherwise decode
millions of leaves (``docs/scaling.md``):

- its leaves as a *skeleton* (keys, dtypes, shapes, sharding, aliases: the same on every rank
  of an FSDP job, decoded once per distinct skeleton) and its *boxes* (offsets and lengths of
  each leaf) as a zstd-compressed ``int64`` array, never as JSON numbers;
- its state tree's XXH3-128, and the tree itself (zstd-compressed) unless rank 0 acknowledged
  that very tree last time; rank 0 decodes each distinct tree once.

Rank 0's cache and each rank's notion of what rank 0 knows are updated from the same broadcast,
so they cannot drift apart; if they ever did, the save fails on every rank and the next one
sends everything again.
"""

from __future__ import annotations

import base64
import ctypes
import json
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash
import zstandard

from ..format import safejson
from .assign import LeafSpec

MAX_UNPACKED = 1 << 31


def structure_hash(specs: list[LeafSpec]) -> str:
    """XXH3 of a rank's leaves without their digests."""
    return xxhash.xxh3_64_hexdigest(safejson.dumps([s.to_json()[:7] for s in specs]))


def pack(data: bytes) -> str:
    """Bytes as text for a JSON message: zstd, then base64."""
    return base64.b64encode(zstandard.ZstdCompressor(level=1).compress(data)).decode()


def unpack(text: Any, what: str) -> bytes:
    """The bytes :func:`pack` made; ``ValueError`` naming ``what`` if they are malformed."""
    if not isinstance(text, str):
        raise ValueError(f"{what}: malformed plan message")
    try:
        return zstandard.ZstdDecompressor().decompress(base64.b64decode(text, validate=True),
                                                       max_output_size=MAX_UNPACKED)
    except (ValueError, zstandard.ZstdError) as exc:
        raise ValueError(f"{what}: malformed plan message: {exc}") from None


@dataclass(frozen=True)
class Skeleton:
    """The leaves of a rank without their boxes and digests; ``dims``: the boxes' width (the
    most dimensions of any leaf; boxes of fewer are padded with offset 0, length 1)."""

    keys: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    sharded: tuple[bool, ...]
    alias: tuple[str | None, ...]
    dims: int

    @classmethod
    def of(cls, specs: list[LeafSpec]) -> Skeleton:
        return cls(tuple(s.key for s in specs), tuple(s.dtype for s in specs),
                   tuple(s.shape for s in specs), tuple(s.sharded for s in specs),
                   tuple(s.alias_of for s in specs), max((len(s.shape) for s in specs),
                                                         default=0))

    def to_json(self) -> list[Any]:
        return [list(self.keys), list(self.dtypes), [list(s) for s in self.shapes],
                list(self.sharded), list(self.alias), self.dims]

    @classmethod
    def from_json(cls, v: Any) -> Skeleton:
        keys, dtypes, shapes, sharded, alias, dims = v
        n = len(keys)
        if not all(len(x) == n for x in (dtypes, shapes, sharded, alias)) or \
                any(len(s) > dims for s in shapes):
            raise ValueError("malformed plan skeleton")
        return cls(tuple(keys), tuple(dtypes), tuple(tuple(s) for s in shapes),
                   tuple(bool(x) for x in sharded), tuple(alias), int(dims))


def boxes_of(specs: list[LeafSpec], dims: int) -> torch.Tensor:
    """(leaves, 2 * dims) int64: each leaf's offsets, then its lengths, padded to ``dims``."""
    rows = [[*s.offsets, *([0] * (dims - len(s.offsets))), *s.lengths,
             *([1] * (dims - len(s.lengths)))] for s in specs]
    return torch.tensor(rows, dtype=torch.int64).reshape(len(specs), 2 * dims).contiguous()


def compact(specs: list[LeafSpec]) -> dict[str, Any]:
    """A rank's leaves as sent to rank 0: skeleton (and its hash) and packed boxes."""
    skeleton = Skeleton.of(specs)
    text = safejson.dumps(skeleton.to_json())
    boxes = boxes_of(specs, skeleton.dims)
    return {"skeleton": xxhash.xxh3_128_hexdigest(text), "skeleton_z": pack(text),
            "boxes": pack(ctypes.string_at(boxes.data_ptr(), boxes.numel() * 8))}


@dataclass
class Resolved:
    """Every rank's leaves as rank 0 decoded them: a skeleton hash per rank, the skeletons,
    the boxes ``(ranks, leaves, 2 * dims)`` when every rank has the same skeleton (else one
    tensor per rank), and this save's digests."""

    skeleton_of: list[str]
    skeletons: dict[str, Skeleton]
    boxes: list[torch.Tensor]
    digests: list[dict[str, str]]
    all_boxes: torch.Tensor | None = None  # the boxes stacked, when every rank sent them

    def stacked(self) -> torch.Tensor:
        """Every rank's boxes as one ``(ranks, leaves, 2 * dims)`` tensor (one skeleton)."""
        return self.all_boxes if self.all_boxes is not None else torch.stack(self.boxes)

    def uniform(self) -> Skeleton | None:
        first = self.skeleton_of[0] if self.skeleton_of else None
        if first is None or any(h != first for h in self.skeleton_of):
            return None
        return self.skeletons[first]

    def specs(self) -> list[list[LeafSpec]]:
        """Every rank's leaves as :class:`LeafSpec` s (the general planner's input)."""
        out = []
        for rank, h in enumerate(self.skeleton_of):
            s = self.skeletons[h]
            rows = self.boxes[rank].tolist()
            d = self.digests[rank]
            out.append([LeafSpec(s.keys[i], s.dtypes[i], s.shapes[i],
                                 tuple(rows[i][:len(s.shapes[i])]),
                                 tuple(rows[i][s.dims:s.dims + len(s.shapes[i])]),
                                 s.sharded[i], s.alias[i], d.get(str(i)))
                        for i in range(len(s.keys))])
        return out


@dataclass
class PlanCache:
    """One per manager. ``acked``: on every rank, the structure hash rank 0 holds for it. On
    rank 0: every rank's (hash, skeleton hash, boxes), the skeletons and trees by hash, and the
    last plan with the key it was computed for."""

    acked: str | None = None
    tree_sent: str | None = None  # this rank's tree hash in its last plan
    tree_acked: str | None = None  # ... once rank 0 acknowledged that plan
    specs: dict[int, tuple[str, str, torch.Tensor]] = field(default_factory=dict)
    skeletons: dict[str, Skeleton] = field(default_factory=dict)
    trees: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    plan: Any = None

    def outgoing(self, specs: list[LeafSpec], tree: Any = None) -> dict[str, Any]:
        """What this rank sends rank 0: its hash, its digests, its leaves if needed, and its
        tree (compressed, with its hash)."""
        h = structure_hash(specs)
        out = {"hash": h, "digests": {str(i): s.digest for i, s in enumerate(specs) if s.digest},
               "leaves": None if h == self.acked else compact(specs)}
        if tree is not None:
            text = safejson.dumps(tree)
            out["tree_hash"] = self.tree_sent = xxhash.xxh3_128_hexdigest(text)
            if out["tree_hash"] != self.tree_acked:  # rank 0 holds the tree of the last save
                out["tree_z"] = pack(text)
        return out

    def resolve_compact(self, parts: list[dict[str, Any]]) -> Resolved:
        """Rank 0: every rank's leaves, with this save's digests, each distinct skeleton decoded
        once. ``ValueError`` names a rank that sent no leaves for a structure rank 0 does not
        hold, or a malformed message."""
        fresh: dict[int, tuple[str, bytes]] = {}  # rank -> skeleton hash, packed boxes
        skeleton_of: list[str] = []
        for rank, part in enumerate(parts):
            if part["leaves"] is not None:
                fresh[rank] = self._decode(rank, part["leaves"])
                skeleton_of.append(fresh[rank][0])
                continue
            held = self.specs.get(rank)
            if held is None or held[0] != part["hash"]:
                self.specs.pop(rank, None)
                raise ValueError(f"rank {rank} sent no leaves and its structure "
                                 f"{part['hash']} is not cached on rank 0")
            skeleton_of.append(held[1])
        seen = set(skeleton_of)
        for h in set(self.skeletons) - seen:  # only the skeletons of the ranks as they are now
            del self.skeletons[h]
        stacked = None
        if len(seen) == 1 and len(fresh) == len(parts) > 1:  # one tensor; the cache: views
            skeleton = self.skeletons[skeleton_of[0]]
            stacked = torch.empty((len(parts), len(skeleton.keys), 2 * skeleton.dims),
                                  dtype=torch.int64)
            for rank in range(len(parts)):
                raw = fresh.pop(rank)[1]
                ctypes.memmove(stacked[rank].data_ptr(), raw, len(raw))
                self.specs[rank] = (parts[rank]["hash"], skeleton_of[rank], stacked[rank])
        for rank, (h, raw) in fresh.items():
            boxes = torch.frombuffer(bytearray(raw), dtype=torch.int64) if raw else \
                torch.zeros(0, dtype=torch.int64)
            shape = (len(self.skeletons[h].keys), 2 * self.skeletons[h].dims)
            self.specs[rank] = (parts[rank]["hash"], h, boxes.reshape(shape))
        return Resolved(skeleton_of, self.skeletons, [self.specs[r][2] for r in
                                                      range(len(parts))],
                        [p["digests"] for p in parts], stacked)

    def _decode(self, rank: int, leaves: Any) -> tuple[str, bytes]:
        """A rank's skeleton hash (its skeleton decoded, if new) and its boxes' bytes."""
        what = f"rank {rank}'s plan"
        if not isinstance(leaves, dict):
            raise ValueError(f"{what}: malformed leaves")
        h = leaves.get("skeleton")
        if h not in self.skeletons:
            text = unpack(leaves.get("skeleton_z"), what)
            if xxhash.xxh3_128_hexdigest(text) != h:
                raise ValueError(f"{what}: the skeleton does not match its hash")
            self.skeletons[h] = Skeleton.from_json(json.loads(text))
        skeleton = self.skeletons[h]
        raw = unpack(leaves.get("boxes"), what)
        if len(raw) != 16 * skeleton.dims * len(skeleton.keys):
            raise ValueError(f"{what}: {len(raw)} bytes of boxes for {len(skeleton.keys)} "
                             f"leaves of {skeleton.dims} dimensions")
        return h, raw

    def resolve(self, parts: list[dict[str, Any]]) -> list[list[LeafSpec]]:
        """Rank 0: every rank's leaves as :class:`LeafSpec` s, with this save's digests."""
        return self.resolve_compact(parts).specs()

    def trees_of(self, parts: list[dict[str, Any]]) -> list[Any]:
        """Rank 0: every rank's tree, each distinct one decoded once (and the same object for
        every rank that sent it: merging them is then cheap). Keeps this save's trees."""
        kept: dict[str, Any] = {}
        out = []
        for rank, part in enumerate(parts):
            h = part.get("tree_hash")
            if h is None:
                out.append(None)
                continue
            if h not in kept:
                if h in self.trees:
                    kept[h] = self.trees[h]
                elif part.get("tree_z") is None:  # it was acked, and rank 0 lost it: all resend
                    self.trees = {}
                    raise ValueError(f"rank {rank} sent no tree and its tree {h} is not cached "
                                     f"on rank 0")
                else:
                    text = unpack(part.get("tree_z"), f"rank {rank}'s tree")
                    if xxhash.xxh3_128_hexdigest(text) != h:
                        self.trees = {}
                        raise ValueError(f"rank {rank}'s tree does not match its hash")
                    kept[h] = json.loads(text)
            out.append(kept[h])
        self.trees = kept
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
        self.tree_acked = self.tree_sent if known else None


