"""``shardckpt prune ROOT``: apply a retention policy, from a shell, cron or a systemd timer.

Made for unattended runs: a root that does not exist yet (or an empty folder) is one line and
exit 0; ``--quiet`` prints nothing on success and one line on failure; ``--json`` prints one
line per run (JSON Lines, with the time), errors included; ``--metrics-file`` keeps a Prometheus
textfile of the outcome. Nothing is created in a root that has no checkpoints.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .common import ROOT_HELP, UsageError

_PRUNE_RULES = ("keep_last", "keep_every", "keep_best", "metric", "mode", "keep_hourly",
                "keep_daily", "keep_weekly", "keep_within")


def _prune_policy(args: argparse.Namespace) -> Any:
    """The policy of ``--config`` (if any) with the command-line rules laid over it."""
    from dataclasses import fields

    from ..policy import RetentionPolicy

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

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _say(args: argparse.Namespace, line: str) -> None:
    """A line of the human report (stdout): none with --json or --quiet."""
    if not args.json and not args.quiet:
        print(line)


def cmd_prune(args: argparse.Namespace) -> int:
    started = time.time()
    outcome: list[tuple[str, int, int]] = []
    code = 70
    if args.metrics_file and not args.dry_run:  # a dry run writes no metrics
        from .common import check_out_path

        check_out_path(args.metrics_file, "--metrics-file")
    try:
        code = _prune(args, started, outcome)
        return code
    except UsageError:
        code = 64
        raise
    except Exception as exc:
        from ..rootkind import NotARootError

        code = 2 if isinstance(exc, NotARootError) else 70
        raise
    finally:
        if args.metrics_file and not args.dry_run:
            from ..prune_metrics import write_prune_metrics
            from ..redact import redact_url

            try:
                write_prune_metrics(args.metrics_file, redact_url(args.root), code, started,
                                    time.time(), outcome)
            except OSError as exc:
                print(f"shardckpt prune: could not write --metrics-file {args.metrics_file}: "
                      f"{exc}", file=sys.stderr)


def _prune(args: argparse.Namespace, started: float, outcome: list[tuple[str, int, int]]
           ) -> int:
    from ..errors import ShardckptError
    from ..prune import UnknownMetricError, prune_location
    from ..prune_metrics import utc_now
    from .common import checked_roots, emit
    from .progress import bar, wanted

    policy = _prune_policy(args)
    grace = _duration_arg(args.grace, "--grace")
    lock_wait = _duration_arg(args.lock_wait, "--lock-wait")
    locs, kinds = checked_roots(args)  # NotARootError (exit 2) before anything is written
    docs: list[dict[str, Any]] = []
    errors: list[tuple[str, ShardckptError]] = []
    corrupt: list[str] = []
    for loc, kind in bar(list(zip(locs, kinds)), desc="prune", total=len(locs),
                         enabled=wanted(args) and len(locs) > 1, unit="location"):
        if kind is not None and kind.kind != "root":  # before the job's first save
            docs.append({"url": loc.display, "dry_run": args.dry_run, "kept": [],
                         "deleted": [], "reaped": [], "skipped": [], "corrupt": [],
                         "note": kind.describe()})
            outcome.append((loc.display, 0, 0))
            _say(args, f"{kind.describe()}; nothing to prune")
            continue
        try:  # every location from its own listing, under its own lock
            report = prune_location(loc, policy, dry_run=args.dry_run, grace=grace,
                                    lock_wait=lock_wait, unknown_metric="raise")
        except UnknownMetricError as exc:  # before anything changed at this location
            raise UsageError(f"--metric: {exc}") from None
        except ShardckptError as exc:
            errors.append((loc.display, exc))
            docs.append({"url": loc.display, "error": f"{type(exc).__name__}: "
                         f"{' '.join(str(exc).split())}"})
            continue
        docs.append({"url": loc.display, **report.to_json()})
        outcome.append((loc.display, len(report.deleted), len(report.reaped)))
        held = dict(report.kept_dirs)  # referenced, without a valid manifest (prune_hold.py)
        corrupt += [f"{loc.display}: step {s}: {e}"
                    + (f"; kept: {held.pop(f'step-{s:010d}')}" if f"step-{s:010d}" in held else "")
                    for s, e in sorted(report.corrupt.items())]
        corrupt += [f"{loc.display}: {d} kept: {why}" for d, why in sorted(held.items())]
        if not args.json and not args.quiet:
            _print_prune(report)
    code = 70 if errors else 2 if corrupt else 0
    _complain(args, errors, corrupt)
    if args.json:
        doc: dict[str, Any] = {"time": utc_now(time.time()), "dry_run": args.dry_run,
                               "kept": [], "deleted": []}
        first = {k: v for k, v in docs[0].items() if k not in ("url", "error")}
        doc.update(first)
        if errors:  # the contract's error document, with what was done elsewhere
            where, exc = errors[0]
            doc["error"] = {"type": type(exc).__name__, "message": _named(where, exc),
                            "exit_code": code}
        doc["locations"] = docs
        doc["exit_code"] = code
        doc["duration_s"] = round(time.time() - started, 3)
        emit(doc, compact=True)
    return code


def _named(where: str, exc: BaseException) -> str:
    """The error on one line, naming the location (once)."""
    text = " ".join(str(exc).split())
    return text if where in text else f"{where}: {text}"


def _complain(args: argparse.Namespace, errors: list[tuple[str, Any]],
              corrupt: list[str]) -> None:
    """What went wrong, on stderr: a line per problem, or with --quiet one line in all."""
    lines = [f"{type(e).__name__}: {_named(w, e)}" for w, e in errors]
    lines += [f"{c} (left alone)" for c in corrupt]
    if not lines:
        return
    if args.quiet and len(lines) > 1:
        lines = [f"{lines[0]} (and {len(lines) - 1} more problem{'s' * (len(lines) > 2)})"]
    for line in lines:
        print(f"shardckpt prune: {line}", file=sys.stderr)


def _print_prune(report: Any) -> None:
    verb = "would delete" if report.dry_run else "deleted"
    held = f" (+{len(report.kept_dirs)} without a valid manifest)" if report.kept_dirs else ""
    print(f"{report.location}{' (dry run)' if report.dry_run else ''}: kept {len(report.kept)}"
          f"{held}, {verb} {len(report.deleted)}"
          f"{f' ({len(report.retired)} retired)' if report.retired else ''}, "
          f"{'would reap' if report.dry_run else 'reaped'} {len(report.reaped)}")
    rows = [(s, "keep", ", ".join(r)) for s, r in report.kept.items()]
    rows += [(s, "retire", "kept steps reference its files: hidden, its manifest and those "
              "files stay") if s in report.retired else (s, "delete", "")
             for s in report.deleted]
    for step, action, why in sorted(rows):
        print(f"{step:>12}  {action:<8} {why}".rstrip())
    for d in report.reaped:
        print(f"{d:>12}  {'reap':<8} uncommitted, older than the grace period")
    for d, why in sorted(report.skipped.items()):
        print(f"{d:>12}  {'skip':<8} {why}")
    for d, why in sorted(report.kept_dirs.items()):
        print(f"{d:>12}  {'keep':<8} {why}")


_PRUNE_EPILOG = """\
Rules combine: a checkpoint is kept if any rule keeps it. The newest committed checkpoint and
steps being written are never deleted, nor are steps tagged 'pinned' (unless keep_tags in the
config says otherwise). Flags override --config, a TOML file of the same keys (keep_last = 3,
...) at top level or in a [retention] table. A prune without any rule is refused (exit 64).

