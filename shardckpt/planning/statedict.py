"""From live training objects to (tree, tensor leaves) on save, and back into them on load.

Modules and optimizers go through ``torch.distributed.checkpoint.state_dict`` so that FSDP2 and
DDP models are keyed by their plain parameter names (FQNs) and optimizer state is keyed by those
names too, which is what makes a checkpoint loadable at another world size.
"""

from __future__ import annotations

from collections.abc import Iterator
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


def modules_in(state: Any) -> Iterator[torch.nn.Module]:
    """Every ``nn.Module`` held in ``state``'s dicts, lists and tuples (each object once)."""
    seen: set[int] = set()
    stack = [state]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, torch.nn.Module):
            yield v
        elif isinstance(v, dict):
            stack.extend(reversed(list(v.values())))
        elif isinstance(v, (list, tuple)):
            stack.extend(reversed(v))


def _modules_by_param(state: Any, buffers: set[int] | None = None) -> dict[int, torch.nn.Module]:
    """id(parameter) -> the module of the state holding it; with ``buffers``, also collects the
    storage addresses of those modules' buffers into it."""
    found: dict[int, torch.nn.Module] = {}
    for module in modules_in(state):
        for p in module.parameters():
            found.setdefault(id(p), module)
        if buffers is not None:
            for b in module.buffers():
                buffers.add(_storage_ptr(b))
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
        if local.device.type == "meta":
            raise TypeError(f"{path}: a meta tensor holds no data to checkpoint (materialize it "
                            f"first, e.g. module.to_empty(device=...) and its initialization)")
        alias, guarded = None, False
        if local.numel() > 0:
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
