"""Recovery after losing a node: the node-local tier against the persistent tier, in one run.

Run with plain python (it starts the simulated nodes itself; see docs/benchmarks.md):

    .venv/bin/python benchmarks/recovery.py --out recovery.json --plot recovery.png

4 ranks as 2 simulated nodes: two ``torchrun --nnodes 2 --node-rank i`` agents on 127.0.0.1
(static rendezvous), 2 workers each, each node with its own local path (``--local-dir``/<node>,
tmpfs by default: a RAM disk). Every rank trains an FSDP2 stack of Linear layers with AdamW
(``--state-mb`` of fp32 state per rank) on the CPU with gloo. S3 is ``moto_server`` on 127.0.0.1.

1. **Training** (one launch). First the measured saves: per round, one save of each kind
   (``none``, ``local``, ``persistent_disk``, ``persistent_s3``), rounds rotated, each between
   windows of steps (extra loop time, as ``training_overhead.py`` measures it). Then the job that
   fails: a local save every ``--local-every`` steps (copies=2, keep=2) and a persistent one every
   ``--persistent-every`` (local disk and S3 alike). After step ``--kill-after`` (K) its workers
   run to the step before the next local save, wait for every save in flight and write a marker.
2. **The failure.** Once every marker says that step K's local save has committed (and its
   ``holdings.json`` is on both nodes), node ``--killed-node``'s agent and workers are SIGKILLed
   (their process groups: torchrun starts each worker in a session of its own; each worker
   wrote its pid and process group). The surviving node is then stopped (SIGTERM to its agent,
   SIGKILL after 15 s) and the lost node's path deleted (a replaced machine).
3. **Resumes**, ``--reps`` rounds, variants rotated, each a fresh launch of both nodes:
   ``local`` (the issue's example, a manager on S3 with the local tier: step K, the new node's
   ranks receiving their files from their peer copies), ``persistent_disk`` and
   ``persistent_s3`` (a manager without a local tier, as a job without one: the newest
   persistent step; the disk's files are evicted from the page cache first). The lost node's
   path is emptied again before every ``local`` resume.

One JSON document goes to stdout and ``--out`` (logs to stderr), with ``--plot`` a figure; the
two targets of issue 28 are printed PASS/MISS: the ``load()`` of the local resume at least 3x
faster than the one from S3, and a local save's extra loop time at most 0.5x a save to S3's.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common.machine import git_info, machine_info
from common.output import capture_stdout, log, write_outputs
from common.pagecache import PageCache
from common.rounds import interleaved_rounds
from recovery_parts.launch import Job, Moto, worker_env
from recovery_parts.summary import (
    DEFINITIONS,
    RESUMES,
    overhead_summary,
    plot,
    resume_summary,
    target_lines,
    targets,
)

SCRIPT = os.path.abspath(__file__)
WORLD, NODES = 4, 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state-mb", type=float, default=32.0, help="fp32 state per rank, 1e6 B")
    p.add_argument("--width", type=int, default=None, help="Linear width (default: by size)")
    p.add_argument("--batch", type=int, default=16, help="rows per training step and rank")
    p.add_argument("--local-every", type=int, default=2, help="steps between local saves (N)")
    p.add_argument("--persistent-every", type=int, default=10,
                   help="steps between persistent saves (M)")
    p.add_argument("--kill-after", type=int, default=18,
                   help="K: the node dies once step K's local save has committed, at step "
                        "K + N - 1 (just before the next local save); a multiple of N, >= M")
    p.add_argument("--killed-node", type=int, default=1, choices=(0, 1))
    p.add_argument("--keep", type=int, default=2, help="local steps kept per node")
    p.add_argument("--reps", type=int, default=3, help="resume rounds (each variant once)")
    p.add_argument("--resumes", default=",".join(RESUMES),
                   help=f"the resume variants, a subset of {','.join(RESUMES)}")
    p.add_argument("--overhead-rounds", type=int, default=3,
                   help="rounds of measured saves (each kind once); 0: none")
    p.add_argument("--window", type=int, default=3, help="steps per window of a measured save")
    p.add_argument("--max-window", type=int, default=60,
                   help="most steps run while a measured save is in flight")
    p.add_argument("--dir", default=tempfile.gettempdir(),
                   help="the persistent tier on disk and the run's files (a local disk)")
    p.add_argument("--local-dir", default="/dev/shm" if os.path.isdir("/dev/shm")
                   else tempfile.gettempdir(), help="the nodes' local paths (default tmpfs)")
    p.add_argument("--no-drop-caches", action="store_true",
                   help="do not evict the persistent disk tier before its resumes")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per launch")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--plot", default=None, help="PNG: resume times, extra loop, steps lost")
    p.add_argument("--keep-files", action="store_true", help="keep the checkpoints and logs")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # under torchrun
    args = p.parse_args(argv)
    args.resumes = [v for v in args.resumes.split(",") if v]
    if args.worker is None and (set(args.resumes) - set(RESUMES) or not args.resumes):
        p.error(f"--resumes: a subset of {','.join(RESUMES)}")
    if args.worker is None:
        n, m, k = args.local_every, args.persistent_every, args.kill_after
        if min(n, m, k, args.window, args.keep) < 1 or args.reps < 1:
            p.error("steps, --window, --keep and --reps must be positive")
        if k % n or k < m:
            p.error("--kill-after must be a multiple of --local-every and >= --persistent-every")
    return args


def write_config(run: Path, launch: str, cfg: dict[str, Any], **extra: Any) -> Path:
    path = run / "config" / f"{launch}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**cfg, **extra, "launch": launch}))
    return path


def wait_for_markers(job: Job, run: Path, timeout: float) -> list[dict[str, Any]]:
    """Every rank's marker (the job waits to be killed once it has written it)."""
    paths = [run / f"marker-rank{r}.json" for r in range(WORLD)]
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        message = job.failed()
        if message:
            raise RuntimeError(f"training failed before the failure point: {message}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no marker after {timeout} s\n{job.log_tail()}")
        time.sleep(0.05)  # polling files another process writes
    return [json.loads(p.read_text()) for p in paths]


