"""The arguments of ``CheckpointManager.save``, checked before anything else happens (usage
errors: always raised, on the caller's thread)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .. import knobs
from ..format import manifest as M
from ..golden import Golden
from ..warnsite import note_caller


def check_save_args(step: Any, state: Any, metrics: Mapping[str, float] | None,
                    tags: Iterable[str], golden: Any) -> tuple[dict[str, float], tuple[str, ...]]:
    """``ValueError`` / ``TypeError`` for a bad argument; the metrics and tags normalised."""
    note_caller()  # the user's save() call: where warnings from our threads point (warnsite.py)
    if type(step) is not int or not 0 <= step <= M.MAX_STEP:
        raise ValueError(f"step must be an int in [0, {M.MAX_STEP}], got {step!r}")
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    if golden is not None and not isinstance(golden, Golden):
        raise TypeError("golden must be a shardckpt.Golden")
    clean = {str(k): float(v) for k, v in (metrics or {}).items()}
    tags = tuple(tags)
    if not all(isinstance(t, str) for t in tags):
        raise TypeError("tags must be strings")
    return clean, tags


def check_manager_args(urls: list[str], min_replicas: int | None, save_every: int | None,
                       retention: Any, snapshot: str) -> int:
    """``ValueError`` / ``TypeError`` for a bad ``CheckpointManager`` argument; returns
    ``min_replicas`` (default: every location)."""
    from ..policy import RetentionPolicy

    if len(set(urls)) != len(urls):
        raise ValueError(f"the same location is given twice: {urls}")
    n = len(urls)
    if min_replicas is None:
        min_replicas = n
    if type(min_replicas) is not int or not 1 <= min_replicas <= n:
        raise ValueError(f"min_replicas must be an int in [1, {n}], got {min_replicas!r}")
    if save_every is not None and (type(save_every) is not int or save_every < 1):
        raise ValueError(f"save_every must be a positive int, got {save_every!r}")
    if retention is not None and not isinstance(retention, RetentionPolicy):
        raise TypeError("retention must be a shardckpt.RetentionPolicy")
    if snapshot not in ("lazy", "eager"):
        raise ValueError(f"snapshot must be 'lazy' or 'eager', got {snapshot!r}")
    knobs.check_switches()  # SHARDCKPT_STREAM_COPY=yes: refused now, not at the first save
    return min_replicas
