"""The non-tensor structure of a state as a JSON tree, with tensors pulled out as leaves.

Each node is a small JSON list whose first element is a tag::

    ["d", {key: node}]           dict with str keys       ["D", [[key, node], ...]]  other keys
    ["l", [node, ...]]           list                     ["t", [node, ...]]         tuple
    ["T", "tensor/key"]          tensor reference         ["n"]                      None
    ["i", 3] ["b", true] ["s", "x"] ["f", "0x1.8p+1"]     scalars (floats as exact hex, nan/inf too)
    ["M", node] ["O", node] ["S", node]   a module, an optimizer (by parameter name), a stateful
    ["R", [node_rank0, node_rank1, ...]]  a subtree that differs between ranks

Values are rebuilt from nodes by :func:`shardckpt.planning.statedict.fill`.

Tensor keys are key paths joined with "/" (``~`` and ``/`` inside a key escaped as in RFC 6901),
so ``state["model"]["layers.0.weight"]`` is stored as ``model/layers.0.weight``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..errors import CorruptCheckpointError

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
    """One tree for all ranks: equal parts shared, differing subtrees as ``["R", [...]]``."""
    first = nodes[0]
    if all(n == first for n in nodes[1:]):
        return first
    tags = {n[0] if isinstance(n, list) and n else None for n in nodes}
    if len(tags) == 1 and len(first) == 2:
        tag = first[0]
        if tag == "d" and all(n[1].keys() == first[1].keys() for n in nodes):
            return ["d", {k: merge_ranks([n[1][k] for n in nodes]) for k in first[1]}]
        if tag in ("l", "t") and all(len(n[1]) == len(first[1]) for n in nodes):
            return [tag, [merge_ranks([n[1][i] for n in nodes]) for i in range(len(first[1]))]]
        if tag in ("M", "O", "S"):
            return [tag, merge_ranks([n[1] for n in nodes])]
    return ["R", nodes]


def float_equal(a: float, b: float) -> bool:
    """Bitwise equality for floats (NaN equals NaN, -0.0 differs from 0.0)."""
    return a.hex() == b.hex() or (math.isnan(a) and math.isnan(b))
