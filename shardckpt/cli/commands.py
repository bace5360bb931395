"""The CLI's commands: each takes parsed arguments and returns an exit code."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..textfile import human_bytes
from . import diff_cmd, interop_cmd, report_cmd, verify_cmd
from .argtypes import step_arg
from .common import ROOT_HELP, latest_step, locations
from .progress import bar, wanted

if TYPE_CHECKING:  # the checkpoint layers load when a command runs, not for --help
    from ..format import manifest as M


def _metrics_json(m: M.Manifest) -> dict[str, Any]:
    from ..format import manifest as M

    return {k: M.encode_float(v) for k, v in m.metrics.items()}


def cmd_ls(args: argparse.Namespace) -> int:
    """Committed steps, steps whose manifest is corrupt everywhere (``health: corrupt``), and
    corrupt step directories moved aside by a save (``health: aside``). Exit 2 on any problem:
    a corrupt manifest, a damaged or missing copy, an unreachable location."""
    from ..verify.record import verified
    from . import health

    locs = locations(args)
    report = health.survey(locs, progress=wanted(args))
    rows = []
    for step, entry in bar(sorted(report.steps.items()), desc="verification records",
                           total=len(report.steps), enabled=wanted(args), unit="step"):
        m = entry.manifest
        states = set(entry.health)
        rows.append({"step": step, "time": m.time, "nbytes": m.nbytes,
                     "metrics": _metrics_json(m), "tags": list(m.tags),
                     "world_size": m.world_size, "verified": verified(locs[0], m),
                     "health": "ok" if states == {"ok"} else
                     "degraded" if "ok" in states else "damaged",
                     "locations": [{"url": loc.display, "health": entry.health[i]}
                                   for i, loc in enumerate(locs)]})
    for step, error in report.corrupt.items():
        rows.append({"step": step, "time": None, "nbytes": None, "metrics": {}, "tags": [],
                     "world_size": None, "verified": None, "health": "corrupt",
                     "error": error})
    for where, name in report.aside:
        rows.append({"step": int(name[5:15]), "time": None, "nbytes": None, "metrics": {},
                     "tags": [], "world_size": None, "verified": None, "health": "aside",
                     "dir": f"{where}/{name}"})
    rows.sort(key=lambda r: (r["step"], r["health"] != "aside"))
    if args.json:
        from .common import emit

        emit(rows)
    else:
        print(f"{'STEP':>10}  {'TIME':<29} {'SIZE':>10} {'WORLD':>5}  {'HEALTH':<10} "
              f"{'VERIFIED':<9}METRICS / TAGS")
        for r in rows:
            if r["health"] in ("corrupt", "aside"):
                what = r.get("error") or f"moved aside: {r['dir']}"
                print(f"{r['step']:>10}  {'-':<29} {'-':>10} {'-':>5}  "
                      f"{r['health'].upper():<10} {'-':<8} {what}")
                continue
            states = {loc["health"] for loc in r["locations"]}
            status = "ok" if states == {"ok"} else ",".join(sorted(states))
            metrics = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in r["metrics"].items())
            print(f"{r['step']:>10}  {r['time']:<29} {human_bytes(r['nbytes']):>10} "
                  f"{r['world_size']:>5}  {status:<10} {r['verified'] or '-':<8} {metrics} "
                  f"{' '.join(r['tags'])}".rstrip())
    for problem in report.problems:
        print(f"shardckpt ls: {problem}", file=sys.stderr)
    return 2 if report.problems else 0


def cmd_show(args: argparse.Namespace) -> int:
    from .common import emit

    locs = locations(args)
    step = latest_step(locs) if args.step is None else args.step
    from ..catalog import find_manifest
    from ..format import manifest as M
    from ..planning import tree as T

    m, _ = find_manifest(locs, step)
    doc = m.to_json()
    extras = sorted(set(doc) - M.CORE_FIELDS)
    # keys that not every rank saved (or saved alike): which ranks wrote each
    local = [(path, M.to_ranges(ranks), differ) for path, ranks, differ in
             T.rank_local(m.tree, m.world_size)]
    if args.json:
        emit({**doc, "nbytes": m.nbytes,
              "rank_local": {p: {"ranks": [list(r) for r in runs], "differ": differ}
                             for p, runs, differ in local}})
        return 0

    def ranks_text(runs: M.Ranges) -> str:
        return ",".join(f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in runs)
    print(f"step {m.step}  saved {m.time}  world size {m.world_size}  "
          f"{human_bytes(m.nbytes)} in {len(m.files)} files  save id {m.save_id}")
    if m.metrics:
        print("metrics: " + ", ".join(f"{k}={v:.6g}" for k, v in m.metrics.items()))
    if m.tags:
        print("tags: " + ", ".join(m.tags))
    print(f"\n{'TENSOR':<60} {'DTYPE':<14} {'SHAPE':<20} {'RANKS':<10} {'BYTES':>10}")
    hidden = 0
    for key, entry in m.tensors.items():
        if key.startswith(M.RESERVED_PREFIX) and not args.all:  # RNG states, golden batches
            hidden += 1
            continue
        if entry.alias_of is not None:
            print(f"{key:<60} (same storage as {entry.alias_of})")
            continue
        metas = entry.per_rank if entry.per_rank is not None else (entry.meta,)
        for r, meta in enumerate(metas):
            if meta is None:  # rank r did not save this key
                continue
            name = key if entry.per_rank is None else f"{key} [rank {r}]"
            print(f"{name:<60} {meta.dtype:<14} {list(meta.shape)!s:<20} "
                  f"{ranks_text(meta.ranks):<10} {human_bytes(meta.nbytes):>10}")
    if hidden:
        print(f"({hidden} internal tensors of shardckpt's own not shown: --all shows them)")
    if local:
        print("\nrank-local state (saved by some ranks only, or differing between ranks):")
        for path, runs, differ in local:
            print(f"  {path:<58} ranks {ranks_text(runs)}"
                  + ("  (values differ)" if differ else ""))
    for key in extras:  # provenance, golden spec, timing, ...: indented JSON, not a repr
        text = json.dumps(doc[key], indent=2, sort_keys=True, ensure_ascii=False)
        print(f"\n{key}:\n" + "\n".join("  " + line for line in text.splitlines()))
    return 0


def _add_export(p: argparse.ArgumentParser) -> None:
    from .interop_cmd import EXPORT_EPILOG

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EXPORT_EPILOG
    p.add_argument("root", metavar="ROOT", help=ROOT_HELP)
    p.add_argument("--step", type=step_arg, default=None, metavar="N",
                   help="step to export (default: latest)")
    p.add_argument("--format", choices=("safetensors", "torch", "hf", "dcp"), required=True,
                   help="safetensors, torch (torch.save of a dict of tensors), hf (a Hugging "
                   "Face model folder) or dcp (a DCP checkpoint folder)")
    p.add_argument("--out", required=True, metavar="PATH", help="output file (safetensors, "
                   "torch: its directory must exist) or folder (hf, dcp)")
    p.add_argument("--only", metavar="PREFIX", default=None,
                   help="export only tensors under this key prefix, stripped (e.g. 'model')")
    p.add_argument("--max-shard-size", metavar="SIZE", default=None,
                   help="hf: largest safetensors file, e.g. 5GB (the default), 500MB, 2GiB")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="hf: cast floating-point tensors to this dtype (others stay as stored)")
    p.add_argument("--config", metavar="PATH", default=None,
                   help="hf: the model's config.json, or a folder holding it, copied into --out")
    p.add_argument("--force", action="store_true", help="replace an existing --out file, or "
                   "write into a folder holding files no export wrote")


def cmd_repair(args: argparse.Namespace) -> int:
    from ..repair import committed_nowhere, repair_step, steps_to_repair, summary
    from ..storage import step_dirname
    from .common import UsageError, emit

    locs = locations(args)
    if len(locs) < 2:
        raise UsageError("repair needs at least one --replica URL to copy from or to")
    left: dict[int, list[str]] = {}  # steps ROOT does not hold (pruned there): not brought back
    if args.step is not None:
        steps = [args.step]
    else:
        steps, left = steps_to_repair(locs)
    reports = []
    for s in bar(steps, desc="repair", total=len(steps), enabled=wanted(args), unit="step"):
        r = repair_step(locs, s, args.dry_run)
        if args.step is not None or not committed_nowhere(r):  # else a crashed save: no damage
            reports.append(r)
    ok = all(r.ok for r in reports)
    if args.json:
        emit({"ok": ok, "dry_run": args.dry_run, "summary": summary(reports, args.dry_run),
              "steps": [r.to_json() for r in reports],
              "not_at_root": [{"step": s, "locations": w} for s, w in left.items()]})
    else:  # the plan, the same lines for a dry run and the run that carries it out
        for s, where in left.items():
            print(f"step {s}: not at {locs[0].display} (pruned there?), only at "
                  f"{', '.join(where)}: not restored (repair --step {s} restores it)",
                  file=sys.stderr)
        for r in reports:
            for action in r.plan:
                print(action.describe(r.step))
            for e in r.failed:
                print(f"step {r.step}: FAILED to {e['action'].replace('_', ' ')} "
                      f"{e['location']}/{step_dirname(r.step)}/{e['file']}: {e['error']}",
                      file=sys.stderr)
            for e in r.unrepairable:
                if not any(e["location"] == f["location"] and e["file"] == f["file"]
                           for f in r.failed):
                    where = "" if e["location"] == "*" else f"{e['location']}/"
                    print(f"step {r.step}: CANNOT repair {where}{step_dirname(r.step)}/"
                          f"{e['file']}: {e['problem']}", file=sys.stderr)
        print(summary(reports, args.dry_run))
    return 0 if ok else 2


def _add_repair(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help=ROOT_HELP)
    p.add_argument("--step", type=step_arg, default=None, metavar="N",
                   help="repair only this step, even one that ROOT no longer holds (default: "
                   "every step ROOT holds; steps it pruned are not brought back)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (exactly what a "
                   "real run does) and change nothing")


def _add_ls(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help=ROOT_HELP)


def _add_show(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help=ROOT_HELP)
    p.add_argument("--step", type=step_arg, default=None, metavar="N",
                   help="step to show (default: latest)")
    p.add_argument("--all", action="store_true",
                   help="also list shardckpt's internal tensors (RNG states, golden batches)")


_PRUNE_RULES = ("keep_last", "keep_every", "keep_best", "metric", "mode", "keep_hourly",
                "keep_daily", "keep_weekly", "keep_within")


def _prune_policy(args: argparse.Namespace) -> Any:
    """The policy of ``--config`` (if any) with the command-line rules laid over it."""
    from dataclasses import fields

    from ..policy import RetentionPolicy
    from .common import UsageError

    try:
        base = RetentionPolicy.from_toml(args.config) if args.config else RetentionPolicy()
        values = {f.name: getattr(base, f.name) for f in fields(base)}
        values.update({k: getattr(args, k) for k in _PRUNE_RULES if getattr(args, k) is not None})
        policy = RetentionPolicy(**values)
    except OSError as exc:
        raise UsageError(f"--config {args.config}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if policy.is_empty():
        raise UsageError("no retention rule given (--keep-last, --keep-every, ... or --config "
                         "FILE); refusing to prune with a policy that keeps everything")
    return policy


def _duration_arg(text: str, flag: str) -> float:
    from ..policy import parse_duration
    from .common import UsageError

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def cmd_prune(args: argparse.Namespace) -> int:
    from ..errors import ShardckptError
    from ..prune import UnknownMetricError, prune_location
    from .common import UsageError, emit

    policy = _prune_policy(args)
    grace = _duration_arg(args.grace, "--grace")
    lock_wait = _duration_arg(args.lock_wait, "--lock-wait")
    locs = locations(args)
    docs: list[dict[str, Any]] = []
    failed = corrupt = False
    for loc in bar(locs, desc="prune", total=len(locs), enabled=wanted(args) and len(locs) > 1,
                   unit="location"):  # every location from its own listing, under its own lock
        try:
            report = prune_location(loc, policy, dry_run=args.dry_run, grace=grace,
                                    lock_wait=lock_wait, unknown_metric="raise")
        except UnknownMetricError as exc:  # before anything changed at this location
            raise UsageError(f"--metric: {exc}") from None
        except ShardckptError as exc:
            failed = True
            docs.append({"url": loc.display, "error": f"{type(exc).__name__}: {exc}"})
            print(f"shardckpt prune: {loc.display}: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            continue
        docs.append({"url": loc.display, **report.to_json()})
        for step, error in sorted(report.corrupt.items()):
            corrupt = True
            print(f"shardckpt prune: step {step} left alone: {error}", file=sys.stderr)
        if not args.json:
            _print_prune(report)
    if args.json:
        first = {k: v for k, v in docs[0].items() if k not in ("url", "error")}
        emit({"dry_run": args.dry_run, "kept": [], "deleted": [], **first, "locations": docs})
    return 70 if failed else 2 if corrupt else 0


def _print_prune(report: Any) -> None:
    verb = "would delete" if report.dry_run else "deleted"
    print(f"{report.location}{' (dry run)' if report.dry_run else ''}: kept {len(report.kept)}, "
          f"{verb} {len(report.deleted)}, "
          f"{'would reap' if report.dry_run else 'reaped'} {len(report.reaped)}")
    rows = [(s, "keep", ", ".join(r)) for s, r in report.kept.items()]
    rows += [(s, "delete", "") for s in report.deleted]
    for step, action, why in sorted(rows):
        print(f"{step:>12}  {action:<8} {why}".rstrip())
    for d in report.reaped:
        print(f"{d:>12}  {'reap':<8} uncommitted, older than the grace period")
    for d, why in sorted(report.skipped.items()):
        print(f"{d:>12}  {'skip':<8} {why}")


_PRUNE_EPILOG = """\
Rules combine: a checkpoint is kept if any rule keeps it. The newest committed checkpoint and
steps being written are never deleted, nor are steps tagged 'pinned' (unless keep_tags in the
config says otherwise). Flags override --config, a TOML file of the same keys (keep_last = 3,
...) at top level or in a [retention] table. A prune without any rule is refused (exit 64).

