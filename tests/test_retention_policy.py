"""Retention planning: plain examples for each rule, then properties over random inputs."""

from __future__ import annotations

import datetime as dt
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shardckpt.policy import (
    CheckpointRecord,
    RetentionPlan,
    RetentionPolicy,
    parse_duration,
    plan_retention,
)
from shardckpt.policy.retention import _week_bucket

HOUR = 3600.0
DAY = 24 * HOUR
# Sunday 2024-03-31 00:00 UTC, the last day of ISO week 2024-W13.
SUNDAY = dt.datetime(2024, 3, 31, tzinfo=dt.timezone.utc).timestamp()


def rec(step: int, time: float = 0.0, tags: tuple[str, ...] = (), **metrics: float):
    return CheckpointRecord(step=step, time=time, metrics=metrics, tags=tags)


def kept_steps(plan: RetentionPlan) -> list[int]:
    return sorted(plan.kept)


# ---------------------------------------------------------------------------------------------
# Rules, one by one


def test_keep_last_keeps_newest_steps() -> None:
    plan = plan_retention(RetentionPolicy(keep_last=3), [rec(s) for s in range(10)], now=0)
    assert kept_steps(plan) == [7, 8, 9]
    assert plan.deleted == tuple(range(7))
    assert plan.kept[9] == ("newest", "last 3")
    assert plan.kept[7] == ("last 3",)


def test_keep_every() -> None:
    plan = plan_retention(RetentionPolicy(keep_every=100), [rec(s) for s in range(0, 501, 50)], 0)
    assert kept_steps(plan) == [0, 100, 200, 300, 400, 500]
    assert plan.kept[300] == ("every 100",)


def test_keep_best_min_and_max_break_ties_by_newer_step() -> None:
    cps = [rec(1, loss=0.5), rec(2, loss=0.1), rec(3, loss=0.3), rec(4, loss=0.1), rec(5, loss=9)]
    low = plan_retention(RetentionPolicy(keep_best=2, metric="loss"), cps, 0)
    assert kept_steps(low) == [2, 4, 5]  # 5 only as the newest
    assert low.kept[4] == ("best 2 by loss (min)",)
    high = plan_retention(RetentionPolicy(keep_best=1, metric="loss", mode="max"), cps[:4], 0)
    assert high.kept[1] == ("best 1 by loss (max)",)


def test_keep_best_nan_is_worst_and_missing_metric_is_ignored() -> None:
    cps = [rec(1, loss=math.nan), rec(2, acc=0.9), rec(3, loss=2.0), rec(4, loss=math.nan), rec(5)]
    plan = plan_retention(RetentionPolicy(keep_best=2, metric="loss"), cps, 0)
    # 3 is best; then the NaNs, newer first. 2 and 5 lack the metric and take no slot.
    assert {s for s, why in plan.kept.items() if "best 2 by loss (min)" in why} == {3, 4}
    assert plan.deleted == (1, 2)
    every = plan_retention(RetentionPolicy(keep_best=10, metric="loss", mode="max"), cps, 0)
    assert every.deleted == (2,)  # only the records with the metric count


def test_keep_hourly_restic_keeps_newest_per_hour_and_skips_empty_hours() -> None:
    # Every 20 minutes over 10:00-11:59 and 14:00-14:59; 12:00 and 13:00 are empty.
    times = [10 * HOUR + m * 60 for m in (0, 20, 40, 60, 80, 100)] + [14 * HOUR, 14 * HOUR + 1200]
    cps = [rec(i, SUNDAY + t) for i, t in enumerate(times)]
    plan = plan_retention(RetentionPolicy(keep_hourly=3), cps, now=SUNDAY + DAY)
    # 14:20 (newest), 11:40, 10:40: the last three hours that *have* a checkpoint.
    assert kept_steps(plan) == [2, 5, 7]
    assert plan.kept[7] == ("newest", "hourly")


def test_keep_daily_and_weekly_restic_example() -> None:
    # restic's docs: daily backups, --keep-daily 7 --keep-weekly 5. The dailies cover the newest
    # week, whose newest also counts as that week's weekly, so 7 + 4 checkpoints survive.
    cps = [rec(day, SUNDAY - (59 - day) * DAY + 12 * HOUR) for day in range(60)]
    plan = plan_retention(RetentionPolicy(keep_daily=7, keep_weekly=5), cps, now=SUNDAY + DAY)
    assert len(plan.kept) == 11
    assert set(range(53, 60)) <= set(plan.kept)
    weekly = sorted(s for s, why in plan.kept.items() if "weekly" in why)
    assert weekly == [31, 38, 45, 52, 59]  # the Sundays
    assert all(
        dt.datetime.fromtimestamp(cps[s].time, dt.timezone.utc).isoweekday() == 7 for s in weekly
    )


