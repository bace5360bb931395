"""Rebuild the model a checkpoint was saved from: ``--model MOD:FN``, FSDP2 sharding, strict load.

``MOD`` is a dotted module (looked up on ``sys.path`` plus the current directory, as ``python -m``
does) or a path to a ``.py`` file; ``FN`` (dotted attributes allowed) is called without arguments
and must return an ``nn.Module``. Problems with the spec or the factory raise
:class:`FactoryError`, which the CLI reports as a usage error.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import EXIT_USAGE, CorruptCheckpointError, IncompleteCheckpointError
from .phases import EXIT_INTEGRITY, Check


class FactoryError(ValueError):
    """``--model MOD:FN`` is malformed, cannot be imported, or does not build an nn.Module."""


def parse_spec(spec: str) -> tuple[str, str]:
    mod, sep, fn = spec.rpartition(":")
    if not sep or not mod or not fn or not all(p.isidentifier() for p in fn.split(".")):
        raise FactoryError(f"--model {spec!r}: expected MODULE:FUNCTION (e.g. "
                           f"'mypkg.models:build' or 'path/to/model.py:build')")
    return mod, fn


def _import(mod: str, spec: str) -> Any:
    if mod.endswith(".py") or os.sep in mod or "/" in mod:
        path = os.path.abspath(mod)
        if not os.path.isfile(path):
            raise FactoryError(f"--model {spec!r}: no such file {mod!r}")
        name = "shardckpt_model_" + hashlib.sha1(path.encode()).hexdigest()[:12]
        if name in sys.modules:
            return sys.modules[name]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise FactoryError(f"--model {spec!r}: cannot import {mod!r}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    if not all(p.isidentifier() for p in mod.split(".")):
        raise FactoryError(f"--model {spec!r}: {mod!r} is neither a module name nor a .py file")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # as `python -m` would; console scripts leave it out
    return importlib.import_module(mod)


def load_factory(spec: str) -> Callable[[], Any]:
    """The callable named by ``spec``, imported (nothing is called yet)."""
    mod, fn = parse_spec(spec)
    try:
        target = _import(mod, spec)
    except FactoryError:
        raise
    except ModuleNotFoundError as exc:
        raise FactoryError(f"--model {spec!r}: no module named {exc.name!r}") from None
    except Exception as exc:
        raise FactoryError(f"--model {spec!r}: importing {mod!r} raised "
                           f"{type(exc).__name__}: {exc}") from None
    for part in fn.split("."):
        if not hasattr(target, part):
            raise FactoryError(f"--model {spec!r}: {mod!r} has no attribute {fn!r}")
        target = getattr(target, part)
    if not callable(target):
        raise FactoryError(f"--model {spec!r}: {fn!r} is not callable")
    return target


def call_factory(factory: Callable[[], Any], spec: str) -> torch.nn.Module:
    try:
        model = factory()
    except Exception as exc:
        raise FactoryError(f"--model {spec!r}: calling it raised {type(exc).__name__}: "
                           f"{exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise FactoryError(f"--model {spec!r} returned a {type(model).__name__}, not an "
                           "nn.Module")
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard(model: torch.nn.Module) -> int:
    """FSDP2 ``fully_shard`` each direct child holding parameters (the items of a ModuleList or
    ModuleDict child, which has no forward of its own), then the root. Children that share a
    parameter with another child (tied weights) stay with the root. Returns the units sharded."""
    from torch.distributed.fsdp import fully_shard

    units: list[torch.nn.Module] = []
    for child in model.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            units += list(child.children())
        else:
            units.append(child)
    owners: dict[int, int] = {}
    for i, unit in enumerate(units):
        for p in unit.parameters():
            owners[id(p)] = i if owners.get(id(p), i) == i else -1
    own = {id(p) for p in model.parameters(recurse=False)}
    count = 0
    for i, unit in enumerate(units):
        params = [id(p) for p in unit.parameters()]
        if params and all(owners[p] == i and p not in own for p in params):
            fully_shard(unit)
            count += 1
    fully_shard(model)
    return count + 1


def reassemble(factory: Callable[[], Any], spec: str, module_name: str, root: str,
               replicas: Sequence[str], step: int, world_size: int, device: torch.device,
               agree: Callable[[Callable[[], Any], str], Any]) -> tuple[Check, Any]:
    """Collective. Build the model, shard it at ``world_size > 1`` (unless the factory did), and
    load ``state[module_name]`` of ``step`` into it with ``strict=True``. ``agree(fn, what)``
    runs ``fn`` on every rank and raises on all of them if it raised on any."""
    from ..manager import CheckpointManager

    def build() -> tuple[torch.nn.Module, str]:
        model = call_factory(factory, spec).to(device)
        if world_size == 1:
            return model, "unsharded"
        if is_sharded(model):
            return model, "sharded by the factory"
        return model, f"FSDP2 fully_shard on {shard(model)} units"

    model, how = agree(build, "verify: build model")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with CheckpointManager(root, replicas=replicas) as mgr:
                mgr.load({module_name: model}, step=step, strict=True)
    except (CorruptCheckpointError, IncompleteCheckpointError) as exc:
        return Check("reassembly", False, f"loading {module_name!r} failed: {exc}",
                     code=EXIT_INTEGRITY), None
    except Exception as exc:
        # the replay cannot start: a usage error (exit 64), not a verdict on the checkpoint
        return Check("reassembly", False, f"{spec} does not match {module_name!r} of the "
                     f"checkpoint (strict load): {type(exc).__name__}: {exc}"[:1000],
                     code=EXIT_USAGE), None
    notes = [str(w.message) for w in caught if "per-rank state" in str(w.message)]
    nparams = sum(p.numel() for p in model.parameters())
    return Check("reassembly", True, f"{spec} built ({how}, {nparams:,} parameters) and "
                 f"loaded {module_name!r} strictly", data={"module": module_name,
                                                           "sharding": how, "notes": notes}
                 ), model
