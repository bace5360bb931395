"""From live training objects to (tree, tensor leaves) on save, and back into them on load.

Modules and optimizers go through ``torch.distributed.checkpoint.state_dict`` so that FSDP2 and
DDP models are keyed by their plain parameter names (FQNs) and optimizer state is keyed by those
names too, which is what makes a checkpoint loadable at another world size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint import state_dict as dsd

from ..format.dtypes import dtype_name
from . import tree as T

MISSING: Any = object()


def is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None))


def dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


_BOXES: dict[tuple[Any, ...], tuple[tuple[int, ...], tuple[int, ...], bool]] = {}
"""(global shape, mesh, placements) -> (local shape, offsets, sharded): the same for every
DTensor of one layout on this rank, and slow to compute (most of ``collect``'s time without it)."""


def _dtensor_box(t: Any) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    key = (t.shape, t.device_mesh, t.placements)
    box = _BOXES.get(key)
    if box is None:
        from torch.distributed.tensor import Partial, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if any(isinstance(p, Partial) for p in t.placements):
            raise TypeError("DTensor with a Partial placement: reduce it before checkpointing")
        shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh,
                                                               t.placements)
        box = (tuple(shape), tuple(offsets), any(isinstance(p, Shard) for p in t.placements))
        if len(_BOXES) >= 4096:  # layouts are few; a job creating meshes forever stays bounded
            _BOXES.clear()
        _BOXES[key] = box
    return box


def local_box(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...], bool]:
    """(local data, global shape, offsets of the local piece, sharded?) of a tensor or DTensor."""
    dt = dtensor_type()
    if dt is not None and isinstance(t, dt):
        shape, offsets, sharded = _dtensor_box(t)
        with torch.no_grad():  # without grad mode, to_local() is the local tensor itself
            local = t.to_local()
        if tuple(local.shape) != shape:
            raise ValueError(f"DTensor local shape {tuple(local.shape)} differs from its "
                             f"placement's {shape} (padded shards are not supported)")
        return local, tuple(t.shape), offsets, sharded
    return t, tuple(t.shape), (0,) * t.dim(), False


@dataclass
class TensorLeaf:
    """One tensor of this rank's state: its local data and where that sits in the global tensor."""

    key: str
    data: torch.Tensor
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sharded: bool
    alias_of: str | None = None
    # For lazy snapshots (engine/lazy.py): the tensor as the state holds it (a DTensor's own
    # version counter is the live parameter's; its local tensor's is not), that counter at
    # collect() (None: an inference tensor, which has none), and whether only an optimizer step
    # changes it in place (a parameter or optimizer state, not a buffer or a plain tensor).
    source: torch.Tensor | None = field(default=None, repr=False, compare=False)
    version: int | None = None
    guarded: bool = False

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def _modules_by_param(state: Any, buffers: set[int] | None = None) -> dict[int, torch.nn.Module]:
    """id(parameter) -> the module of the state holding it; with ``buffers``, also collects the
    storage addresses of those modules' buffers into it."""
    found: dict[int, torch.nn.Module] = {}

    def walk(v: Any) -> None:
        if isinstance(v, torch.nn.Module):
            for p in v.parameters():
                found.setdefault(id(p), v)
            if buffers is not None:
                for b in v.buffers():
                    buffers.add(_storage_ptr(b))
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(state)
    return found


def owning_module(optim: torch.optim.Optimizer, modules: dict[int, torch.nn.Module],
                  path: str) -> torch.nn.Module:
    for group in optim.param_groups:
        for p in group["params"]:
            if id(p) in modules:
                return modules[id(p)]
    raise TypeError(f"{path}: optimizer's parameters belong to no nn.Module in the state; put the "
                    f"model in the same state dict so its state can be keyed by parameter name")


@dataclass
class Collected:
    tree: list[Any]
    leaves: list[TensorLeaf] = field(default_factory=list)