Deletion removes manifest.json first, then the data, so an interrupted prune never leaves a
listed checkpoint with missing files. Uncommitted step directories are reaped once nothing
has touched them for --grace and no live save holds a lease on them, never when kept steps
reference their files (an incremental base whose manifest was lost or damaged: kept whole,
reported, exit 2; `shardckpt repair` from a replica restores it). Each location (ROOT and
every --replica) is pruned from its own listing, under its own lock.

For cron and systemd: run it as the user that trains (it owns the checkpoints). A root that
does not exist yet, or an empty folder, has no checkpoints: one line, exit 0, nothing created.
A path that is not a checkpoint root (a step directory, a folder of other files) exits 2 and
nothing is written there. --json prints one line per run (JSON Lines, with "time"), failures
included ({"error": {...}}); --quiet prints nothing on success and one line on failure;
--metrics-file keeps a Prometheus textfile of the outcome (shardckpt_prune_last_success, ...).

exit codes: 0 done, or no checkpoints yet; 2 a corrupt manifest was found, or a step directory
that kept steps reference has no valid manifest (reported, left alone, the rest pruned), or
ROOT is not a checkpoint root; 64 usage error, also a --metric that no checkpoint has (nothing
is pruned then); 70 another prune still held the lock after --lock-wait, or storage failed.
"""


def add_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success, one "
                   "line (stderr) on failure; --json still prints its line")
    p.add_argument("--metrics-file", metavar="PATH", default=None, help="write the outcome to "
                   "this Prometheus textfile (e.g. /var/lib/node_exporter/textfile/prune.prom); "
                   "one file per root, not the training job's own")