def test_bucket_keeps_newest_by_time_in_utc() -> None:
    # Sunday 23:59:59 and Monday 00:00 UTC are different ISO weeks, and different days.
    cps = [rec(1, SUNDAY - 1 + DAY), rec(2, SUNDAY + DAY), rec(3, SUNDAY + DAY + 60)]
    weekly = plan_retention(RetentionPolicy(keep_weekly=2), cps, now=SUNDAY + 2 * DAY)
    assert [s for s, why in weekly.kept.items() if "weekly" in why] == [1, 3]
    assert weekly.deleted == (2,)
    # Newest means newest by time: step 2 was written last here (a resumed run, say).
    out_of_order = [rec(1, SUNDAY + 10), rec(2, SUNDAY + 20), rec(3, SUNDAY + 5)]
    daily = plan_retention(RetentionPolicy(keep_daily=1), out_of_order, now=SUNDAY + DAY)
    assert daily.kept == {2: ("daily",), 3: ("newest",)}


@settings(deadline=None)  # a per-example deadline flakes on a loaded machine: none
@given(st.floats(-1e10, 1e10))
def test_week_bucket_partitions_time_like_iso_weeks(t: float) -> None:
    def iso(x: float) -> tuple[int, int]:
        return dt.datetime.fromtimestamp(x, dt.timezone.utc).isocalendar()[:2]

    day = math.floor(t / DAY) * DAY
    for other in (day, day + DAY, day - DAY, day + 6 * DAY, day - 6 * DAY):
        assert (_week_bucket(t) == _week_bucket(other)) == (iso(day) == iso(other))


def test_keep_within_is_inclusive_and_names_the_duration() -> None:
    now = SUNDAY
    ages = [36 * HOUR + 1, 36 * HOUR, HOUR, 2 * DAY]
    cps = [rec(step, now - age) for step, age in enumerate(ages, start=1)]
    plan = plan_retention(RetentionPolicy(keep_within="36h"), cps, now)
    assert kept_steps(plan) == [2, 3, 4]  # 4 as newest only
    assert plan.kept[2] == ("within 36h",)
    seconds = plan_retention(RetentionPolicy(keep_within=129600), cps, now)
    assert seconds.kept == plan.kept


def test_keep_tags_and_newest_survive_a_rule_that_keeps_nothing() -> None:
    cps = [rec(1, tags=("pinned",)), rec(2, tags=("release", "pinned")), rec(3), rec(4)]
    plan = plan_retention(RetentionPolicy(keep_last=0, keep_tags=("pinned", "release")), cps, 0)
    assert plan.kept == {1: ("tag pinned",), 2: ("tag pinned", "tag release"), 4: ("newest",)}
    assert plan.deleted == (3,)


def test_empty_policy_keeps_everything() -> None:
    policy = RetentionPolicy()
    assert policy.is_empty() and policy.keeps_nothing
    assert not RetentionPolicy(keep_last=0).is_empty()
    plan = plan_retention(policy, [rec(1, tags=("pinned",)), rec(2)], 0)
    assert plan.kept == {1: ("no rules", "tag pinned"), 2: ("newest", "no rules")}
    assert plan.deleted == ()
    # The one exception to monotonicity: any rule deletes more than no rule at all.
    assert plan_retention(RetentionPolicy(keep_last=1), [rec(1), rec(2)], 0).deleted == (1,)


def test_in_progress_is_kept_and_takes_no_part_in_the_rules() -> None:
    cps = [rec(s) for s in range(1, 6)]
    plan = plan_retention(RetentionPolicy(keep_last=1), cps, 0, in_progress=[5, 99])
    assert plan.kept == {4: ("newest", "last 1"), 5: ("in progress",)}
    assert plan.deleted == (1, 2, 3)


def test_no_checkpoints_and_only_in_progress() -> None:
    assert plan_retention(RetentionPolicy(keep_last=1), [], 0) == RetentionPlan({}, ())
    plan = plan_retention(RetentionPolicy(keep_last=0), [rec(7)], 0, in_progress={7})
    assert plan.kept == {7: ("in progress",)}


def test_duplicate_steps_and_bad_now_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"duplicate checkpoint step\(s\): \[2\]"):
        plan_retention(RetentionPolicy(), [rec(1), rec(2), rec(2, 5.0)], 0)
    with pytest.raises(ValueError, match="now"):
        plan_retention(RetentionPolicy(), [rec(1)], math.nan)