def collect(state: dict[str, Any]) -> Collected:
    """Flatten ``state`` into a JSON tree and tensor leaves (no tensor data is copied)."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    buffers: set[int] = set()
    modules = _modules_by_param(state, buffers)
    leaves: list[TensorLeaf] = []
    seen: dict[tuple[Any, ...], str] = {}
    keys: set[str] = set()
    within = ""  # "M" or "O" while encoding a module's or an optimizer's state dict

    def on_leaf(value: Any, path: str) -> list[Any] | None:
        nonlocal within
        if isinstance(value, torch.Tensor):
            return ["T", _add_tensor(value, path)]
        if isinstance(value, torch.nn.Module):
            sd, tag = dsd.get_model_state_dict(value), "M"
        elif isinstance(value, torch.optim.Optimizer):
            sd = dsd.get_optimizer_state_dict(owning_module(value, modules, path), value)
            tag = "O"
        elif is_stateful(value):
            return ["S", T.encode(value.state_dict(), path, on_leaf)]
        else:
            return None
        outer, within = within, tag
        try:
            return [tag, T.encode(sd, path, on_leaf)]
        finally:
            within = outer

    def _add_tensor(value: torch.Tensor, path: str) -> str:
        if path in keys:
            raise ValueError(f"{path or '<root>'}: two tensors of the state map to the same tensor "
                             f"key {path!r} (dict keys that print alike, such as 1 and '1', or an "
                             f"empty key at the top level); rename one of them")
        keys.add(path)
        local, shape, offsets, sharded = local_box(value)
        try:
            name = dtype_name(local.dtype)
        except TypeError as exc:
            raise TypeError(f"{path}: {exc}") from None
        if local.is_sparse or local.layout != torch.strided:
            raise TypeError(f"{path}: only strided (dense) tensors can be checkpointed")
        alias, guarded = None, False
        if local.numel() > 0 and local.device.type != "meta":
            ptr = local.untyped_storage().data_ptr()
            ident = (local.device, ptr, local.storage_offset(), tuple(local.shape),
                     local.stride(), local.dtype, shape, offsets)
            alias = seen.setdefault(ident, path)
            alias = None if alias == path else alias
            guarded = within == "O" or (within == "M" and ptr not in buffers)
        leaves.append(TensorLeaf(path, local.detach(), name, shape, offsets, sharded, alias,
                                 value, None, guarded))
        return path

    with torch.no_grad():
        tree = T.encode(state, "", on_leaf)
    # Version counters are read once everything is collected: collecting an optimizer without
    # state runs a zero step that creates it (torch's state_dict helpers do), after its model's
    # tensors were met. The snapshot is of the state as collect() leaves it.
    for leaf in leaves:
        try:
            leaf.version = leaf.source._version  # type: ignore[union-attr]
        except RuntimeError:  # an inference tensor tracks no version: copied eagerly
            leaf.guarded = False
    return Collected(tree, leaves)


def _storage_ptr(t: torch.Tensor) -> int:
    dt = dtensor_type()
    if dt is not None and isinstance(t, dt):
        with torch.no_grad():
            t = t.to_local()
    if t.device.type == "meta":
        return 0
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without a storage
        return 0


# ----------------------------------------------------------------------------- load

@dataclass
class LoadContext:
    """What :func:`fill` needs: a way to request tensor data and the rank it loads for."""

    request: Callable[[str, torch.Tensor | None, str], torch.Tensor]
    rank: int | None
    world_size: int
    strict: bool
    skipped: list[str] = field(default_factory=list)
    appliers: list[Callable[[], None]] = field(default_factory=list)
    modules: dict[int, torch.nn.Module] = field(default_factory=dict)


def fill(dest: Any, node: Any, path: str, ctx: LoadContext) -> Any:
    """Return the value of ``node``, reusing ``dest`` (tensors loaded in place, containers mutated).

    Tensor data is only *requested* here; objects are re-loaded by ``ctx.appliers`` once every
    requested tensor has arrived.
    """
    where = path or "<root>"
    node = T.check_node(node, where)
    tag = node[0]
    if tag == "R":
        options = node[1] if len(node) == 2 else None
        if not isinstance(options, list) or len(options) != ctx.world_size:
            raise T.CorruptCheckpointError(f"{where}: per-rank node must list {ctx.world_size}")
        if ctx.rank is None:
            ctx.skipped.append(where)
            return dest
        return fill(dest, options[ctx.rank], path, ctx)
    if tag in ("M", "O", "S") and dest is not MISSING:
        return _fill_object(dest, node, path, ctx)
    if tag == "T":
        key = node[1] if len(node) == 2 and isinstance(node[1], str) else None
        if key is None:
            raise T.CorruptCheckpointError(f"{where}: malformed tensor reference")
        return ctx.request(key, dest if isinstance(dest, torch.Tensor) else None, where)
    if tag in ("d", "D") and isinstance(dest, dict):
        stored = _children(node, where)
        if ctx.strict:
            missing = [k for k in dest if k not in stored]
            if missing:
                raise KeyError(f"{where}: not in the checkpoint: {missing[:10]}")
        for k, child in stored.items():
            value = fill(dest.get(k, MISSING), child, T.join(path, k), ctx)
            if value is not MISSING:  # MISSING: per-rank state skipped, nothing to put here
                dest[k] = value
        return dest
    if tag == "l" and isinstance(dest, list) and len(node) == 2 and isinstance(node[1], list) \
            and len(dest) == len(node[1]):
        for i, child in enumerate(node[1]):
            dest[i] = fill(dest[i], child, T.join(path, i), ctx)
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
        sd = fill(dsd.get_model_state_dict(obj), node[1], path, ctx)
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
