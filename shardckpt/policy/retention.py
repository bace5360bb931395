"""Retention planning: which checkpoints a :class:`RetentionPolicy` keeps, and why.

Everything here is a pure function of small frozen records: no I/O, no clock, no torch. The
manager and the ``prune`` command read :class:`CheckpointRecord` s from manifests, call
:func:`plan_retention`, and delete what the returned :class:`RetentionPlan` lists.

Semantics, including the decisions the public contract leaves open:

* A checkpoint is kept if *any* rule keeps it; every rule is evaluated on its own, over the
  committed checkpoints only, and the plan records each rule that kept a step as a reason.
* The newest committed checkpoint (highest step) is always kept (reason ``"newest"``), and steps
  that are still being written (``in_progress``) are never deleted (reason ``"in progress"``).
  In-progress steps take no part in the rules: ``keep_last=3`` means three *committed* ones.
* A policy with no rule set (``keep_tags`` alone does not count) keeps **everything**, reason
  ``"no rules"``: an empty policy most likely means "not configured", and keeping data is the
  safe default. A rule set to ``0`` (``keep_last=0``) *is* set, and keeps nothing by itself.
* ``keep_hourly`` / ``keep_daily`` / ``keep_weekly`` follow restic's ``forget``: walk the
  checkpoints newest first by time and keep the newest one of each bucket until N buckets have
  been kept. Buckets without a checkpoint are skipped, so N counts buckets that *have* a
  checkpoint, not calendar hours/days/weeks. Buckets are UTC hours, UTC days and ISO weeks
  (Monday to Sunday, UTC), never local time, so the plan is the same on every host and does not
  shift with daylight-saving changes.
* ``keep_best`` ranks the checkpoints that carry the metric as a real number; the others are
  ignored by that rule (neither kept nor counted). NaN ranks worst, ties go to the newer step.

Properties the tests check: the newest committed step is always kept; every input step is either
kept or deleted; in-progress steps are never deleted; planning again on only the kept
checkpoints (same policy, same ``now``) deletes nothing, which holds because every rule's choice
among the kept set is exactly its choice among the full set; and adding a rule or raising a count
never deletes more, except when starting from the empty policy, which keeps everything.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .durations import format_duration as _format_duration
from .durations import parse_duration

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


_COUNT_FIELDS = ("keep_last", "keep_best", "keep_hourly", "keep_daily", "keep_weekly")
_RULE_FIELDS = (*_COUNT_FIELDS, "keep_every", "keep_within")


def _check_count(name: str, value: object, minimum: int) -> None:
    # bool is an int subclass, but keep_last=True is surely a mistake.
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} or None, got {value!r}")


@dataclass(frozen=True)
class RetentionPolicy:
    """Which committed checkpoints to keep; see the module docstring for the exact semantics.

    Every ``keep_*`` rule is off when ``None``. ``keep_within`` is seconds or a duration string
    (see :func:`parse_duration`) and is stored as given. ``keep_tags`` is normalised to a tuple
    without duplicates; a single string is one tag and ``None`` means no tag protects anything.
    """

    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: int | None = None
    metric: str | None = None
    mode: str = "min"
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_within: float | str | None = None
    keep_tags: tuple[str, ...] = ("pinned",)

    def __post_init__(self) -> None:
        for name in _COUNT_FIELDS:
            _check_count(name, getattr(self, name), minimum=0)
        _check_count("keep_every", self.keep_every, minimum=1)
        if self.metric is not None and (not isinstance(self.metric, str) or not self.metric):
            raise ValueError(f"metric must be a non-empty string, got {self.metric!r}")
        if self.keep_best is not None and self.metric is None:
            raise ValueError("keep_best needs metric, the name of the metric to rank by")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.keep_within is not None:
            try:
                parse_duration(self.keep_within)
            except ValueError as exc:
                raise ValueError(f"keep_within: {exc}") from None
        tags = self.keep_tags
        if tags is None:
            tags = ()
        elif isinstance(tags, str):
            tags = (tags,)
        elif not isinstance(tags, Iterable):
            raise ValueError(f"keep_tags must be a sequence of strings, got {tags!r}")
        tags = tuple(dict.fromkeys(tags))
        if not all(isinstance(tag, str) for tag in tags):
            raise ValueError(f"keep_tags must be a sequence of strings, got {self.keep_tags!r}")
        object.__setattr__(self, "keep_tags", tags)

    def is_empty(self) -> bool:
        """True when no rule is set apart from ``keep_tags``; such a policy keeps everything."""
        return all(getattr(self, name) is None for name in _RULE_FIELDS)

    @property
    def keeps_nothing(self) -> bool:
        """Alias of :meth:`is_empty`: the rules by themselves would keep nothing.

        :func:`plan_retention` then keeps every checkpoint rather than all but the newest.
        """
        return self.is_empty()

    @property
    def within_seconds(self) -> float | None:
        """``keep_within`` in seconds, or ``None`` when that rule is off."""
        return None if self.keep_within is None else parse_duration(self.keep_within)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RetentionPolicy:
        """Build a policy from a mapping such as a TOML table or parsed CLI options.

        Keys may use dashes or underscores (``"keep-last"`` or ``"keep_last"``); a ``None`` value
        means "use the default", so unset CLI options can be passed through. Unknown keys, or one
        key spelled both ways, raise ``ValueError`` naming them.
        """
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        seen: set[str] = set()
        unknown: list[str] = []
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                unknown.append(str(key))
                continue
            if name in seen:
                raise ValueError(f"retention key {name!r} given more than once")
            seen.add(name)
            if value is not None:
                kwargs[name] = value
        if unknown:
            raise ValueError(f"unknown retention key(s): {', '.join(sorted(unknown))}")
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> RetentionPolicy:
        """Read a policy from a TOML file: its top-level keys, or its ``[retention]`` table.

        With a ``[retention]`` table, other top-level tables and keys are left alone (the file
        may configure other things too), but a retention key at top level as well is ambiguous
        and raises ``ValueError``. Parse and validation errors name the file.
        """
        where = os.fspath(path)
        with open(path, "rb") as fh:
            try:
                data = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{where}: {exc}") from None
        table: Any = data
        if "retention" in data:
            table = data["retention"]
            if not isinstance(table, dict):
                raise ValueError(f"{where}: 'retention' must be a table")
            known = {f.name for f in fields(cls)}
            clash = sorted(k for k in data if k.replace("-", "_") in known)
            if clash:
                raise ValueError(
                    f"{where}: {', '.join(clash)} given both at top level and in [retention]"
                )
        try:
            return cls.from_mapping(table)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class CheckpointRecord:
    """What the planner needs to know about one committed checkpoint, taken from its manifest.

    ``time`` is POSIX seconds (UTC). ``metrics`` values that are not real numbers count as
    missing for ``keep_best``.
    """

    step: int
    time: float
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.step, bool) or not isinstance(self.step, int):
            raise ValueError(f"step must be an int, got {self.step!r}")
        if (
            isinstance(self.time, bool)
            or not isinstance(self.time, numbers.Real)
            or not math.isfinite(self.time)
        ):
            raise ValueError(f"step {self.step}: time must be finite POSIX seconds: {self.time!r}")
        object.__setattr__(self, "tags", tuple(self.tags))


@dataclass(frozen=True)
class RetentionPlan:
    """The outcome of :func:`plan_retention`.

    ``kept`` maps each kept step to the reasons it is kept (never empty), in ascending step
    order; ``deleted`` is ascending. Together they hold every input step exactly once.
    """

    kept: dict[int, tuple[str, ...]]
    deleted: tuple[int, ...]

    def to_json(self, dry_run: bool) -> dict[str, Any]:
        """The ``prune`` JSON document of the public contract, sorted by step."""
        return {
            "dry_run": bool(dry_run),
            "kept": [{"step": s, "reasons": list(self.kept[s])} for s in sorted(self.kept)],
            "deleted": sorted(self.deleted),
        }


# Bucket keys. POSIX time has no leap seconds, so every UTC day is exactly 86400 s and plain
# division gives the UTC hour and day. 1970-01-01 was a Thursday: shifting by 3 days makes weeks
# start on Monday, which partitions time exactly as ISO (year, week) pairs do.
def _hour_bucket(t: float) -> int:
    return int(t // 3600)


def _day_bucket(t: float) -> int:
    return int(t // 86400)


def _week_bucket(t: float) -> int:
    return (_day_bucket(t) + 3) // 7


def _newest_per_bucket(
    records: Sequence[CheckpointRecord], bucket_of: Callable[[float], int], count: int
) -> list[CheckpointRecord]:
    """restic's ``forget --keep-{hourly,daily,weekly}``: the newest of each of ``count`` buckets."""
    chosen: list[CheckpointRecord] = []
    last_bucket: int | None = None
    # Newest first by time (step breaks ties); bucket keys never increase along this walk, so
    # "differs from the previous bucket" means "a bucket not seen yet".
    for record in sorted(records, key=lambda r: (r.time, r.step), reverse=True):
        if len(chosen) == count:
            break
        bucket = bucket_of(record.time)
        if bucket != last_bucket:
            chosen.append(record)
            last_bucket = bucket
    return chosen


