"""The CLI's commands: each takes parsed arguments and returns an exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ..format import manifest as M
from ..manager import read_manifest
from ..storage import Location, open_location
from . import health


def _locations(args: argparse.Namespace) -> list[Location]:
    from .main import UsageError

    urls = [args.root, *args.replica]
    locs = [open_location(u) for u in urls]
    for loc, url in zip(locs, urls):
        if not loc.root_exists():
            raise UsageError(f"{url}: no such checkpoint root")
    return locs


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _metrics_json(m: M.Manifest) -> dict[str, Any]:
    return {k: M.encode_float(v) for k, v in m.metrics.items()}


def cmd_ls(args: argparse.Namespace) -> int:
    locs = _locations(args)
    report = health.survey(locs)
    rows = []
    for step, entry in sorted(report.steps.items()):
        m = entry.manifest
        rows.append({"step": step, "time": m.time, "nbytes": m.nbytes,
                     "metrics": _metrics_json(m), "tags": list(m.tags),
                     "world_size": m.world_size,
                     "locations": [{"url": loc.display, "health": entry.health[i]}
                                   for i, loc in enumerate(locs)]})
    if args.json:
        from .main import emit

        emit(rows)
    else:
        print(f"{'STEP':>10}  {'TIME':<29} {'SIZE':>10} {'WORLD':>5}  {'HEALTH':<10} "
              f"METRICS / TAGS")
        for r in rows:
            states = {loc["health"] for loc in r["locations"]}
            status = "ok" if states == {"ok"} else ",".join(sorted(states))
            metrics = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in r["metrics"].items())
            print(f"{r['step']:>10}  {r['time']:<29} {_human_bytes(r['nbytes']):>10} "
                  f"{r['world_size']:>5}  {status:<10} {metrics} {' '.join(r['tags'])}".rstrip())
    for problem in report.problems:
        print(f"shardckpt ls: {problem}", file=sys.stderr)
    return 2 if report.problems else 0


def cmd_show(args: argparse.Namespace) -> int:
    from .main import UsageError, emit

    locs = _locations(args)
    step = args.step
    if step is None:
        steps = sorted(health.survey(locs).steps)
        if not steps:
            raise UsageError(f"{args.root}: no committed checkpoint")
        step = steps[-1]
    m = read_manifest(locs[0], step)
    doc = m.to_json()
    extras = sorted(set(doc) - M.CORE_FIELDS)
    if args.json:
        emit({**doc, "nbytes": m.nbytes})
        return 0
    print(f"step {m.step}  saved {m.time}  world size {m.world_size}  "
          f"{_human_bytes(m.nbytes)} in {len(m.files)} files  save id {m.save_id}")
    if m.metrics:
        print("metrics: " + ", ".join(f"{k}={v:.6g}" for k, v in m.metrics.items()))
    if m.tags:
        print("tags: " + ", ".join(m.tags))
    print(f"\n{'TENSOR':<60} {'DTYPE':<14} {'SHAPE':<20} {'PIECES':>6} {'BYTES':>10}")
    for key, entry in m.tensors.items():
        if entry.alias_of is not None:
            print(f"{key:<60} (same storage as {entry.alias_of})")
            continue
        metas = entry.per_rank if entry.per_rank is not None else (entry.meta,)
        for r, meta in enumerate(metas):
            assert meta is not None
            name = key if entry.per_rank is None else f"{key} [rank {r}]"
            print(f"{name:<60} {meta.dtype:<14} {list(meta.shape)!s:<20} "
                  f"{len(meta.pieces):>6} {_human_bytes(meta.nbytes):>10}")
    for key in extras:
        print(f"\n{key}: {doc[key]}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..consolidate import consolidate
    from .main import UsageError, emit

    locs = _locations(args)
    tensors = consolidate(locs[0], args.step, args.only)
    if not tensors:
        raise UsageError(f"step {args.step} has no tensors" + (f" under {args.only!r}"
                                                                if args.only else ""))
    if args.format == "safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise UsageError("--format safetensors needs the safetensors package "
                             "(pip install 'shardckpt[export]')") from None
        # safetensors refuses shared storage: tied weights are written as separate copies
        seen: set[int] = set()
        flat = {}
        for k, v in tensors.items():
            flat[k] = v.clone() if id(v) in seen else v.contiguous()
            seen.add(id(v))
        save_file(flat, args.out, metadata={"shardckpt_step": str(args.step)})
    else:
        import torch

        torch.save(tensors, args.out)  # plain tensors for users' tools; we never read these
    nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
    if args.json:
        emit({"step": args.step, "format": args.format, "out": args.out,
              "tensors": len(tensors), "nbytes": nbytes})
    else:
        print(f"wrote {len(tensors)} tensors ({_human_bytes(nbytes)}) of step {args.step} to "
              f"{args.out}")
    return 0


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help="checkpoint root: a path or fsspec URL")
    p.add_argument("--step", type=int, required=True, help="step to export")
    p.add_argument("--format", choices=("safetensors", "torch"), required=True)
    p.add_argument("--out", required=True, metavar="PATH", help="output file")
    p.add_argument("--only", metavar="PREFIX", default=None,
                   help="export only tensors under this key prefix, stripped (e.g. 'model')")


def _add_ls(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help="checkpoint root: a path or fsspec URL")


def _add_show(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help="checkpoint root: a path or fsspec URL")
    p.add_argument("--step", type=int, default=None, help="step to show (default: latest)")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str,
                          Callable[[argparse.ArgumentParser], None]]] = {
    "ls": (cmd_ls, "list committed checkpoints with size, metrics, tags and location health",
           _add_ls),
    "show": (cmd_show, "print one checkpoint's manifest in full", _add_show),
    "export": (cmd_export, "write one consolidated, unsharded safetensors or torch file",
               _add_export),
}

