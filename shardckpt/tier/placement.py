"""Where the node-local tier keeps each rank's files: node ids, the (node, rank) map, and which
nodes hold a copy of each rank's files. Pure functions of small frozen records; no torch, no I/O.

* A rank's node id is ``LocalTier(node=...)`` when given, else torchrun's ``GROUP_RANK``, else
  Slurm's ``SLURM_NODEID``, else the host name (distinct machines never share one).
* Every rank all-gathers its node id at construction: :class:`NodeMap` is the result, rank order.
  Nodes are ordered by their lowest rank, so every rank derives the same order from the same map.
* Rank ``r``'s files live on its own node and on the next ``copies - 1`` distinct nodes of that
  order (cyclically): other failure domains, however many ranks a node runs.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NODE_ENV = ("GROUP_RANK", "SLURM_NODEID")

SINGLE_NODE_WARNING = ("the local tier runs on a single node: its steps survive a restart of the "
                       "processes, not the loss of the node (the persistent tier is the only "
                       "copy that does)")


def check_node_id(node: object, where: str = "node") -> str:
    """A node id is a short path-safe string (it names a directory through ``{node}``)."""
    if isinstance(node, int) and not isinstance(node, bool):
        node = str(node)
    if not isinstance(node, str) or not NODE_ID.fullmatch(node):
        raise ValueError(f"{where}: a node id is 1-128 characters of [A-Za-z0-9._-], not "
                         f"starting with '.', '_' or '-'; got {node!r}")
    return node


def node_id(explicit: object = None, env: Mapping[str, str] | None = None) -> str:
    """This process's node id (see the module for the order of the sources)."""
    if explicit is not None:
        return check_node_id(explicit, "LocalTier(node=...)")
    env = os.environ if env is None else env
    for name in NODE_ENV:
        value = env.get(name, "").strip()
        if value:
            return check_node_id(value, f"${name}")
    return check_node_id(socket.gethostname().split(".")[0] or "0", "the host name")


@dataclass(frozen=True)
class NodeMap:
    """``nodes[r]`` is the node id of rank ``r`` (rank order of the tier's process group)."""

    nodes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("a node map needs at least one rank")
        for r, n in enumerate(self.nodes):
            check_node_id(n, f"rank {r}'s node id")

    @property
    def world_size(self) -> int:
        return len(self.nodes)

    @cached_property
    def order(self) -> tuple[str, ...]:
        """The distinct nodes, ordered by their lowest rank."""
        return tuple(dict.fromkeys(self.nodes))

    def ranks_of(self, node: str) -> tuple[int, ...]:
        return tuple(r for r, n in enumerate(self.nodes) if n == node)

    def leader(self, node: str) -> int:
        """The node's local rank 0: its lowest rank, which commits the node's copy of a step."""
        ranks = self.ranks_of(node)
        if not ranks:
            raise KeyError(f"node {node!r} runs no rank of this job")
        return ranks[0]

    def holders(self, rank: int, copies: int) -> tuple[str, ...]:
        """The nodes holding ``rank``'s files: its own first, then the next ``copies - 1``."""
        check_copies(copies, len(self.order))
        order = self.order
        start = order.index(self.nodes[rank])
        return tuple(order[(start + i) % len(order)] for i in range(copies))

    def held_by(self, node: str, copies: int) -> tuple[int, ...]:
        """The ranks whose files ``node`` holds (its own ranks and the ones it copies)."""
        return tuple(r for r in range(self.world_size) if node in self.holders(r, copies))

    def receiver(self, rank: int, node: str) -> int:
        """The rank of ``node`` that receives ``rank``'s files: the one at the same position
        among its node's ranks (modulo), so the copies spread over the peer node's ranks."""
        here = self.ranks_of(self.nodes[rank]).index(rank)
        there = self.ranks_of(node)
        return there[here % len(there)]

    def pushes(self, copies: int) -> tuple[tuple[int, int], ...]:
        """Every (sender, receiver) pair of a save: each rank to one rank of each peer node."""
        return tuple((r, self.receiver(r, node)) for r in range(self.world_size)
                     for node in self.holders(r, copies)[1:])

    def to_json(self) -> list[str]:
        return list(self.nodes)

    @classmethod
    def from_json(cls, value: Sequence[object]) -> NodeMap:
        return cls(tuple(check_node_id(v, f"rank {r}'s node id") for r, v in enumerate(value)))


def check_copies(copies: object, nodes: int) -> int:
    """``copies`` is an int in [1, nodes]: more copies than nodes cannot be placed apart."""
    if type(copies) is not int or copies < 1:
        raise ValueError(f"copies must be a positive int, got {copies!r}")
    if copies > nodes:
        raise ValueError(f"copies={copies} needs at least {copies} nodes, but this job runs on "
                         f"{nodes}: each copy of a rank's files must be on a different node")
    return copies


def placement_warnings(node_map: NodeMap, copies: int) -> list[str]:
    """What a user should hear about this placement (raises ``ValueError`` if impossible)."""
    check_copies(copies, len(node_map.order))
    return [SINGLE_NODE_WARNING] if len(node_map.order) == 1 else []
