"""``shardckpt ls`` / ``verify`` on a node's local path (the node-local tier, issue 28).

A path is a node's local path when one of its newest step directories holds a
``holdings.json`` (a persistent root never does). Then:

* ``ls PATH`` lists its local steps with the ranks the node holds (its own, or a peer copy) and
  their health judged against ``holdings.json`` (sizes, trailers, header checksums). Exit 2
  when a step is damaged or its records are corrupt; a step directory without holdings (a save
  in flight, or killed) is listed as ``incomplete`` and is not an error.
* ``verify PATH [--step N]`` checks the node's holdings of one step (default: its newest
  complete one) in full: the holdings agree with the manifest, and every file the node holds
  is intact (size, header, every chunk checksum). Exit 0 when all is well, 2 otherwise (exit
  codes as in ``shared/INTERFACE.md``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..textfile import human_bytes
from .common import UsageError, emit

PROBE_STEPS = 3  # step directories looked at (newest first) to tell a node path


def node_location(args: argparse.Namespace) -> Any:
    """The location of ``args.root`` if it is a node's local path, else None."""
    from ..errors import ShardckptError
    from ..storage import open_location
    from ..tier.holdings import HOLDINGS_NAME

    if "://" in args.root and not args.root.startswith("file://"):
        return None  # a node's local path is a local folder
    try:
        loc = open_location(args.root)
        if not loc.is_local or not loc.root_exists():
            return None
        dirs = sorted(loc.list_step_dirs().items(), reverse=True)[:PROBE_STEPS]
        found = any(loc.size(f"{d}/{HOLDINGS_NAME}") is not None for _, d in dirs)
    except (ShardckptError, OSError, ValueError):
        return None  # the ordinary command reports it
    if found and args.replica:
        raise UsageError(f"{args.root} is a node's local path: --replica does not apply")
    return loc if found else None


def node_ls(args: argparse.Namespace) -> int | None:
    """``ls`` of a node's local path; None if ``args.root`` is not one."""
    loc = node_location(args)
    if loc is None:
        return None
    from ..tier.listing import node_steps

    rows = node_steps(loc)
    if args.json:
        emit(rows)
    else:
        print(f"{'STEP':>10}  {'NODE':<8} {'SIZE':>10}  {'HEALTH':<10} RANKS")
        for r in rows:
            ranks = " ".join(f"{x['rank']}:{x['copy']}" + ("" if x["health"] == "ok" else "!")
                             for x in r["ranks"])
            print(f"{r['step']:>10}  {r['node'] or '-':<8} {human_bytes(r['nbytes']):>10}  "
                  f"{r['health']:<10} {ranks or '-'}".rstrip())
            if r["detail"]:
                print(f"{'':>12}{r['detail']}")
    bad = [r for r in rows if r["health"] in ("damaged", "corrupt")]
    for r in bad:
        print(f"shardckpt ls: local step {r['step']}: {r['health']}: {r['detail']}",
              file=sys.stderr)
    return 2 if bad else 0


def _verify(loc: Any, step: int | None) -> dict[str, Any]:
    from ..catalog import read_manifest
    from ..errors import IncompleteCheckpointError
    from ..repair import verify_file
    from ..storage import step_dirname
    from ..tier.holdings import HeldFile, read_holdings

    if step is None:
        complete = [s for s, d in loc.list_step_dirs().items()
                    if loc.size(f"{d}/holdings.json") is not None]
        if not complete:
            raise IncompleteCheckpointError(f"{loc.display}: no complete local step")
        step = max(complete)
    step_dir = step_dirname(step)
    try:
        holdings = read_holdings(loc, step_dir)
    except FileNotFoundError:
        raise IncompleteCheckpointError(f"{loc.display}/{step_dir}: no holdings.json (the "
                                        f"node's copy of step {step} is not complete)") from None
    manifest = read_manifest(loc, step)
    ranks = []
    for rank, files in sorted(holdings.ranks.items()):
        listed = {n: HeldFile(f.nbytes, f.header_xxh3) for n, f in manifest.files.items()
                  if f.rank == rank}
        problem = None if listed == dict(files) else (
            f"{loc.display}/{step_dir}/holdings.json: rank {rank}'s files differ from the "
            f"manifest's")
        for name in sorted(files):
            if problem is None and (why := verify_file(loc, step, manifest, name)):
                problem = why if name in why else f"{loc.display}/{step_dir}/{name}: {why}"
        ranks.append({"rank": rank, "copy": "own" if holdings.node_map.nodes[rank] ==
                      holdings.node else "peer", "files": len(files),
                      "nbytes": sum(f.nbytes for f in files.values()),
                      "health": problem or "ok"})
    ok = all(r["health"] == "ok" for r in ranks)
    return {"step": step, "node": holdings.node, "root": loc.display, "ok": ok,
            "exit_code": 0 if ok else 2, "ranks": ranks}


def node_verify(args: argparse.Namespace) -> int | None:
    """``verify`` of a node's local path; None if ``args.root`` is not one."""
    loc = node_location(args)
    if loc is None:
        return None
    if args.model is not None or (args.nproc or 1) > 1:
        raise UsageError(f"{args.root} is a node's local path: verify checks the node's "
                         f"holdings (--model and --nproc apply to a checkpoint root)")
    doc = _verify(loc, args.step)
    if args.json:
        emit(doc)
    else:
        print(f"local step {doc['step']} on node {doc['node']} ({doc['root']}): "
              f"{'ok' if doc['ok'] else 'FAILED'}")
        for r in doc["ranks"]:
            print(f"  rank {r['rank']:>5} {r['copy']:<4} {r['files']:>3} files "
                  f"{human_bytes(r['nbytes']):>10}  {r['health']}")
    return int(doc["exit_code"])
