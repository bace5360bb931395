"""The torchtitan backend's own Config fields: their checks, and the
:class:`~shardckpt.CheckpointManager` keyword arguments they become
(:mod:`shardckpt.integrations.torchtitan` uses both).

Every check runs when the Config is built (``__post_init__``), so a bad value stops the job
before any rank trains; each raises :class:`TitanConfigError` naming ``checkpoint.FIELD``.
What needs the ranks or the filesystem (the trusted keys' PEM files, the local tier's node
paths) is checked when the manager is built, with the same error.

``async_mode``, the field of torchtitan's DCP backend (same values and default), maps to the
manager's ``async_save`` (:data:`ASYNC_MODES`):
``"disabled"`` (torchtitan's default) saves block until committed; ``"async"`` and
``"async_with_pinned_mem"`` return once the state is snapshotted and write in the background
(shardckpt's snapshot copies CUDA tensors into pinned, reused host buffers either way).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from ..engine.failpolicy import check_on_error
from ..engine.incremental import incremental_options
from ..errors import ShardckptError
from ..policy import RetentionPolicy
from ..tier.config import LocalTier
from ..tier.placement import check_node_id

# torchtitan's async_mode -> CheckpointManager(async_save=...)
ASYNC_MODES = {"disabled": False, "async": True, "async_with_pinned_mem": True}
# the local tier's fields and their defaults (LocalTier's): any of them without local_path
# is a mistake (a tier half configured), refused
LOCAL_DEFAULTS = {"local_every": 0, "local_copies": 2, "local_keep": 2, "local_node": None}


class TitanConfigError(ShardckptError, ValueError):
    """A field of the torchtitan backend's Config is wrong; the message names
    ``checkpoint.FIELD`` and the value."""


def _field(name: str, check: Callable[[], Any]) -> Any:
    """``check()``, its ``ValueError`` / ``TypeError`` as a :class:`TitanConfigError` on
    ``checkpoint.NAME``."""
    try:
        return check()
    except TitanConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise TitanConfigError(f"checkpoint.{name}: {exc}") from None


def _positive(cfg: Any, name: str) -> None:
    value = getattr(cfg, name)
    if type(value) is not int or value < 1:
        raise TitanConfigError(f"checkpoint.{name} must be a positive int, got {value!r}")


def _check_types(cfg: Any) -> None:
    """Every bool field (the base Config's too) is a bool: ``"no"`` would count as True;
    ``load_step`` is a step or -1 (the newest)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.type in (bool, "bool") and not isinstance(value, bool):
            raise TitanConfigError(f"checkpoint.{f.name} must be True or False, got {value!r}")
    if type(cfg.load_step) is not int or cfg.load_step < -1:
        raise TitanConfigError(f"checkpoint.load_step must be a step (an int >= 0) or -1 (the "
                               f"newest), got {cfg.load_step!r}")


def check_base_types(cfg: Any) -> None:
    """The base Config's fields that torchtitan compares or parses without checking their
    type (run before its own checks, so ``keep_latest_k="3"`` is named, not a ``TypeError``
    from a comparison); ``exclude_from_loading`` as a string would be split into letters."""
    for name, low in (("interval", 1), ("keep_latest_k", 0)):
        value = getattr(cfg, name)
        if type(value) is not int or value < low:
            raise TitanConfigError(f"checkpoint.{name} must be an int >= {low}, got {value!r}")
    if not isinstance(cfg.folder, str):
        raise TitanConfigError(f"checkpoint.folder must be a path (a str), got {cfg.folder!r}")
    path = cfg.initial_load_path
    if path is not None and not isinstance(path, str):
        raise TitanConfigError(f"checkpoint.initial_load_path must be a path (a str) or None, "
                               f"got {path!r}")
    names = cfg.exclude_from_loading
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or \
            not all(isinstance(n, str) for n in names):
        raise TitanConfigError(f"checkpoint.exclude_from_loading must be a list of state names "
                               f"(e.g. ['dataloader']), got {names!r}")


def check(cfg: Any, dtypes: Any) -> None:
    """Every shardckpt field of ``cfg`` (and ``async_mode``, ``export_dtype``, the bool
    fields' types, ``load_step``)."""
    _check_types(cfg)
    if cfg.snapshot not in ("eager", "lazy"):
        raise TitanConfigError(f"checkpoint.snapshot must be 'eager' or 'lazy', got "
                               f"{cfg.snapshot!r}")
    _field("on_error", lambda: check_on_error(cfg.on_error))
    if cfg.export_dtype not in dtypes:
        raise TitanConfigError(f"checkpoint.export_dtype must be one of {', '.join(dtypes)}, "
                               f"got {cfg.export_dtype!r}")
    if isinstance(cfg.async_mode, str):  # as torchtitan's DCP backend: any case
        cfg.async_mode = cfg.async_mode.lower()
    if cfg.async_mode not in ASYNC_MODES:
        raise TitanConfigError(f"checkpoint.async_mode must be one of "
                               f"{', '.join(map(repr, ASYNC_MODES))}, got {cfg.async_mode!r}")
    if not isinstance(cfg.replicas, (list, tuple)) or \
            not all(isinstance(r, str) and r for r in cfg.replicas):  # a plain str: refused
        raise TitanConfigError(f"checkpoint.replicas must be a list of locations (paths or "
                               f"URLs), e.g. ['/other/ckpt'], got {cfg.replicas!r}")
    if cfg.min_replicas is not None and (type(cfg.min_replicas) is not int or
                                         cfg.min_replicas < 1):
        raise TitanConfigError(f"checkpoint.min_replicas must be None or a positive int, got "
                               f"{cfg.min_replicas!r}")
    if cfg.min_replicas is not None and cfg.min_replicas > 1 + len(cfg.replicas):
        raise TitanConfigError(f"checkpoint.min_replicas={cfg.min_replicas} is more than the "
                               f"{1 + len(cfg.replicas)} locations (checkpoint.folder and "
                               f"{len(cfg.replicas)} in checkpoint.replicas): no save could "
                               "commit")
    if not (cfg.compression is None or isinstance(cfg.compression, str)):
        raise TitanConfigError(f"checkpoint.compression must be None, 'zstd' or "
                               f"'zstd:LEVEL', got {cfg.compression!r}")
    _field("incremental" if not isinstance(cfg.incremental, bool) else "full_every",
           lambda: incremental_options(cfg.incremental, cfg.full_every))
    if not isinstance(cfg.trusted_keys, (list, tuple)) or \
            not all(isinstance(k, str) and k for k in cfg.trusted_keys):
        raise TitanConfigError(f"checkpoint.trusted_keys must be a list of PEM public key "
                               f"paths, got {cfg.trusted_keys!r}")
    _check_local(cfg)


def _check_local(cfg: Any) -> None:
    if cfg.local_path is None:
        for name, default in LOCAL_DEFAULTS.items():
            if getattr(cfg, name) != default:
                raise TitanConfigError(f"checkpoint.{name}={getattr(cfg, name)!r} needs "
                                       f"checkpoint.local_path (the node-local tier is off)")
        return
    if not isinstance(cfg.local_path, str) or not cfg.local_path.strip():
        raise TitanConfigError(f"checkpoint.local_path must be a non-empty path, got "
                               f"{cfg.local_path!r}")
    if cfg.local_every == 0:
        raise TitanConfigError("checkpoint.local_path is set: checkpoint.local_every (a local "
                               "save every N steps) is needed too")
    for name in ("local_every", "local_copies", "local_keep"):
        _positive(cfg, name)
    if cfg.local_node is not None:
        _field("local_node", lambda: check_node_id(cfg.local_node, "a node id"))
    _field("local_path", lambda: local_tier(cfg, ""))


def local_tier(cfg: Any, base_folder: str) -> LocalTier | None:
    """The node-local tier of ``cfg`` (None when ``local_path`` is unset); a relative
    ``local_path`` is relative to ``base_folder``, as ``folder`` is."""
    if cfg.local_path is None:
        return None
    path = cfg.local_path
    if base_folder and not os.path.isabs(path) and "://" not in path:
        path = os.path.join(base_folder, path)
    return LocalTier(path, every=cfg.local_every, copies=cfg.local_copies,
                     keep=cfg.local_keep, node=cfg.local_node)


def manager_kwargs(cfg: Any, base_folder: str) -> dict[str, Any]:
    """``CheckpointManager`` keyword arguments of ``cfg`` (all but the root and ``config``)."""
    return {
        "replicas": list(cfg.replicas), "min_replicas": cfg.min_replicas,
        "retention": RetentionPolicy(keep_last=cfg.keep_latest_k)
        if cfg.keep_latest_k else None,
        "save_every": cfg.interval, "async_save": ASYNC_MODES[cfg.async_mode],
        "compression": cfg.compression, "snapshot": cfg.snapshot, "on_error": cfg.on_error,
        "incremental": cfg.incremental, "full_every": cfg.full_every,
        "local": local_tier(cfg, base_folder), "trusted_keys": list(cfg.trusted_keys)}


def build_manager(factory: Callable[..., Any], root: str, cfg: Any, base_folder: str,
                  **extra: Any) -> Any:
    """``factory(root, **manager_kwargs, **extra)``; what the manager refuses in its arguments
    (a trusted key that is no PEM public key, local paths that overlap the root, ...) as a
    :class:`TitanConfigError`."""
    for key in cfg.trusted_keys:
        if not os.path.isfile(key):
            raise TitanConfigError(f"checkpoint.trusted_keys: {key} is not a file (a PEM "
                                   f"public key)")
    kwargs = manager_kwargs(cfg, base_folder)
    try:
        return factory(root, **kwargs, **extra)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ShardckptError):
            raise
        raise TitanConfigError(f"checkpoint config of {root}: {exc}") from exc
