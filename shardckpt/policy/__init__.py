"""Pure policies: retention planning (which checkpoints to keep, and why). No I/O, no torch."""

from shardckpt.policy.retention import (
    CheckpointRecord,
    RetentionPlan,
    RetentionPolicy,
    missing_metric,
    parse_duration,
    plan_retention,
)

__all__ = [
    "CheckpointRecord",
    "RetentionPlan",
    "RetentionPolicy",
    "missing_metric",
    "parse_duration",
    "plan_retention",
]
