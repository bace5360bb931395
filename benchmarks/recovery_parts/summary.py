"""The JSON document of ``benchmarks/recovery.py``: resume times, steps lost, extra loop time
per save, the issue's two targets, and the figure. Torch-free; rank results in, JSON out."""

from __future__ import annotations

import statistics
from typing import Any

from common.output import pyplot
from common.rounds import median

RESUMES = ("local", "persistent_disk", "persistent_s3")
SAVES = ("none", "local", "persistent_disk", "persistent_s3")
PHASES = ("survey_s", "holdings_s", "gather_s", "persistent_s", "manifest_s", "receive_s",
          "read_s", "total_s")
STAMPS = ("process_started", "process_group_ready", "model_built", "manager_ready", "loaded",
          "first_step_done")

DEFINITIONS = {
    "load_s": "seconds inside mgr.load(state), slowest rank: for the local tier (a manager on "
              "S3 with a local tier) the holdings survey (rank 0 lists the S3 tier's step "
              "names beside it), the lost node's files received from their peer copies and "
              "the reads; "
              "for a persistent tier listing and reading its newest step. The targets use it.",
    "relaunch_to_first_step_s": "from the driver starting the two torchrun agents to the end "
                                "of the first training step after the load, slowest rank: "
                                "process start, imports, rendezvous, process groups, model "
                                "build, manager construction, the load and one step",
    "tier_restore_s": "the local resume's restore itself (shardckpt.tier.recover.recover: "
                      "holdings survey, with rank 0's listing of the persistent tier's step "
                      "names beside it, transfers, reads), slowest rank; load_s minus it is "
                      "what load() does around it (rank 0 records the restore in the audit "
                      "trail at the persistent root)",
    "phases_s_per_rank": "the local restore's phases on each rank (the load profile): "
                         "survey_s (holdings_s: this node's holdings; gather_s: every "
                         "rank's; persistent_s: the persistent step names from rank 0), "
                         "manifest_s (manifest, which files each rank reads), receive_s (peer "
                         "transfers), read_s (the load from the node's path), total_s",
    "since_launch_s": "each phase's end, slowest rank, in seconds after the launch",
    "steps_lost": "steps done when the node was killed minus the step resumed from",
    "extra_loop_s": "per save, slowest rank: the steps run while the save was in flight (at "
                    "least --window, until it committed everywhere) plus any wait for it, "
                    "minus as many steps of the window before it (no save); 'none' is the "
                    "noise floor",
}


def tiers_of(ranks: list[dict[str, Any]]) -> set[str]:
    return {r["tier"] for r in ranks}


def _resume_rep(ranks: list[dict[str, Any]], t_launch: float) -> dict[str, Any]:
    ranks = sorted(ranks, key=lambda r: r["rank"])
    steps = {r["step"] for r in ranks}
    tiers = {r["tier"] for r in ranks}
    return {
        "step": steps.pop() if len(steps) == 1 else sorted(steps),
        "tier": tiers.pop() if len(tiers) == 1 else sorted(tiers),
        "load_s": max(r["load_s"] for r in ranks),
        "load_s_per_rank": [r["load_s"] for r in ranks],
        # the local tier's restore itself (recover(): survey, transfers, reads); the rest of
        # load_s is what load() does around it (rank 0: the audit record)
        "tier_restore_s": max(r["profile"]["total_s"] for r in ranks)
        if all(r["tier"] == "local" and "total_s" in r["profile"] for r in ranks) else None,
        # where the local restore's time went, per rank (recover()'s profile)
        "phases_s_per_rank": [{k: r["profile"][k] for k in PHASES if k in r["profile"]}
                              for r in ranks] if "local" in tiers_of(ranks) else None,
        "relaunch_to_first_step_s": max(r["stamps"]["first_step_done"] for r in ranks) - t_launch,
        "since_launch_s": {k: max(r["stamps"][k] for r in ranks) - t_launch for k in STAMPS},
        "first_step_s": max(r["first_step_s"] for r in ranks),
        "bytes_read_per_rank": [r["bytes_read"] for r in ranks],
        "bytes_received_per_rank": [r["bytes_received"] for r in ranks],
        "node_per_rank": [r["node"] for r in ranks],
        "state_matches": all(r["state_matches"] for r in ranks),
        "warnings": sorted({w for r in ranks for w in r["warnings"]}),
    }


def resume_summary(reps: dict[str, list[dict[str, Any]]], last_step: int) -> dict[str, Any]:
    """Per variant: its repetitions (each from the 4 ranks' results) and their medians."""
    out: dict[str, Any] = {}
    for variant, runs in reps.items():
        rows = [{**_resume_rep(run["ranks"], run["t_launch"]),
                 "resident_bytes_before": run.get("resident_bytes_before")} for run in runs]
        steps = [r["step"] for r in rows]
        step = steps[0] if all(s == steps[0] for s in steps) else steps
        out[variant] = {
            "step": step, "tier": rows[0]["tier"],
            "steps_lost": last_step - step if isinstance(step, int) else None,
            "load_s_median": median([r["load_s"] for r in rows]),
            "tier_restore_s_median": median([r["tier_restore_s"] for r in rows]),
            "relaunch_to_first_step_s_median": median(
                [r["relaunch_to_first_step_s"] for r in rows]),
            "state_matches": all(r["state_matches"] for r in rows),
            "reps": rows,
        }
    return out


