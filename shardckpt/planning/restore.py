"""Back from (tree, tensors) into live training objects on load: tensors filled in place,
modules, optimizers and other stateful objects restored through their own ``load_state_dict``.
The save side is :mod:`.statedict`."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch.distributed.checkpoint import state_dict as dsd

from . import tree as T
from .statedict import (
    MISSING,
    _modules_by_param,
    is_stateful,
    owning_module,
)


@dataclass
class LoadContext:
    """What :func:`fill` needs: a way to request tensor data and the rank it loads for."""

    request: Callable[[str, torch.Tensor | None, str], torch.Tensor]
    rank: int | None  # the loading rank when the world size is the saving one, else None
    world_size: int  # the saving world size
    strict: bool
    skipped: list[str] = field(default_factory=list)
    appliers: list[Callable[[], None]] = field(default_factory=list)
    modules: dict[int, torch.nn.Module] = field(default_factory=dict)
    caller_rank: int = 0  # the loading rank, for messages
    in_module: int = 0  # depth of nn.Module states around the node being filled
    # True (a load): values are put into the caller's containers by the appliers, after every
    # rank's plan was checked; False: at once
    defer: bool = False


def fill(dest: Any, node: Any, path: str, ctx: LoadContext) -> Any:
    """Return the value of ``node``, reusing ``dest`` (tensors loaded in place, containers mutated).

    Tensor data is only *requested* here; objects are re-loaded by ``ctx.appliers`` once every
    requested tensor has arrived, and with ``ctx.defer`` values other than tensors filled in
    place are put into the caller's containers by them too: planning then changes nothing.

    Rank-local entries (``P`` nodes) go to the ranks that saved them, and to any rank that asks
    for them (``dest`` holds the key) when that is unambiguous: one value, whoever saved it.
    """
    where = path or "<root>"
    node = T.check_node(node, where)
    tag = node[0]
    if tag == "R":
        options = node[1] if len(node) == 2 else None
        if not isinstance(options, list) or len(options) != ctx.world_size:
            raise T.CorruptCheckpointError(f"{where}: per-rank node must list {ctx.world_size}")
        if ctx.rank is None:
            return _skip(dest, node, where, ctx)
        return fill(dest, options[ctx.rank], path, ctx)
    if tag == "P":
        groups = T.partial_groups(node, where, ctx.world_size)
        own = [n for ranks, n in groups if ctx.rank in ranks]
        if own:
            return fill(dest, own[0], path, ctx)
        if dest is MISSING:  # saved by other ranks only, and not asked for here
            return MISSING
        if len(groups) == 1:
            return fill(dest, groups[0][1], path, ctx)
        return _skip(dest, node, where, ctx)
    if tag in ("M", "O", "S") and dest is not MISSING:
        return _fill_object(dest, node, path, ctx)
    if tag in ("d", "D") and dest is not MISSING and not isinstance(dest, dict) and \
            is_stateful(dest):  # a state_dict saved as a plain dict (an imported DCP, say)
        return _fill_object(dest, ["S", node], path, ctx)
    if tag == "T":
        key = node[1] if len(node) == 2 and isinstance(node[1], str) else None
        if key is None:
            raise T.CorruptCheckpointError(f"{where}: malformed tensor reference")
        return ctx.request(key, dest if isinstance(dest, torch.Tensor) else None, where)
    if tag in ("d", "D") and isinstance(dest, dict):
        stored = _children(node, where)
        if ctx.strict:
            missing = [T.join(path, k) for k in dest if k not in stored]
            if missing:
                raise KeyError(f"{where}: rank {ctx.caller_rank} asks for keys that no rank "
                               f"saved (not in the checkpoint): {_listed(missing)}")
        for k, child in stored.items():
            old = dest.get(k, MISSING)
            value = fill(old, child, T.join(path, k), ctx)
            if value is not MISSING:  # MISSING: per-rank state skipped, nothing to put here
                _put(ctx, dest, k, old, value)
        return dest
    if tag == "l" and isinstance(dest, list) and len(node) == 2 and isinstance(node[1], list) \
            and len(dest) == len(node[1]):
        for i, child in enumerate(node[1]):
            _put(ctx, dest, i, dest[i], fill(dest[i], child, T.join(path, i), ctx))
        return dest
    if tag in ("l", "t") and len(node) == 2 and isinstance(node[1], list):
        olds = dest if isinstance(dest, (list, tuple)) and len(dest) == len(node[1]) else None
        items = [fill(olds[i] if olds is not None else MISSING, c, T.join(path, i), ctx)
                 for i, c in enumerate(node[1])]
        items = [None if v is MISSING else v for v in items]
        return items if tag == "l" else tuple(items)
    if tag in ("d", "D"):
        built = {k: fill(MISSING, c, T.join(path, k), ctx) for k, c in
                 _children(node, where).items()}
        return {k: v for k, v in built.items() if v is not MISSING}
    if tag in ("M", "O", "S"):
        return fill(MISSING, node[1] if len(node) == 2 else None, path, ctx)
    return T.decode_scalar(node, where)


def _put(ctx: LoadContext, dest: Any, key: Any, old: Any, value: Any) -> None:
    """``dest[key] = value``; with ``ctx.defer``, by the appliers: nothing of the caller's state
    changes before every rank has planned its load (a tensor filled in place is there already)."""
    if value is old:
        return
    if ctx.defer:
        ctx.appliers.append(partial(operator.setitem, dest, key, value))
    else:
        dest[key] = value


def _skip(dest: Any, node: list[Any], where: str, ctx: LoadContext) -> Any:
    """Leave ``dest`` as it is: the ranks that saved this node differ, and this rank has no
    copy of its own. Never for a tensor of a module the caller asked for, when strict."""
    if ctx.strict and ctx.in_module and dest is not MISSING and T.has_tensor(node):
        raise ValueError(f"{where}: differs between the ranks that saved it (world size "
                         f"{ctx.world_size}) and rank {ctx.caller_rank} has no copy of its own; a "
                         f"strict load never leaves a module tensor unrestored (strict=False "
                         f"keeps its value)")
    ctx.skipped.append(where)
    return dest


def _listed(keys: list[str], limit: int = 20) -> str:
    return str(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def _check_model_keys(sd: dict[str, Any], node: Any, where: str, ctx: LoadContext) -> None:
    """Strict: the model's keys are exactly those the checkpoint offers this rank. One
    ``KeyError`` lists both the missing and the unexpected keys."""
    if not (isinstance(node, list) and node and node[0] in ("d", "D")):
        return
    stored = _children(node, where)

    def offered(child: Any) -> bool:  # a rank-local entry goes only to the ranks that saved it
        if not (isinstance(child, list) and child and child[0] == "P"):
            return True
        return any(ctx.rank in ranks for ranks, _ in T.partial_groups(child, where,
                                                                       ctx.world_size))

    missing = [k for k in sd if k not in stored]
    unexpected = [k for k, child in stored.items() if k not in sd and offered(child)]
    if missing or unexpected:
        raise KeyError(f"{where}: the model does not match the checkpoint (rank "
                       f"{ctx.caller_rank}): missing keys (in the model, not in the checkpoint): "
                       f"{_listed(missing)}; unexpected keys (in the checkpoint, not in the "
                       f"model): {_listed(unexpected)}")


def _children(node: list[Any], where: str) -> dict[Any, Any]:
    if node[0] == "d":
        if len(node) != 2 or not isinstance(node[1], dict):
            raise T.CorruptCheckpointError(f"{where}: malformed dict node")
        return node[1]
    out: dict[Any, Any] = {}
    if len(node) != 2 or not isinstance(node[1], list):
        raise T.CorruptCheckpointError(f"{where}: malformed dict node")
    for item in node[1]:
        if not isinstance(item, list) or len(item) != 2:
            raise T.CorruptCheckpointError(f"{where}: malformed dict item")
        key = T.decode_scalar(T.check_node(item[0], where), where)
        if key in out:
            raise T.CorruptCheckpointError(f"{where}: duplicate dict key {key!r}")
        out[key] = item[1]
    return out


def _fill_object(obj: Any, node: list[Any], path: str, ctx: LoadContext) -> Any:
    where = path or "<root>"
    tag = node[0]
    kinds = {"M": torch.nn.Module, "O": torch.optim.Optimizer}
    if tag in kinds and not isinstance(obj, kinds[tag]):
        raise TypeError(f"{where}: the checkpoint holds a {kinds[tag].__name__} state here, the "
                        f"given state holds a {type(obj).__name__}")
    if tag == "S" and not is_stateful(obj):
        raise TypeError(f"{where}: the checkpoint holds an object's state_dict here, the given "
                        f"{type(obj).__name__} has no load_state_dict")
    if isinstance(obj, torch.nn.Module):
        sd = dsd.get_model_state_dict(obj)
        if ctx.strict:
            _check_model_keys(sd, node[1], where, ctx)
        ctx.in_module += 1
        try:
            sd = fill(sd, node[1], path, ctx)
        finally:
            ctx.in_module -= 1
        options = dsd.StateDictOptions(strict=ctx.strict)
        ctx.appliers.append(lambda: dsd.set_model_state_dict(obj, sd, options=options))
    elif isinstance(obj, torch.optim.Optimizer):
        model = owning_module(obj, ctx.modules, path)
        sd = fill(dsd.get_optimizer_state_dict(model, obj), node[1], path, ctx)
        ctx.appliers.append(lambda: dsd.set_optimizer_state_dict(model, obj, sd))
    else:
        sd = fill(obj.state_dict(), node[1], path, ctx)
        ctx.appliers.append(lambda: obj.load_state_dict(sd))
    return obj


def restore(state: dict[str, Any], tree: Any, ctx: LoadContext) -> None:
    """Fill ``state`` in place from ``tree``; data arrives through ``ctx.request``."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    ctx.modules = _modules_by_param(state)
    node = T.check_node(tree, "<root>")
    if node[0] != "d" or len(node) != 2 or not isinstance(node[1], dict):
        raise T.CorruptCheckpointError("<root>: the stored state is not a dict")
    # Top level: restore what the caller asked for (e.g. only the model), nothing more.
    fill(state, ["d", {k: v for k, v in node[1].items() if k in state}], "", ctx)


def rebuild(node: Any, path: str, tensor: Callable[[str, str], Any], rank: int | None,
            world_size: int) -> Any:
    """Plain Python values from ``node`` (no destination): each tensor from
    ``tensor(key, where)``; per-rank parts only when ``rank`` is given."""
    ctx = LoadContext(lambda key, _dest, where: tensor(key, where), rank, world_size, False)
    value = fill(MISSING, node, path, ctx)
    return None if value is MISSING else value
