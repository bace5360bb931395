"""How fast the command line starts, and how much memory ``ls`` takes (issue 16).

Each variant runs as a fresh process, interleaved over rounds (medians reported): a bare
``python -c pass`` (the floor), ``shardckpt --help``, and ``shardckpt ls`` / ``show`` / ``prune
--dry-run`` of a local root holding ``--steps`` checkpoints. Each child reports its own peak RSS
(``VmHWM``). Prints one JSON document with the times, the ratio of each to the bare
interpreter, the RSS, and the issue's targets.

    .venv/bin/python benchmarks/cli_startup.py --steps 20 --reps 7 --out cli.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from common.output import write_outputs
from common.rounds import interleaved_rounds, medians

# VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork and exec.
CHILD = ("import runpy, sys\n"
         "sys.argv = ['shardckpt', *sys.argv[1:]]\n"
         "try:\n"
         "    runpy.run_module('shardckpt', run_name='__main__')\n"
         "except SystemExit:\n"
         "    pass\n"
         "hwm = [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')]\n"
         "print('RSS_KB', hwm[0] if hwm else 0, file=sys.stderr)\n")


def make_root(path: str, steps: int) -> None:
    import torch

    import shardckpt

    with shardckpt.CheckpointManager(path, async_save=False, capture_rng=False) as mgr:
        for s in range(1, steps + 1):
            mgr.save(s, {"model": {f"layer{i}.weight": torch.randn(64, 64) for i in range(8)}},
                     metrics={"loss": 1.0 / s})


def run_one(argv: list[str]) -> tuple[float, int | None]:
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{argv}: exit {done.returncode}: {done.stderr[-500:]}")
    rss = [int(line.split()[1]) * 1024 for line in done.stderr.splitlines()
           if line.startswith("RSS_KB ")]
    return wall, (rss[-1] if rss else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="checkpoints in the listed root")
    p.add_argument("--reps", type=int, default=7, help="rounds (each runs every variant once)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="shardckpt-cli-") as tmp:
        root = os.path.join(tmp, "run")
        make_root(root, args.steps)
        py = sys.executable
        variants = {
            "python_pass": [py, "-c", CHILD.replace("runpy.run_module", "(lambda *a, **k: 0)")],
            "help": [py, "-c", CHILD, "--help"],
            "ls": [py, "-c", CHILD, "ls", root],
            "show": [py, "-c", CHILD, "show", root],
            "prune_dry_run": [py, "-c", CHILD, "prune", root, "--keep-last", "3", "--dry-run"],
        }
        runs = interleaved_rounds(list(variants), args.reps, lambda v, _: run_one(variants[v]))
    seconds = medians({k: [w for w, _ in v] for k, v in runs.items()})
    rss = medians({k: [r for _, r in v] for k, v in runs.items()})
    floor = seconds["python_pass"] or 1e-9
    doc: dict[str, Any] = {
        "steps": args.steps, "reps": args.reps, "seconds": seconds,
        "ratio_to_python_pass": {k: v / floor for k, v in seconds.items() if v is not None},
        "peak_rss_bytes": {k: v for k, v in rss.items() if k != "python_pass"},
        "loadavg": os.getloadavg(),
        "targets": {
            "help_within_few_times_python_pass": (seconds["help"] or 0) / floor,
            "ls_under_1s": seconds["ls"],
            "ls_peak_rss_under_100MB": rss["ls"],
        },
    }
    write_outputs(doc, out=args.out)


if __name__ == "__main__":
    main()
