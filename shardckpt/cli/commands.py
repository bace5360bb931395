"""The CLI's commands: each takes parsed arguments and returns an exit code."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..textfile import human_bytes
from . import diff_cmd, governance_cmd, interop_cmd, prune_cmd, report_cmd, verify_cmd
from .argtypes import step_arg
from .common import ROOT_HELP, latest_step
from .progress import bar, wanted

if TYPE_CHECKING:  # the checkpoint layers load when a command runs, not for --help
    from ..format import manifest as M
    from ..storage import Location


def _metrics_json(m: M.Manifest) -> dict[str, Any]:
    from ..format import manifest as M

    return {k: M.encode_float(v) for k, v in m.metrics.items()}


def _no_checkpoints(args: argparse.Namespace, kinds: list[Any]) -> bool:
    """True (after saying so) when every location that answered is a root with no checkpoints:
    it does not exist yet, or is an empty folder."""
    known = [k for k in kinds if k is not None]
    if not known or any(k.kind == "root" for k in known):
        return False
    if not args.json:
        print(known[0].describe())
    return True


def _damage(locs: list[Location], m: M.Manifest) -> list[str]:
    """``LOCATION: state`` for each location committing ``m``'s step whose files are not whole
    (missing, wrong size, replaced header); a location without that step is not damage."""
    from ..catalog import read_manifest
    from ..errors import ShardckptError
    from .health import file_health, ref_health, ref_state

    out = []
    for loc in locs:
        try:
            read_manifest(loc, m.step)
        except ShardckptError:
            continue
        try:
            state = file_health(loc, m.step, m)
            if state == "ok" and (refs := ref_health(loc, m)):  # incremental: its references
                state = ref_state(refs)
        except ShardckptError as exc:
            state = f"unreadable: {exc}"
        if state != "ok":
            out.append(f"{loc.display}: {state}")
    return out


def _degraded_note(m: M.Manifest) -> str | None:
    """Why a committed step is short of copies, from its own manifest (``"degraded": true``):
    visible without ``--replica``."""
    if m.extra.get("degraded") is not True:
        return None
    where = m.extra.get("locations")
    names = [str(x) for x in where] if isinstance(where, list) else []
    at = f": only at {', '.join(names)}" if names else ""
    return f"degraded save: some locations missed it{at} (see 'shardckpt repair')"


def cmd_ls(args: argparse.Namespace) -> int:
    """Committed steps, steps whose manifest is corrupt everywhere (``health: corrupt``), and
    corrupt step directories moved aside by a save (``health: aside``). Exit 2 on any problem:
    a corrupt manifest, a damaged or missing copy, an unreachable location. A root that does
    not exist yet, or an empty folder, lists nothing (exit 0); a path that is not a checkpoint
    root exits 2."""
    from ..format.refs import summary  # incremental saves
    from ..steptags import effective_tags as tags_now  # `shardckpt tag` (issue 32)
    from ..verify.record import verified
    from . import health
    from .common import checked_roots
    from .local_cmd import node_ls

    if (code := node_ls(args)) is not None:  # a node's local path (issue 28)
        return code
    locs, kinds = checked_roots(args)
    if _no_checkpoints(args, kinds):
        if args.json:
            from .common import emit

            emit([])
        return 0
    report = health.survey(locs, progress=wanted(args))
    rows = []
    damage: list[str] = []
    for step, entry in bar(sorted(report.steps.items()), desc="verification records",
                           total=len(report.steps), enabled=wanted(args), unit="step"):
        m = entry.manifest
        states = set(entry.health)
        degraded_save = (note := _degraded_note(m)) is not None
        if note and len(locs) > 1 and states == {"ok"}:  # repaired since: every copy is whole
            note = None
        bad = [(loc.display, entry.health[i]) for i, loc in enumerate(locs)
               if entry.health[i] not in health.NOT_DAMAGE]
        damage += [f"step {step}: {where}: {state}" for where, state in bad]
        rows.append({"step": step, "time": m.time, "nbytes": m.nbytes,
                     "metrics": _metrics_json(m), "tags": list(tags_now(locs[0], m, False)),
                     "world_size": m.world_size, "verified": verified(locs[0], m),
                     "health": "damaged" if "ok" not in states else
                     "degraded" if states != {"ok"} or note else "ok",
                     "degraded_save": degraded_save,
                     "locations": [{"url": loc.display, "health": entry.health[i]}
                                   for i, loc in enumerate(locs)],
                     "problems": [f"{where}: {state}" for where, state in bad]
                     + ([note] if note else []),
                     "reference_problems": entry.ref_problems,
                     **summary(m.extra, step, m.nbytes)})
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
        _print_ls(rows)
    for problem in [*report.problems, *damage]:
        print(f"shardckpt ls: {problem}", file=sys.stderr)
    return 2 if report.problems or damage else 0


def _print_ls(rows: list[dict[str, Any]]) -> None:
    """The table; under each step that is not ok, one line per location or reason."""
    print(f"{'STEP':>10}  {'TIME':<29} {'SIZE':>10} {'WORLD':>5}  {'HEALTH':<10} "
          f"{'VERIFIED':<9}METRICS / TAGS")
    for r in rows:
        if r["health"] in ("corrupt", "aside"):
            what = r.get("error") or f"moved aside: {r['dir']}"
            print(f"{r['step']:>10}  {'-':<29} {'-':>10} {'-':>5}  "
                  f"{r['health'].upper():<10} {'-':<8} {what}")
            continue
        metrics = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in r["metrics"].items())
        print(f"{r['step']:>10}  {r['time']:<29} {human_bytes(r['nbytes']):>10} "
              f"{r['world_size']:>5}  {r['health']:<10} {r['verified'] or '-':<8} {metrics} "
              f"{' '.join(r['tags'])}".rstrip())
        absent = [loc["url"] for loc in r["locations"] if loc["health"] == "absent"]
        refs = [f"incremental: references {human_bytes(r['bytes_referenced'])} of step(s) "
                f"{r['depends_on']}"] if r["depends_on"] else []
        for line in [*r["problems"], *(f"{u}: not there" for u in absent), *refs]:
            print(f"{'':>12}{line}")


def cmd_show(args: argparse.Namespace) -> int:
    from ..format.refs import summary  # incremental saves
    from .common import checked_roots, emit

    locs, kinds = checked_roots(args)
    known = [k for k in kinds if k is not None]
    if known and all(k.kind != "root" for k in known):  # nothing to show: exit 2, as for a
        from ..errors import IncompleteCheckpointError  # root whose steps were all pruned

        raise IncompleteCheckpointError(known[0].describe())
    step = latest_step(locs) if args.step is None else args.step
    from ..catalog import find_manifest
    from ..format import manifest as M
    from ..planning import tree as T

    m, _ = find_manifest(locs, step)
    damage = _damage(locs, m)  # a copy with missing, cut or replaced files: exit 2, as ls
    doc = m.to_json()
    extras = sorted(set(doc) - M.CORE_FIELDS)
    # keys that not every rank saved (or saved alike): which ranks wrote each
    local = [(path, M.to_ranges(ranks), differ) for path, ranks, differ in
             T.rank_local(m.tree, m.world_size)]
    if args.json:
        emit({**doc, "nbytes": m.nbytes, **summary(m.extra, m.step, m.nbytes),
              "rank_local": {p: {"ranks": [list(r) for r in runs], "differ": differ}
                             for p, runs, differ in local}, "damage": damage})
        return 2 if damage else 0

    def ranks_text(runs: M.Ranges) -> str:
        return ",".join(f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in runs)
    print(f"step {m.step}  saved {m.time}  world size {m.world_size}  "
          f"{human_bytes(m.nbytes)} in {len(m.files)} files  save id {m.save_id}")
    if (inc := summary(m.extra, m.step, m.nbytes))["depends_on"]:
        print(f"incremental: wrote {human_bytes(m.nbytes)} itself, references "
              f"{human_bytes(inc['bytes_referenced'])} of step(s) {inc['depends_on']}")
    if (note := _degraded_note(m)) is not None:
        print(f"DEGRADED: {note}")
    for problem in damage:
        print(f"DAMAGED: {problem}")
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
    for problem in damage:
        print(f"shardckpt show: step {m.step}: {problem}", file=sys.stderr)
    return 2 if damage else 0


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


def _repair_locations(args: argparse.Namespace) -> list[Location]:
    """The locations; a root that does not exist is a usage error, except a replica the
    manifests recorded a marker for (emptied: a bucket recreated empty), which repair refills,
    and a replica on an object store (a new prefix of an existing bucket: a missing bucket was
    named by ``open_locations``)."""
    from ..engine.rootmarks import expected_markers
    from ..errors import StorageError
    from ..storage.probe import Unreachable
    from .common import UsageError, open_locations

    locs = open_locations([args.root, *args.replica], warn=args.command, missing_ok=True)
    live = [i for i, loc in enumerate(locs) if not isinstance(loc, Unreachable)]
    missing = []
    for i in live:
        try:
            if not locs[i].root_exists():
                missing.append(i)
        except StorageError:
            if i == 0:
                raise
    known = expected_markers(locs, live) if missing and 0 not in missing else {}
    for i in missing:  # a new prefix in an existing bucket: no folder to create first
        if i not in known and (i == 0 or locs[i].is_local):
            raise UsageError(f"{locs[i].display}: no such checkpoint root")
    return locs


def cmd_repair(args: argparse.Namespace) -> int:
    from ..repair import (
        committed_nowhere,
        repair_step,
        repair_targets,
        restore_command,
        restore_markers,
        summary,
    )
    from ..storage import step_dirname
    from .common import UsageError, emit

    locs = _repair_locations(args)
    if len(locs) < 2:
        raise UsageError("repair needs at least one --replica URL to copy from or to")
    # incremental: the steps referenced too, retired ones as such; ``left``: steps ROOT does
    # not hold (pruned there), not brought back
    steps, left = repair_targets(locs, args.step)
    reports = []
    for t in bar(steps, desc="repair", total=len(steps), enabled=wanted(args), unit="step"):
        r = repair_step(locs, t, args.dry_run)
        if args.step is not None or not committed_nowhere(r):  # else a crashed save: no damage
            reports.append(r)
    ok = all(r.ok for r in reports)
    if ok and not args.dry_run:  # healthy everywhere: a refilled replica gets its marker back
        restore_markers(locs)
    again = restore_command(locs[0], locs[1:])  # + --step N: restores a step ROOT lacks
    line = summary(reports, args.dry_run, left, again)
    if args.json:
        emit({"ok": ok, "dry_run": args.dry_run, "summary": line,
              "steps": [r.to_json() for r in reports],
              "not_at_root": [{"step": s, "locations": w} for s, w in left.items()],
              "not_restored": [{"step": s, "command": f"{again} --step {s}"} for s in left]})
    else:  # the plan, the same lines for a dry run and the run that carries it out
        for s, where in left.items():
            print(f"step {s}: not at {locs[0].display} (pruned there?), only at "
                  f"{', '.join(where)}: not restored (repair --step {s} restores it)",
                  file=sys.stderr)
        for r in reports:
            if r.retired and r.step == args.step:
                print(r.note)
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
        print(line)
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
    "prune": (prune_cmd.cmd_prune, "apply a retention policy; safe to run from cron while "
              "training writes", prune_cmd.add_args),
    "verify": (verify_cmd.cmd_verify, "integrity, completeness, then golden replay",
               verify_cmd.add_args),
    "diff": (diff_cmd.cmd_diff, "compare two checkpoints (ROOT@STEP) tensor by tensor",
             diff_cmd.add_args),
    "report": (report_cmd.cmd_report, "plot a run's history (size, save time, metrics, tags, "
               "verification) to a PNG or an HTML page", report_cmd.add_args),
    **governance_cmd.COMMANDS,  # log, tag, sign, lock (issue 32)
}

