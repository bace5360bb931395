"""The non-tensor structure of a state as a JSON tree, with tensors pulled out as leaves.

Each node is a small JSON list whose first element is a tag::

    ["d", {key: node}]           dict with str keys       ["D", [[key, node], ...]]  other keys
    ["l", [node, ...]]           list                     ["t", [node, ...]]         tuple
    ["T", "tensor/key"]          tensor reference         ["n"]                      None
    ["i", 3] ["b", true] ["s", "x"] ["f", "0x1.8p+1"]     scalars (floats as exact hex, nan/inf too)
    ["M", node] ["O", node] ["S", node]   a module, an optimizer (by parameter name), a stateful
    ["R", [node_rank0, node_rank1, ...]]  a subtree that differs between ranks
    ["P", [[runs, node], ...]]            a dict entry that only some ranks hold (rank-local
                                          state): each distinct value with the ranks that
                                          saved it, as sorted [start, stop) runs

Dicts are merged key by key into the union of every rank's keys, so a rank-specific key
(``{f"dp_rank_{rank}": ...}``) is kept, under a ``P`` node naming the ranks that saved it.
Values are rebuilt from nodes by :func:`shardckpt.planning.restore.fill`.

Tensor keys are key paths joined with "/" (``~`` and ``/`` inside a key escaped as in RFC 6901),
so ``state["model"]["layers.0.weight"]`` is stored as ``model/layers.0.weight``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import CorruptCheckpointError
from ..format.manifest import to_ranges

SCALAR_KEY_TYPES = (str, int, float, bool, type(None))


def escape(part: Any) -> str:
    return str(part).replace("~", "~0").replace("/", "~1")


def join(path: str, part: Any) -> str:
    return f"{path}/{escape(part)}" if path else escape(part)


def encode_scalar(value: Any, path: str) -> list[Any]:
    if value is None:
        return ["n"]
    if type(value) is bool:
        return ["b", value]
    if type(value) is int:
        try:
            str(value)  # JSON needs the digits, and CPython caps their number
        except ValueError as exc:
            raise ValueError(f"{path or '<root>'}: integer cannot be stored: {exc}") from None
        return ["i", value]
    if type(value) is float:
        return ["f", value.hex()]
    if type(value) is str:
        return ["s", check_text(value, path)]
    raise TypeError(f"{path or '<root>'}: cannot checkpoint a value of type "
                    f"{type(value).__module__}.{type(value).__qualname__}")


def check_text(value: str, path: str) -> str:
    """``value``, if UTF-8 can encode it (a lone surrogate cannot, so JSON could not hold it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{path or '<root>'}: string {value[:40]!r} is not valid UTF-8 text "
                         f"({exc.reason})") from None
    return value


def decode_scalar(node: list[Any], where: str) -> Any:
    tag = node[0]
    if tag == "n" and len(node) == 1:
        return None
    if len(node) != 2:
        raise CorruptCheckpointError(f"{where}: malformed node {str(node)[:80]}")
    value = node[1]
    if tag == "b" and type(value) is bool:
        return value
    if tag == "i" and type(value) is int:
        return value
    if tag == "s" and isinstance(value, str):
        return value
    if tag == "f" and isinstance(value, str) and len(value) < 40:
        try:
            return float.fromhex(value)
        except ValueError:
            pass
    raise CorruptCheckpointError(f"{where}: malformed {tag!r} node {str(node)[:80]}")


def encode(value: Any, path: str, on_leaf: Callable[[Any, str], list[Any] | None]) -> list[Any]:
    """Encode ``value``; ``on_leaf(value, path)`` returns a node for tensors/objects, else None."""
    node = on_leaf(value, path)
    if node is not None:
        return node
    if isinstance(value, dict):
        if all(type(k) is str for k in value):
            return ["d", {check_text(k, path): encode(v, join(path, k), on_leaf)
                          for k, v in value.items()}]
        items = []
        for k, v in value.items():
            if not isinstance(k, SCALAR_KEY_TYPES):
                raise TypeError(f"{path or '<root>'}: dict key {k!r} is not a JSON scalar")
            items.append([encode_scalar(k, path), encode(v, join(path, k), on_leaf)])
        return ["D", items]
    if isinstance(value, list):
        return ["l", [encode(v, join(path, i), on_leaf) for i, v in enumerate(value)]]
    if isinstance(value, tuple):
        return ["t", [encode(v, join(path, i), on_leaf) for i, v in enumerate(value)]]
    return encode_scalar(value, path)


def check_node(node: Any, where: str) -> list[Any]:
    if not isinstance(node, list) or not node or not isinstance(node[0], str):
        raise CorruptCheckpointError(f"{where}: malformed tree node {str(node)[:80]}")
    return node


def merge_ranks(nodes: list[Any]) -> Any:
    """One tree for all ranks: equal parts shared, dicts as the union of the ranks' keys (an
    entry some ranks lack as ``["P", ...]``), other differing subtrees as ``["R", [...]]``."""
    return _merge(len(nodes), list(enumerate(nodes)))