def _best(
    records: Sequence[CheckpointRecord], count: int, metric: str, mode: str
) -> list[CheckpointRecord]:
    """The ``count`` best records by ``metric``; records without it as a real number are skipped."""
    ranked: list[tuple[tuple[int, float, int], CheckpointRecord]] = []
    for record in records:
        value = record.metrics.get(metric)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        value = float(value)
        if math.isnan(value):
            rank = (1, 0.0, -record.step)  # NaN (a diverged run) is worse than any number
        else:
            rank = (0, value if mode == "min" else -value, -record.step)
        ranked.append((rank, record))
    ranked.sort(key=lambda item: item[0])
    return [record for _, record in ranked[:count]]


def missing_metric(policy: RetentionPolicy, checkpoints: Iterable[CheckpointRecord]) -> str | None:
    """Why ``policy``'s ``keep_best`` cannot rank ``checkpoints``, or ``None`` when it can.

    A message when no checkpoint carries ``policy.metric`` at all (a misspelt name, say: the
    rule then keeps nothing), naming the metrics the checkpoints do carry. ``None`` without a
    ``keep_best`` rule, without checkpoints, or when at least one carries the metric. Pure.
    """
    records = list(checkpoints)
    if policy.keep_best is None or policy.metric is None or not records:
        return None
    names = sorted({str(name) for r in records for name in r.metrics})
    if policy.metric in names:
        return None
    found = ("the metrics that exist: " + ", ".join(names)) if names else \
        "no checkpoint has any metric"
    return (f"metric {policy.metric!r}: no checkpoint has it, so keep_best={policy.keep_best} "
            f"keeps nothing by it ({len(records)} checkpoint{'s' * (len(records) != 1)}; "
            f"{found})")


