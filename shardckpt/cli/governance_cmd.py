"""Governance commands (issue 32): ``log``, ``tag``, ``sign``, ``lock``, and what ``verify
--public-key`` adds to a verification.

``log`` prints the audit trail oldest first (exit 2 if an object under ``audit/`` is not a
valid record); ``tag`` changes a step's tags beside its manifest; ``sign`` writes the step's
signature (model-signing's format); ``lock`` sets S3 Object Lock retention (exit 64 where the
location has none, naming what is supported). Each change is an audit record.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .argtypes import step_arg
from .common import ROOT_HELP, UsageError, emit


def _locations(args: argparse.Namespace) -> list[Any]:
    from .common import open_locations

    return open_locations([args.root, *args.replica], warn=args.command)


def _manifest(loc: Any, step: int) -> Any:
    """The step's manifest at ``loc``; a retired step (hidden, kept only for the files later
    steps reference) is refused as ``show`` and ``verify`` refuse it."""
    from ..catalog import find_manifest

    return find_manifest([loc], step)[0]


# ------------------------------------------------------------------------------------ log
def cmd_log(args: argparse.Namespace) -> int:
    from ..audit import read_trail
    from ..rootkind import classify_root

    loc = _locations(args)[0]
    classify_root(loc)  # a folder that is not a checkpoint root: exit 2, naming it
    records, bad = read_trail(loc, args.step)
    if args.json:
        emit(records)
    else:
        for r in records:
            job = f" job {r['job']}" if r.get("job") else ""
            step = f"step {r['step']}" if r.get("step") is not None else "-"
            detail = " ".join(f"{k}={v}" for k, v in sorted((r.get("detail") or {}).items())
                              if v not in (None, [], {}, ""))
            print(f"{r['time']}  {r['event']:<13} {step:<16} {r.get('outcome', '-'):<7} "
                  f"{r['user']}@{r['host']}{job}  {detail}"[:400].rstrip())
    for name in bad:
        print(f"shardckpt log: {loc.display}/{name}: not a valid audit record", file=sys.stderr)
    return 2 if bad else 0


def _add_log(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help=ROOT_HELP)
    p.add_argument("--step", type=step_arg, default=None, metavar="N",
                   help="only the records of this step")


# ------------------------------------------------------------------------------------ tag
def cmd_tag(args: argparse.Namespace) -> int:
    from ..steptags import change_tags

    if not (args.add or args.remove or args.note):
        raise UsageError("nothing to do: give --add NAME, --remove NAME or --note TEXT")
    out = []
    for loc in _locations(args):
        manifest = _manifest(loc, args.step)
        try:
            before, after = change_tags(loc, manifest, args.add, args.remove, args.note)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        out.append({"url": loc.display, "before": list(before), "after": list(after)})
        for name in (t for t in args.remove if t not in before):
            print(f"shardckpt tag: note: {loc.display}: step {args.step} had no tag {name!r}",
                  file=sys.stderr)
    if args.json:
        emit({"step": args.step, "tags": out[0]["after"], "locations": out})
    else:
        for o in out:
            print(f"{o['url']}: step {args.step}: tags {' '.join(o['after']) or '(none)'}")
    return 0


def _add_tag(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help=ROOT_HELP)
    p.add_argument("--step", type=step_arg, required=True, metavar="N")
    p.add_argument("--add", action="append", default=[], metavar="NAME",
                   help="add this tag (repeatable; 'pinned' protects from pruning)")
    p.add_argument("--remove", action="append", default=[], metavar="NAME",
                   help="remove this tag (repeatable)")
    p.add_argument("--note", default=None, metavar="TEXT", help="a note kept with the tags "
                   "and in the audit trail")


# ----------------------------------------------------------------------------------- sign
def cmd_sign(args: argparse.Namespace) -> int:
    from ..audit import append
    from ..sign import SIGNATURE_NAME, check_step, load_private_key, sign_step
    from ..sign.bundle import key_hint
    from ..storage import step_dirname

    try:
        key = load_private_key(args.key)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--key {args.key}: {exc}") from None
    locs = _locations(args)
    t0 = time.monotonic()
    rel, nbytes = sign_step(locs[0], args.step, args.key)
    seconds = time.monotonic() - t0
    hint = key_hint(key.public_key())
    problems = []
    if len(locs) > 1:  # the same signature on every replica whose files are the same
        data = locs[0].read_file(rel, 64 << 20)
        for loc in locs[1:]:
            loc.write_atomic(rel, data)
            check = check_step(loc, args.step, [key.public_key()])
            if not check.ok:
                loc.remove(rel)
                problems.append(f"{loc.display}: not signed: {check.detail()}")
    detail = {"signer": hint, "nbytes": nbytes, "seconds": round(seconds, 6),
              "signature": f"{step_dirname(args.step)}/{SIGNATURE_NAME}",
              "replica_problems": problems}
    for loc in locs:
        append(loc, "sign", args.step, "failed" if problems else "ok", detail)
    if args.json:
        emit({"step": args.step, "signature": f"{locs[0].display}/{rel}", "key_hint": hint,
              "nbytes": nbytes, "seconds": round(seconds, 6), "problems": problems})
    else:
        print(f"signed step {args.step}: {locs[0].display}/{rel} ({nbytes} bytes hashed in "
              f"{seconds:.3f} s, key {hint[:16]})")
    for p in problems:
        print(f"shardckpt sign: {p}", file=sys.stderr)
    return 2 if problems else 0


def _add_sign(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help=ROOT_HELP)
    p.add_argument("--step", type=step_arg, required=True, metavar="N")
    p.add_argument("--key", required=True, metavar="KEY.pem",
                   help="PEM private key, ECDSA P-256 (also P-384, P-521), unencrypted")


# ----------------------------------------------------------------------------------- lock
def cmd_lock(args: argparse.Namespace) -> int:
    from ..audit import append
    from ..objectlock import LockUnsupportedError, lock_step, parse_until
    from ..sign.step import covered_files
    from ..storage import step_dirname

    try:
        until = parse_until(args.until)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    results = []
    for loc in _locations(args):
        manifest = _manifest(loc, args.step)
        own = step_dirname(args.step) + "/"
        referenced = [rel for rel in covered_files(manifest).values() if not rel.startswith(own)]
        try:
            result = lock_step(loc, args.step, until, args.mode, referenced)
        except LockUnsupportedError as exc:
            raise UsageError(str(exc)) from None
        append(loc, "lock", args.step, "ok", result)
        results.append({"url": loc.display, **result})
    if args.json:
        emit({"step": args.step, "until": until.isoformat(), "mode": args.mode,
              "locations": results})
    else:
        for r in results:
            print(f"{r['url']}: step {args.step}: {r['locked']} object versions locked until "
                  f"{r['until']} ({r['mode']}), {r['kept_later_date']} already held longer")
    return 0


def _add_lock(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help=ROOT_HELP)
    p.add_argument("--step", type=step_arg, required=True, metavar="N")
    p.add_argument("--until", required=True, metavar="DATE",
                   help="ISO 8601 date or time (UTC unless a zone is given)")
    p.add_argument("--mode", choices=("governance", "compliance"), default="governance",
                   help="governance (default: can be lifted with s3:BypassGovernanceRetention) "
                   "or compliance (by nobody, and not shortened)")


# --------------------------------------------------------------------- verify --public-key
def finish_verify(args: argparse.Namespace, doc: dict[str, Any]) -> dict[str, Any]:
    """``verify``'s document with the signature check (``--public-key``) added, recorded in
    the audit trail. A failed signature makes the verdict exit 2."""
    from ..audit import record_verify
    from ..storage import open_location

    keys = getattr(args, "public_key", None) or []
    root = open_location(args.root)
    if keys:
        from ..sign import check_step, load_public_key

        try:
            pubs = [load_public_key(k) for k in keys]
        except (OSError, ValueError) as exc:
            raise UsageError(f"--public-key: {exc}") from None
        results = [check_step(loc, doc["step"], pubs)
                   for loc in [root, *(open_location(u) for u in args.replica)]]
        ok = all(r.ok for r in results)
        detail = "; ".join(r.detail() for r in results if not r.ok) or \
            f"signature valid; {sum(r.nbytes for r in results)} bytes match their SHA-256"
        doc["checks"].append({"name": "signature", "ok": ok, "skipped": False,
                              "detail": detail})
        if not ok:
            doc["ok"] = False
            doc["exit_code"] = 2
    record_verify(root, doc)
    return doc


COMMANDS = {
    "log": (cmd_log, "the audit trail, oldest first", _add_log),
    "tag": (cmd_tag, "change a step's tags after the fact ('pinned' protects from pruning)",
            _add_tag),
    "sign": (cmd_sign, "sign a step: SHA-256 of every file, model-signing's format", _add_sign),
    "lock": (cmd_lock, "S3 Object Lock retention on every object version of a step",
             _add_lock),
}