def test_to_json_matches_the_prune_contract() -> None:
    plan = plan_retention(RetentionPolicy(keep_every=2), [rec(3), rec(2), rec(1), rec(4)], 0)
    assert plan.to_json(dry_run=True) == {
        "dry_run": True,
        "kept": [
            {"step": 2, "reasons": ["every 2"]},
            {"step": 4, "reasons": ["newest", "every 2"]},
        ],
        "deleted": [1, 3],
    }


# ---------------------------------------------------------------------------------------------
# Validation and construction


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"keep_last": -1}, "keep_last"),
        ({"keep_last": True}, "keep_last"),
        ({"keep_daily": 1.5}, "keep_daily"),
        ({"keep_every": 0}, "keep_every"),
        ({"keep_best": 3}, "keep_best"),
        ({"keep_best": 3, "metric": ""}, "metric"),
        ({"mode": "lowest"}, "mode"),
        ({"keep_within": "3 fortnights"}, "keep_within"),
        ({"keep_within": -5}, "keep_within"),
        ({"keep_within": math.inf}, "keep_within"),
        ({"keep_tags": ["pinned", 3]}, "keep_tags"),
    ],
)
def test_policy_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RetentionPolicy(**kwargs)


def test_policy_normalises_keep_tags() -> None:
    assert RetentionPolicy(keep_tags=["a", "b", "a"]).keep_tags == ("a", "b")
    assert RetentionPolicy(keep_tags="gold").keep_tags == ("gold",)
    assert RetentionPolicy(keep_tags=None).keep_tags == ()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("30m", 1800),
        ("36h", 129600),
        ("7d", 604800),
        ("2w", 1209600),
        ("1h30m", 5400),
        ("1.5h", 5400),
        (" 2 D ", 172800),
        ("600", 600),
        (45, 45),
        (0.5, 0.5),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "h", "5y", "nan", "inf", "-3h", "3h-", True, None, math.nan])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)  # type: ignore[arg-type]


def test_from_mapping_accepts_dashes_and_names_unknown_keys() -> None:
    policy = RetentionPolicy.from_mapping(
        {"keep-last": 3, "keep_best": 2, "metric": "loss", "keep-within": "7d", "keep-daily": None}
    )
    assert policy == RetentionPolicy(keep_last=3, keep_best=2, metric="loss", keep_within="7d")
    with pytest.raises(ValueError, match="keep-lots, keep_montly"):
        RetentionPolicy.from_mapping({"keep_montly": 1, "keep-lots": 2, "keep_last": 1})
    with pytest.raises(ValueError, match="more than once"):
        RetentionPolicy.from_mapping({"keep_last": 1, "keep-last": 2})


def test_from_toml_top_level_and_table(tmp_path) -> None:
    top = tmp_path / "top.toml"
    top.write_text('keep-last = 5\nkeep_tags = ["pinned", "release"]\n')
    expected = RetentionPolicy(keep_last=5, keep_tags=("pinned", "release"))
    assert RetentionPolicy.from_toml(top) == expected

    table = tmp_path / "table.toml"
    table.write_text('root = "s3://b/run"\n[retention]\nkeep_weekly = 4\nkeep-within = "36h"\n')
    expected = RetentionPolicy(keep_weekly=4, keep_within="36h")
    assert RetentionPolicy.from_toml(str(table)) == expected

    clash = tmp_path / "clash.toml"
    clash.write_text("keep_last = 1\n[retention]\nkeep_last = 2\n")
    with pytest.raises(ValueError, match="keep_last given both"):
        RetentionPolicy.from_toml(clash)

    bad = tmp_path / "bad.toml"
    bad.write_text("[retention]\nkeep_every = 0\n")
    with pytest.raises(ValueError, match=r"bad\.toml: keep_every"):
        RetentionPolicy.from_toml(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("keep_last = \n")
    with pytest.raises(ValueError, match=r"broken\.toml"):
        RetentionPolicy.from_toml(broken)


def test_checkpoint_record_validation() -> None:
    assert rec(1, tags=["a"]).tags == ("a",)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step"):
        CheckpointRecord(step=1.0, time=0.0, metrics={}, tags=())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="time"):
        CheckpointRecord(step=1, time=math.inf, metrics={}, tags=())


# ---------------------------------------------------------------------------------------------
# Properties

BASE = SUNDAY - 30 * DAY
counts = st.none() | st.integers(0, 6)