def plan_retention(
    policy: RetentionPolicy,
    checkpoints: Iterable[CheckpointRecord],
    now: float,
    in_progress: Iterable[int] = (),
) -> RetentionPlan:
    """Decide which checkpoints ``policy`` keeps at time ``now`` (POSIX seconds), and why.

    Pure: reads nothing but its arguments. Every step in ``checkpoints`` ends up either in
    ``kept`` (with at least one reason) or in ``deleted``. The newest committed checkpoint is
    always kept, steps in ``in_progress`` are never deleted, and an empty policy keeps all.
    Raises ``ValueError`` on duplicate steps or a non-finite ``now``.
    """
    records = list(checkpoints)
    if not math.isfinite(now):
        raise ValueError(f"now must be finite POSIX seconds, got {now!r}")
    steps = Counter(r.step for r in records)
    dupes = sorted(step for step, n in steps.items() if n > 1)
    if dupes:
        raise ValueError(f"duplicate checkpoint step(s): {dupes}")

    writing = set(in_progress)
    committed = [r for r in records if r.step not in writing]
    by_step = sorted(committed, key=lambda r: r.step, reverse=True)
    reasons: dict[int, list[str]] = {step: [] for step in sorted(steps)}

    def keep(chosen: Iterable[CheckpointRecord], reason: str) -> None:
        for record in chosen:
            reasons[record.step].append(reason)

    for step in reasons:
        if step in writing:
            reasons[step].append("in progress")
    keep(by_step[:1], "newest")
    if policy.is_empty():
        keep(committed, "no rules")
    if policy.keep_last is not None:
        keep(by_step[: policy.keep_last], f"last {policy.keep_last}")
    if policy.keep_every is not None:
        every = policy.keep_every
        keep((r for r in committed if r.step % every == 0), f"every {every}")
    if policy.keep_best is not None and policy.metric is not None:
        keep(
            _best(committed, policy.keep_best, policy.metric, policy.mode),
            f"best {policy.keep_best} by {policy.metric} ({policy.mode})",
        )
    for count, bucket_of, label in (
        (policy.keep_hourly, _hour_bucket, "hourly"),
        (policy.keep_daily, _day_bucket, "daily"),
        (policy.keep_weekly, _week_bucket, "weekly"),
    ):
        if count is not None:
            keep(_newest_per_bucket(committed, bucket_of, count), label)
    if policy.keep_within is not None:
        cutoff = now - parse_duration(policy.keep_within)
        label = f"within {_format_duration(policy.keep_within)}"
        keep((r for r in committed if r.time >= cutoff), label)
    for tag in policy.keep_tags:
        keep((r for r in committed if tag in r.tags), f"tag {tag}")

    kept = {step: tuple(why) for step, why in reasons.items() if why}
    deleted = tuple(step for step, why in reasons.items() if not why)
    return RetentionPlan(kept=kept, deleted=deleted)


__all__ = [
    "CheckpointRecord",
    "RetentionPlan",
    "RetentionPolicy",
    "missing_metric",
    "parse_duration",
    "plan_retention",
]