Deletion removes manifest.json first, then the data, so an interrupted prune never leaves a
listed checkpoint with missing files. Uncommitted step directories are reaped once nothing
has touched them for --grace and no live save holds a lease on them. Each location (ROOT and
every --replica) is pruned from its own listing, under its own lock.

exit codes: 0 done; 2 a corrupt manifest was found (reported, left alone, the rest pruned);
64 usage error, also a --metric that no checkpoint has (nothing is pruned then); 70 another
prune still held the lock after --lock-wait, or storage failed.
"""


def _add_prune(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _PRUNE_EPILOG
    p.add_argument("root", metavar="ROOT", help=ROOT_HELP)
    p.add_argument("--keep-last", type=int, metavar="N", help="keep the newest N")
    p.add_argument("--keep-every", type=int, metavar="K", help="keep every step divisible by K")
    p.add_argument("--keep-best", type=int, metavar="M", help="keep the best M by --metric")
    p.add_argument("--metric", metavar="NAME", help="metric that --keep-best ranks by")
    p.add_argument("--mode", choices=("min", "max"), help="--keep-best: lower or higher is "
                   "better (default min)")
    for span in ("hourly", "daily", "weekly"):
        p.add_argument(f"--keep-{span}", type=int, metavar="N",
                       help=f"keep the newest checkpoint of each of the last N {span} buckets "
                       "(UTC)")
    p.add_argument("--keep-within", metavar="DUR", help="keep everything newer than DUR "
                   "('36h', '7d')")
    p.add_argument("--config", metavar="FILE", help="TOML file with the retention rules")
    p.add_argument("--dry-run", action="store_true", help="report what would go; change nothing")
    p.add_argument("--grace", default="1h", metavar="DUR", help="reap uncommitted step "
                   "directories untouched for this long (default 1h)")
    p.add_argument("--lock-wait", default="60s", metavar="DUR", help="wait this long for "
                   "another prune of a location to finish (default 60s; 0: give up at once)")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str,
                          Callable[[argparse.ArgumentParser], None]]] = {
    "ls": (cmd_ls, "list committed checkpoints with size, metrics, tags and location health",
           _add_ls),
    "show": (cmd_show, "print one checkpoint's manifest in full", _add_show),
    "repair": (cmd_repair, "restore missing or corrupt files in one location from a healthy "
               "replica", _add_repair),
    "export": (interop_cmd.cmd_export, "write one step, unsharded, as safetensors, torch, a "
               "Hugging Face folder or a DCP checkpoint", _add_export),
    "import-dcp": (interop_cmd.cmd_import_dcp, "convert a DCP checkpoint into a step of ROOT "
                   "(needs --trust-pickle: DCP metadata is a pickle)", interop_cmd.add_import_args),
    "prune": (cmd_prune, "apply a retention policy; safe to run from cron while training writes",
              _add_prune),
    "verify": (verify_cmd.cmd_verify, "integrity, completeness, then golden replay",
               verify_cmd.add_args),
    "diff": (diff_cmd.cmd_diff, "compare two checkpoints (ROOT@STEP) tensor by tensor",
             diff_cmd.add_args),
    "report": (report_cmd.cmd_report, "plot a run's history (size, save time, metrics, tags, "
               "verification) to a PNG or an HTML page", report_cmd.add_args),
}