def _canon(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def _merge(world: int, held: list[tuple[int, Any]]) -> Any:
    """Merge the nodes of the ranks in ``held`` (rank, node); ranks missing from it have no
    value here. Linear in the total size of the nodes, so a rank-specific key per rank costs
    O(world), not O(world**2)."""
    if len(held) < world:
        return _partial(held)
    first = held[0][1]
    if all(n == first for _, n in held[1:]):
        return first
    nodes = [n for _, n in held]
    tags = {n[0] if isinstance(n, list) and n else None for n in nodes}
    if len(tags) == 1 and all(len(n) == 2 for n in nodes):
        tag = first[0]
        if tag == "d" and all(isinstance(n[1], dict) for n in nodes):
            children: dict[str, list[tuple[int, Any]]] = {}
            for rank, n in held:
                for k, v in n[1].items():
                    children.setdefault(k, []).append((rank, v))
            return ["d", {k: _merge(world, c) for k, c in children.items()}]
        if tag == "D" and all(isinstance(n[1], list) for n in nodes):
            keys: dict[str, Any] = {}
            items: dict[str, list[tuple[int, Any]]] = {}
            for rank, n in held:
                for keynode, v in n[1]:
                    c = _canon(keynode)
                    keys.setdefault(c, keynode)
                    items.setdefault(c, []).append((rank, v))
            return ["D", [[keys[c], _merge(world, v)] for c, v in items.items()]]
        if tag in ("l", "t") and all(len(n[1]) == len(first[1]) for n in nodes):
            return [tag, [_merge(world, [(r, n[1][i]) for r, n in held])
                          for i in range(len(first[1]))]]
        if tag in ("M", "O", "S"):
            return [tag, _merge(world, [(r, n[1]) for r, n in held])]
    return ["R", nodes]


def _partial(held: list[tuple[int, Any]]) -> list[Any]:
    """A ``P`` node: each distinct value once, with the runs of ranks that saved it."""
    groups: dict[str, tuple[list[int], Any]] = {}
    for rank, node in held:
        groups.setdefault(_canon(node), ([], node))[0].append(rank)
    return ["P", [[[list(r) for r in to_ranges(ranks)], node] for ranks, node in groups.values()]]


def partial_groups(node: list[Any], where: str, world: int) -> list[tuple[list[int], Any]]:
    """The (ranks, node) groups of a ``P`` node, validated: runs inside the world, no rank in
    two groups, at least one group."""
    body = node[1] if len(node) == 2 else None
    if not isinstance(body, list) or not body:
        raise CorruptCheckpointError(f"{where}: malformed rank-local node")
    seen: set[int] = set()
    out = []
    for group in body:
        if not isinstance(group, list) or len(group) != 2 or not isinstance(group[0], list) \
                or not group[0]:
            raise CorruptCheckpointError(f"{where}: malformed rank-local group")
        ranks: list[int] = []
        for run in group[0]:
            if not (isinstance(run, list) and len(run) == 2 and all(type(x) is int for x in run)
                    and 0 <= run[0] < run[1] <= world):
                raise CorruptCheckpointError(f"{where}: rank run {str(run)[:40]} is not inside "
                                             f"the world of {world} ranks")
            ranks.extend(range(run[0], run[1]))
        if seen.intersection(ranks):
            raise CorruptCheckpointError(f"{where}: a rank appears in two rank-local groups")
        seen.update(ranks)
        out.append((ranks, group[1]))
    return out


def rank_local(node: Any, world: int, path: str = "") -> Iterator[tuple[str, list[int], bool]]:
    """Every key path whose value not all ranks share: (path, ranks that saved it, whether
    those ranks' values differ). Rank-specific keys come from ``P`` nodes, per-rank values
    from ``R`` nodes (every rank saved one)."""
    if not isinstance(node, list) or len(node) != 2 or not isinstance(node[0], str):
        return
    tag, body = node
    where = path or "<root>"
    if tag == "P":
        groups = partial_groups(node, where, world)
        yield where, sorted(r for ranks, _ in groups for r in ranks), len(groups) > 1
    elif tag == "R":
        yield where, list(range(world)), True
    elif tag == "d" and isinstance(body, dict):
        for k, child in body.items():
            yield from rank_local(child, world, join(path, k))
    elif tag == "D" and isinstance(body, list):
        for item in body:
            if isinstance(item, list) and len(item) == 2 and isinstance(item[0], list) \
                    and item[0]:
                key = item[0][1] if len(item[0]) == 2 else None
                yield from rank_local(item[1], world, join(path, key))
    elif tag in ("l", "t") and isinstance(body, list):
        for i, child in enumerate(body):
            yield from rank_local(child, world, join(path, i))
    elif tag in ("M", "O", "S"):
        yield from rank_local(body, world, path)


def has_tensor(node: Any) -> bool:
    """Whether the subtree refers to any tensor."""
    if not isinstance(node, list) or not node:
        return False
    if node[0] == "T":
        return True
    return any(has_tensor(c) for c in _subnodes(node))


def _subnodes(node: list[Any]) -> list[Any]:
    body = node[1] if len(node) == 2 else None
    tag = node[0]
    if tag == "d" and isinstance(body, dict):
        return list(body.values())
    if tag in ("l", "t", "R") and isinstance(body, list):
        return body
    if tag in ("D", "P") and isinstance(body, list):
        return [item[1] for item in body if isinstance(item, list) and len(item) == 2]
    if tag in ("M", "O", "S"):
        return [body]
    return []


def float_equal(a: float, b: float) -> bool:
    """Bitwise equality for floats (NaN equals NaN, -0.0 differs from 0.0)."""
    return a.hex() == b.hex() or (math.isnan(a) and math.isnan(b))