def fail_a_node(args: argparse.Namespace, cfg: dict[str, Any], run: Path, local_base: Path
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train until step K's local save has committed, kill a node, stop the other, delete the
    lost node's path. Returns what happened and every rank's marker."""
    k, killed = args.kill_after, args.killed_node
    job = Job(SCRIPT, write_config(run, "train", cfg, mode="train"), run, "train")
    try:
        markers = wait_for_markers(job, run, args.timeout)
        t_marked = time.time()
        committed = [m["local_steps"] for m in markers]
        everywhere = set.intersection(*(set(c) for c in committed))
        newest = max(everywhere, default=None)
        holdings = {n: newest is not None and (local_base / str(n) / f"step-{newest:010d}" /
                                               "holdings.json").exists() for n in range(NODES)}
        if newest is None or not all(holdings.values()):
            raise RuntimeError(f"no local step committed on every node: local steps per rank "
                               f"{committed}, holdings.json {holdings}")
        if newest != k:  # a skipped local save (the one before was still running): say so
            log(f"WARNING: local step {k} is not committed (skipped saves: "
                f"{markers[0]['skipped_local_saves']}); the newest local step is {newest}. "
                f"Raise --local-every or lower --state-mb for the configured failure")
        t_kill = time.time()
        pids = job.kill_node(killed)
        job.gone(pids)
        log(f"killed node {killed} (SIGKILL: agent {pids[0]}, workers {pids[1:]}) after "
            f"step {markers[0]['last_step']}; local step {newest} committed")
        survivor = 1 - killed
        survivors = [job.agents[survivor].pid, *(w["pid"] for w in job.workers(survivor))]
        t_stop = time.time()
        job.stop_node(survivor)
        job.gone(survivors)
        stop_s = time.time() - t_stop
    finally:
        job.cleanup()
    shutil.rmtree(local_base / str(killed))  # the replaced machine has an empty local path
    step_s = sorted(s for m in markers for s in m["step_s"])
    return {
        "last_step_done": markers[0]["last_step"],
        "local_step_planned": k,
        "local_step_committed": newest,
        "local_steps_at_failure": committed[0],
        "persistent_disk_steps_at_failure": markers[0]["persistent_disk_steps"],
        "persistent_s3_steps_at_failure": markers[0]["persistent_s3_steps"],
        "skipped_local_saves": markers[0]["skipped_local_saves"],
        "killed_node": killed, "killed_pids": pids, "signal": "SIGKILL (process groups)",
        "survivor_stopped": "SIGTERM to its agent, SIGKILL after 15 s", "survivor_stop_s": stop_s,
        "marker_to_kill_s": t_kill - t_marked,
        "wait_for_saves_before_failure_s": max(m["final_wait_s"] for m in markers),
        "training_step_s_median": step_s[len(step_s) // 2] if step_s else None,
        "lost_path_deleted": str(local_base / str(killed)),
        "warnings": sorted({w for m in markers for w in m["warnings"]}),
    }, markers


def resume_rounds(args: argparse.Namespace, cfg: dict[str, Any], run: Path, local_base: Path,
                  disk_root: Path) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """``--reps`` rounds of the three resumes, rotated; each a fresh launch of both nodes."""
    cache = PageCache(not args.no_drop_caches)

    def one(variant: str, rep: int) -> dict[str, Any]:
        launch = f"resume-{variant}-{rep}"
        resident = None
        if variant == "local":  # the replaced node's path, empty again
            shutil.rmtree(local_base / str(args.killed_node), ignore_errors=True)
        elif variant == "persistent_disk":
            resident = cache.evict([str(disk_root)])
        job = Job(SCRIPT, write_config(run, launch, cfg, mode="resume", variant=variant), run,
                  launch)
        try:
            job.wait(args.timeout)
        finally:
            job.cleanup()
        ranks = [json.loads(p.read_text()) for p in sorted(
            (run / "result").glob(f"{launch}-rank*.json"))]
        if len(ranks) != WORLD:
            raise RuntimeError(f"{launch}: {len(ranks)} results of {WORLD}\n{job.log_tail()}")
        log(f"{launch}: step {ranks[0]['step']} from {ranks[0]['tier']}, load "
            f"{max(r['load_s'] for r in ranks):.2f} s")
        return {"t_launch": job.t_launch, "ranks": ranks, "resident_bytes_before": resident}

    return interleaved_rounds(args.resumes, args.reps, one), cache.note


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        from recovery_parts.worker import main as worker_main

        return worker_main(args.worker)
    capture_stdout()
    # SIGTERM (a test's timeout, a scheduler) unwinds through the finally blocks below, which
    # kill the nodes and moto: they run in sessions of their own and would outlive this process
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    base = Path(tempfile.mkdtemp(prefix="recovery-bench-", dir=args.dir))
    local_base = Path(tempfile.mkdtemp(prefix="recovery-bench-", dir=args.local_dir))
    run, disk_root = base / "run", base / "persistent"
    moto = Moto(base / "moto.log")  # starts while this process imports torch
    ok = False
    try:
        machine = machine_info(str(base))
        moto.wait_ready()
        bucket = moto.bucket(f"recovery-{uuid.uuid4().hex[:12]}")
        n, m, k = args.local_every, args.persistent_every, args.kill_after
        cfg = {"run_dir": str(run), "state_gb": args.state_mb * WORLD / 1000,
               "width": args.width, "batch": args.batch, "local_every": n,
               "persistent_every": m, "keep": args.keep, "hold_step": k + n - 1,
               "local_path": str(local_base / "{node}"), "disk_root": str(disk_root),
               "s3_root": f"s3://{bucket}/run", "storage_options": moto.storage_options,
               "overhead_rounds": args.overhead_rounds, "window": args.window,
               "max_window": max(args.window, args.max_window),
               "overhead_disk": str(base / "overhead"),
               "overhead_local": str(local_base / "overhead" / "{node}"),
               "overhead_s3": f"s3://{bucket}/overhead", "hold_timeout_s": args.timeout}
        log(f"training: 2 nodes x 2 ranks, {args.state_mb} MB per rank, local every {n}, "
            f"persistent every {m}, failure after step {k + n - 1}")
        failure, markers = fail_a_node(args, cfg, run, local_base)
        shutil.rmtree(local_base / "overhead", ignore_errors=True)
        reps, cache_note = resume_rounds(args, cfg, run, local_base, disk_root)
        ok = True
    finally:
        moto.stop()
        if not args.keep_files:  # the local paths are memory (tmpfs): never left behind
            shutil.rmtree(local_base, ignore_errors=True)
            if ok:
                shutil.rmtree(base, ignore_errors=True)
        if not ok:
            log(f"failed: the logs are under {run / 'logs'}")
    resume = resume_summary(reps, failure["last_step_done"])
    overhead = {**overhead_summary(markers[0]["overhead"]["pairs"], args.window),
                "rounds": args.overhead_rounds,
                "order_per_round": markers[0]["overhead"].get("order_per_round", [])}
    step_s = overhead["baseline_step_s"] or failure["training_step_s_median"]
    doc: dict[str, Any] = {
        "benchmark": "recovery after losing a node: local tier vs persistent tier "
                     "(benchmarks/recovery.py)",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_info(),
        "machine": machine,
        "config": {"nodes": NODES, "ranks_per_node": WORLD // NODES, "world_size": WORLD,
                   "state_bytes_per_rank": markers[0]["state_bytes"],
                   "model": markers[0]["shape"], "batch": args.batch,
                   "local_every": n, "persistent_every": m, "kill_after": k,
                   "copies": 2, "keep": args.keep, "reps": args.reps,
                   "overhead_rounds": args.overhead_rounds, "window": args.window,
                   "local_dir": str(local_base), "persistent_dir": str(disk_root),
                   "s3": "moto_server on 127.0.0.1", "page_cache": cache_note,
                   "connect_timeout_s": float(worker_env()["SHARDCKPT_CONNECT_TIMEOUT"]),
                   "device": "cpu (gloo)"},
        "definitions": DEFINITIONS,
        "failure": failure,
        "resume": resume,
        "steps_lost": {v: resume[v]["steps_lost"] for v in resume},
        "steps_lost_mean_if_failure_time_uniform": {"local": (n - 1) / 2,
                                                    "persistent": (m - 1) / 2},
        "time_lost_s": {v: (resume[v]["steps_lost"] or 0) * (step_s or 0)
                        + (resume[v]["relaunch_to_first_step_s_median"] or 0) for v in resume},
        "overhead": overhead,
        "notes": [
            "S3 is moto_server on 127.0.0.1: a Python server on the same CPUs; its speed is "
            "moto's, not S3's",
            "the local tier is on --local-dir (tmpfs by default, a RAM disk): a surviving "
            "node's copies are in memory, as they would be; the persistent disk tier is "
            "evicted from the page cache before each of its resumes (see config.page_cache)",
            "the persistent resumes run a manager without a local tier (a job without one)",
            "time_lost_s: steps lost x the baseline step time + the relaunch to the first step",
        ],
    }
    doc["targets"] = targets(resume, overhead)
    doc["target_lines"] = target_lines(doc)
    write_outputs(doc, out=args.out, plot=args.plot, draw=plot)
    for line in doc["target_lines"]:
        log(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