def overhead_summary(pairs: dict[str, list[list[dict[str, Any]]]], window: int
                     ) -> dict[str, Any]:
    """Per save variant: one sample per round (the slowest rank's), and the medians."""
    samples: dict[str, dict[str, list[float]]] = {}
    for variant, rounds in pairs.items():
        rows = samples.setdefault(variant, {})
        for ranks in rounds:
            for key in ("extra_loop_s", "in_save_s", "drain_s", "after_s", "base_s"):
                rows.setdefault(key, []).append(max(r[key] for r in ranks))
            rows.setdefault("steps_after", []).append(ranks[0]["steps_after"])
    base = [s / window for rows in samples.values() for s in rows.get("base_s", [])]
    return {
        "per_save_median": {v: {k: median(x) for k, x in rows.items()}
                            for v, rows in samples.items()},
        "per_save_samples": samples,
        "baseline_step_s": statistics.median(base) if base else None,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def targets(resume: dict[str, Any], overhead: dict[str, Any]) -> dict[str, Any]:
    """Issue 28's acceptance, from the medians, with the other ratios for context."""
    load = {v: resume.get(v, {}).get("load_s_median") for v in RESUMES}
    relaunch = {v: resume.get(v, {}).get("relaunch_to_first_step_s_median") for v in RESUMES}
    extra = {v: overhead["per_save_median"].get(v, {}).get("extra_loop_s") for v in SAVES}
    fast = _ratio(load["persistent_s3"], load["local"])
    cost = _ratio(extra["local"], extra["persistent_s3"])
    return {
        "resume_local_vs_persistent_s3": {
            "value": fast, "threshold": 3.0, "rule": ">=", "measure": "load_s (median)",
            "pass": fast is not None and fast >= 3.0,
            "statement": "resume from the local tier at least 3x faster than from the "
                         "persistent tier on S3 (moto)"},
        "local_save_extra_loop_vs_persistent_s3": {
            "value": cost, "threshold": 0.5, "rule": "<=", "measure": "extra_loop_s (median)",
            "pass": cost is not None and cost <= 0.5,
            "statement": "extra loop time of a local save at most 0.5x that of a persistent "
                         "save (to S3, the persistent tier of the issue's example)"},
        "context": {
            "load_persistent_disk_over_local": _ratio(load["persistent_disk"], load["local"]),
            "load_persistent_s3_over_local_tier_restore": _ratio(
                load["persistent_s3"], resume.get("local", {}).get("tier_restore_s_median")),
            "relaunch_persistent_s3_over_local": _ratio(relaunch["persistent_s3"],
                                                        relaunch["local"]),
            "relaunch_persistent_disk_over_local": _ratio(relaunch["persistent_disk"],
                                                          relaunch["local"]),
            "extra_loop_local_over_persistent_disk": _ratio(extra["local"],
                                                            extra["persistent_disk"]),
        },
    }


def _x(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}x"


def target_lines(doc: dict[str, Any]) -> list[str]:
    """``PASS``/``MISS`` per target, one line each."""
    lines = []
    for name, t in doc["targets"].items():
        if name == "context":
            continue
        value = _x(t["value"], 2)
        lines.append(f"{'PASS' if t['pass'] else 'MISS'} {name}: {value} "
                     f"({t['rule']} {t['threshold']}x, {t['measure']}): {t['statement']}")
    return lines


def plot(doc: dict[str, Any], path: str) -> None:
    """Resume time per tier (the load and the relaunch to the first step), extra loop seconds
    per save, steps lost per failure."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    resume = doc["resume"]
    names = [v for v in RESUMES if v in resume]
    xs = range(len(names))
    ax = axes[0]
    relaunch = [resume[v]["relaunch_to_first_step_s_median"] or 0 for v in names]
    load = [resume[v]["load_s_median"] or 0 for v in names]
    ax.bar([x - 0.2 for x in xs], relaunch, 0.4, label="relaunch to first step", color="#9ab")
    ax.bar([x + 0.2 for x in xs], load, 0.4, label="load() call", color="#357")
    restore = [resume[v].get("tier_restore_s_median") or 0 for v in names]
    ax.bar([x + 0.2 for x in xs], restore, 0.4, fill=False, hatch="//", edgecolor="white",
           label="of which the local tier's restore")
    for x, v in zip(xs, load):
        ax.annotate(f"{v:.2f}s", (x + 0.2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("seconds (median)")
    t = doc["targets"]["resume_local_vs_persistent_s3"]
    ax.set_title("resume after losing a node\n"
                 f"S3 load / local load = {_x(t['value'], 1)} (target >= 3)", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    med = doc["overhead"]["per_save_median"]
    saves = [v for v in SAVES if v in med]
    ax.bar(saves, [med[v]["extra_loop_s"] for v in saves], color="#c84")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("extra loop seconds per save (median)")
    t = doc["targets"]["local_save_extra_loop_vs_persistent_s3"]
    ax.set_title(f"cost of one save to the loop\nlocal / S3 = {_x(t['value'], 2)} "
                 "(target <= 0.5)", fontsize=10)
    ax = axes[2]
    ax.bar(names, [resume[v]["steps_lost"] or 0 for v in names], color="#7a5")
    ax.set_ylabel("steps")
    ax.set_title(f"steps lost (failure after step {doc['failure']['last_step_done']})",
                 fontsize=10)
    fig.suptitle(f"recovery, 2 nodes x 2 ranks, "
                 f"{doc['config']['state_bytes_per_rank'] / 1e6:.0f} MB per rank "
                 f"({doc['git']['commit']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
