"""Checks of a local tier's paths at construction (collective, every rank raises alike):

- a node's local path must not be, contain or lie inside a persistent location: local
  retention keeps only the newest ``keep`` steps there and would delete persistent checkpoints;
- two nodes must not share one local path (a folder on a shared filesystem, a path without
  ``{node}`` on a network mount): each node's copies would overwrite the other's, and every
  local step would be damaged. Each node's leader writes a probe file named after its node,
  then every rank looks for another node's probe in its own path.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ..storage import Location

PROBE_PREFIX = ".shardckpt-node-"


def _real(location: Location) -> str | None:
    root = getattr(location, "root", None)
    return os.path.realpath(root) if location.is_local and isinstance(root, str) else None


def _overlap(local: Location, persistent: Sequence[Location]) -> str | None:
    mine = _real(local)
    if mine is None:
        return None
    for loc in persistent:
        other = _real(loc)
        if other is None:
            continue
        if mine == other or mine.startswith(other + os.sep) or other.startswith(mine + os.sep):
            return (f"the local tier's path {local.display} overlaps the persistent location "
                    f"{loc.display}: local retention would delete persistent checkpoints; give "
                    f"the local tier a folder of its own (e.g. /dev/shm/RUN/{{node}})")
    return None


def _shared(local: Location, node: str, tokens: Mapping[str, str]) -> str | None:
    """Another node's probe of *this* job (its token, not a stale file of an earlier job in
    which this machine had another node id) in this node's path: the path is shared."""
    seen = []
    for other, token in sorted(tokens.items()):
        if other == node:
            continue
        try:
            found = local.read_file(f"{PROBE_PREFIX}{other}", 4096)
        except FileNotFoundError:
            continue
        if found == token.encode():
            seen.append(other)
    if seen:
        return (f"the local tier's path {local.display} of node {node} is shared with node(s) "
                f"{', '.join(seen)}: each node needs a folder of its own (put {{node}} in the "
                f"path, or use node-local storage)")
    return None


def check_paths(comm: Any, local: Location, node: str, nodes: Sequence[str], leader: bool,
                persistent: Sequence[Location]) -> None:
    """Collective; ``ValueError`` on every rank if any rank found a problem (see the module)."""
    problem: str | None = None
    token = uuid.uuid4().hex
    try:
        problem = _overlap(local, persistent)
        if problem is None and leader and len(set(nodes)) > 1:
            local.makedirs("")
            local.put_record(f"{PROBE_PREFIX}{node}", token.encode())
    except Exception as exc:  # reported below, alike on every rank
        problem = f"the local tier's path {local.display}: {type(exc).__name__}: {exc}"
    gathered = comm.all_gather_json([problem, node, token if leader else None],
                                    "local tier: check paths")
    problems = [g[0] for g in gathered]
    if not any(problems) and len(set(nodes)) > 1:  # every probe is written: look for others'
        tokens = {g[1]: g[2] for g in gathered if g[2] is not None}
        problem = _shared(local, node, tokens)
        problems = comm.all_gather_json(problem, "local tier: shared paths")
    first = next((p for p in problems if p), None)
    if first is not None:
        raise ValueError(first)
