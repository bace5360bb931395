"""How a collective save or load fails: every rank learns every failure, then raises the same.

One process raises its own error (an ``OSError`` as the contract's ``StorageError``); in a job,
every rank raises a :class:`~shardckpt.errors.CollectiveError` naming each failing rank and its
cause, chained to its own error if it had one, so no rank goes on alone.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, NoReturn

from ..errors import CollectiveError, StorageError

if TYPE_CHECKING:
    from .comm import Comm


def describe(exc: BaseException) -> str:
    """One line naming an error; the traceback's last frame says where it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}"[:1000] + where


def raise_failures(what: str, failures: Mapping[int, str], local: BaseException | None,
                   world_size: int) -> NoReturn:
    """Raise for ``failures`` (rank -> one line): ``what`` says what failed ("load failed")."""
    if world_size == 1 and local is not None:  # one process: the error itself ...
        if isinstance(local, OSError):  # ... storage failures as the contract's StorageError
            raise StorageError(describe(local)) from local
        raise local  # (a TypeError naming the key path, say)
    lines = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failures.items()))
    raise CollectiveError(f"{what} on rank(s) {sorted(failures)}: {lines}",
                          dict(failures)) from local


def gather_failures(comm: Comm, error: BaseException | None, what: str) -> dict[int, str]:
    """Collective: every rank's failure (rank -> one line); one all-reduce when all is well."""
    if comm.world_size == 1:
        return {0: describe(error)} if error is not None else {}
    if not comm.any_true(error is not None, what):
        return {}
    outcomes = comm.all_gather_json(describe(error) if error is not None else None, what)
    return {r: m for r, m in enumerate(outcomes) if m}


def agree_on_state(comm: Comm, step: int, error: Exception | None) -> None:
    """Collective, on the caller's thread, after every earlier save has finished (so the comm
    is idle): if flattening or snapshotting the state failed on any rank, every rank raises
    now, before anything is written. One process raises the error itself; with several, every
    rank raises a ``CollectiveError`` naming the failing ranks and their errors (key paths
    included), chained to its own error if it has one."""
    failures = gather_failures(comm, error, "save: check state")
    if comm.world_size == 1 and error is not None:
        raise error
    if failures:
        lines = "; ".join(f"rank {r}: {m}" for r, m in sorted(failures.items()))
        raise CollectiveError(f"save of step {step} refused, nothing was written: the state of "
                              f"rank(s) {sorted(failures)} cannot be checkpointed: {lines}",
                              failures) from error