# Times cluster so that hours, days and weeks hold several checkpoints, and do not follow steps.
times = st.builds(
    lambda d, h, s: BASE + d * DAY + h * HOUR + s,
    st.integers(0, 35),
    st.integers(0, 3),
    st.floats(0, 2 * HOUR),
)
records = st.lists(
    st.builds(
        lambda step, time, loss, tags: CheckpointRecord(
            step, time, {} if loss is None else {"loss": loss}, tags
        ),
        st.integers(0, 300),
        times,
        st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1.0]),
        st.sampled_from([(), ("pinned",), ("release",), ("pinned", "release")]),
    ),
    max_size=25,
    unique_by=lambda r: r.step,
)
policies = st.builds(
    RetentionPolicy,
    keep_last=counts,
    keep_every=st.none() | st.integers(1, 40),
    keep_best=counts,
    metric=st.just("loss"),
    mode=st.sampled_from(["min", "max"]),
    keep_hourly=counts,
    keep_daily=counts,
    keep_weekly=counts,
    keep_within=st.none() | st.floats(0, 20 * DAY) | st.sampled_from(["90s", "36h", "7d", "2w"]),
    keep_tags=st.sampled_from([(), ("pinned",), ("pinned", "release")]),
)
nows = st.floats(BASE, BASE + 40 * DAY)
fast = settings(max_examples=200, deadline=None)


@st.composite
def scenarios(draw):
    cps = draw(records)
    steps = [c.step for c in cps]
    writing = draw(st.sets(st.sampled_from(steps))) if steps else set()
    writing |= draw(st.sets(st.integers(301, 400), max_size=2))
    return draw(policies), cps, draw(nows), writing


@fast
@given(scenarios())
def test_newest_committed_is_always_kept(scenario) -> None:
    policy, cps, now, writing = scenario
    plan = plan_retention(policy, cps, now, writing)
    committed = [c.step for c in cps if c.step not in writing]
    if committed:
        assert "newest" in plan.kept[max(committed)]
    assert sum("newest" in why for why in plan.kept.values()) == min(1, len(committed))


@fast
@given(scenarios())
def test_kept_and_deleted_partition_the_input(scenario) -> None:
    policy, cps, now, writing = scenario
    plan = plan_retention(policy, cps, now, writing)
    assert set(plan.kept).isdisjoint(plan.deleted)
    assert set(plan.kept) | set(plan.deleted) == {c.step for c in cps}
    assert list(plan.deleted) == sorted(plan.deleted)
    assert all(plan.kept.values())
    doc = plan.to_json(dry_run=False)
    assert [k["step"] for k in doc["kept"]] == sorted(plan.kept)


@fast
@given(scenarios())
def test_in_progress_is_never_deleted(scenario) -> None:
    policy, cps, now, writing = scenario
    plan = plan_retention(policy, cps, now, writing)
    assert writing.isdisjoint(plan.deleted)


@fast
@given(scenarios())
def test_replanning_the_kept_set_deletes_nothing(scenario) -> None:
    policy, cps, now, writing = scenario
    plan = plan_retention(policy, cps, now, writing)
    survivors = [c for c in cps if c.step in plan.kept]
    again = plan_retention(policy, survivors, now, writing)
    assert again.deleted == ()
    assert again.kept == plan.kept  # and for the same reasons


@st.composite
def weaker(draw, policy: RetentionPolicy) -> RetentionPolicy:
    """``policy`` with some rules dropped and some counts lowered."""
    changes: dict = {}
    for name in ("keep_last", "keep_best", "keep_hourly", "keep_daily", "keep_weekly"):
        value = getattr(policy, name)
        changes[name] = None if value is None else draw(st.none() | st.integers(0, value))
    changes["keep_every"] = draw(st.sampled_from([None, policy.keep_every]))
    within = policy.within_seconds
    changes["keep_within"] = None if within is None else draw(st.none() | st.floats(0, within))
    tags = st.sets(st.sampled_from(policy.keep_tags)) if policy.keep_tags else st.just(set())
    changes["keep_tags"] = tuple(draw(tags))
    return RetentionPolicy(metric=policy.metric, mode=policy.mode, **changes)


@fast
@given(scenarios(), st.data())
def test_more_rules_never_delete_more(scenario, data) -> None:
    strong, cps, now, writing = scenario
    weak = data.draw(weaker(strong))
    assume(not weak.is_empty())  # the empty policy keeps everything; see its own test
    deleted_strong = set(plan_retention(strong, cps, now, writing).deleted)
    deleted_weak = set(plan_retention(weak, cps, now, writing).deleted)
    assert deleted_strong <= deleted_weak
