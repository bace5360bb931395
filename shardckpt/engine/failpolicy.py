"""What a failed background save does to training: ``on_error="raise" | "warn"``.

A background (async) save fails after ``save()`` has returned. The manager learns of it when it
next waits for its saves (the next ``save()``, ``wait()``, ``close()``, the exit hook):

* ``"raise"`` (the default): that error is raised there, once. From ``save()`` it is raised only
  after the new save has been started, so that one failure costs one checkpoint, not two.
* ``"warn"``: one warning names the step and the cause, the failure is appended to
  ``failed_saves`` (``[(step, exception)]``, oldest first) and training goes on.
  ``SHARDCKPT_MAX_FAILED_SAVES`` failures in a row make the next ``save()`` raise.

Only an outcome that the save protocol gives every rank alike is let through by ``"warn"``:
a refusal broadcast with the plan, or a failure broadcast with the commit decision
(engine/save.py marks those with :func:`mark_agreed`; in one process every outcome is). So every
rank records the same failures in the same order, and all of them raise at the same ``save()``:
no rank goes on alone into a collective that the others have left. Anything else (a collective
that timed out, an interrupt) is raised as under ``"raise"``, and nothing new is started.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from .. import knobs
from ..errors import ShardckptError
from .failures import describe

ON_ERROR = ("raise", "warn")
_AGREED = "_shardckpt_agreed"


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
    return on_error


def mark_agreed(exc: BaseException) -> None:
    """``exc`` is the outcome the protocol gave every rank alike (raised on each of them)."""
    try:
        setattr(exc, _AGREED, True)
    except AttributeError:  # pragma: no cover - an exception type with __slots__
        pass


def is_agreed(exc: BaseException, world_size: int) -> bool:
    return isinstance(exc, Exception) and (world_size == 1 or getattr(exc, _AGREED, False))


class FailurePolicy:
    """The record of failed background saves of one manager, and what each failure does."""

    def __init__(self, on_error: str, world_size: int) -> None:
        self.on_error = check_on_error(on_error)
        self.world_size = world_size
        self.failed_saves: list[tuple[int, BaseException]] = []
        self.in_a_row = 0  # failed background saves since the last commit

    def settle(self, handles: Sequence[Any], strict: bool = False
               ) -> tuple[BaseException | None, bool]:
        """Wait for ``handles`` (oldest first) and record their outcomes. Returns the error to
        raise (None under ``"warn"`` if every failure was agreed; always the first unreported
        error when ``strict``) and whether every failure was agreed (a new save may start)."""
        first: BaseException | None = None
        agreed = True
        for handle in handles:
            already = handle.error_reported
            try:
                handle.wait()
            except BaseException as exc:
                ok = is_agreed(exc, self.world_size)
                agreed = agreed and ok
                if isinstance(exc, Exception):
                    self._record(handle.step, exc, warn=ok and not strict)
                if not already and (strict or not ok or self.on_error == "raise"):
                    first = first or exc
            else:
                self.in_a_row = 0
        return first, agreed

    def _record(self, step: int, exc: Exception, warn: bool) -> None:
        self.failed_saves.append((step, exc))
        self.in_a_row += 1
        if warn and self.on_error == "warn":
            warnings.warn(f"save of step {step} failed and was not committed; training goes on "
                          f"(on_error='warn', {self.in_a_row} failed in a row, "
                          f"SHARDCKPT_MAX_FAILED_SAVES={knobs.MAX_FAILED_SAVES.get()}): "
                          f"{describe(exc)}", stacklevel=4)

    def check_limit(self, step: int) -> None:
        """Before save ``step`` starts: raise on every rank alike once too many background
        saves have failed in a row. The count starts again after this (a caller that catches
        this error and goes on gets the same number of tries again)."""
        limit = knobs.MAX_FAILED_SAVES.get()
        if self.on_error != "warn" or self.in_a_row < limit:
            return
        n, self.in_a_row = self.in_a_row, 0
        steps = [s for s, _ in self.failed_saves[-n:]]
        last = self.failed_saves[-1][1]
        raise ShardckptError(f"save of step {step} refused: the last {n} saves (steps {steps}) "
                             f"failed in a row (SHARDCKPT_MAX_FAILED_SAVES={limit}); the last "
                             f"one: {describe(last)}") from last
