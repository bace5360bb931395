"""Training-loop overhead of asynchronous checkpointing: shardckpt vs PyTorch DCP, in one run.

Run under torchrun (see docs/benchmarks.md):

    torchrun --standalone --nproc-per-node 2 benchmarks/training_overhead.py \
        --state-mb 128 --step-time 1.2 --save-every 3 --rounds 3 --out t.json --plot t.png

Every rank trains the same FSDP2 (``fully_shard``) stack of Linear layers with AdamW, about
``--state-mb`` MB of fp32 state (parameters + ``exp_avg`` + ``exp_avg_sq``) per rank, with a
batch sized so that one step takes about ``--step-time`` seconds. Each round runs the same loop
once per mode, in an order rotated by one per round:

* ``none``: no checkpoints (the baseline);
* ``shardckpt``: ``mgr.save(step, state)`` (lazy snapshots, the default);
* ``shardckpt_eager``: the same with ``snapshot="eager"`` (only with ``--modes``);
* ``dcp_async``: ``get_state_dict`` + ``dcp.async_save`` on its own gloo group (thread mode);
* ``dcp_zero_overhead``: ``dcp.async_save(..., async_stager=DefaultStager(StagingOptions(...)))``
  (one stager, reused), waiting on ``staging_completion`` before the next ``optimizer.step``.

A loop of one mode saves every ``--save-every`` steps, ``--saves`` times, and runs
``--save-every`` more steps after its last save. Each save waits for the previous one (as
``mgr.save`` does). Per save, the figures are:

* **extra loop seconds**: (the loop's time - the same round's ``none`` loop) / saves;
* **blocked seconds**: the time inside the save call (with ``get_state_dict`` for DCP), plus how
  much longer the next ``optimizer.step`` took (with DCP's wait for staging) than the median
  step of the ``none`` loop;
* the training thread's extra CPU, run-queue delay (runnable, no core free) and other waiting
  (the GIL, collectives), from ``/proc/self/task/<tid>/schedstat``, and the process's extra CPU
  (user, system): where the overhead goes.

Figures are the maximum over the ranks within a round, then the median over the rounds. One
JSON document goes to stdout (rank 0) and to ``--out``; logs go to stderr.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.fsdp import fully_shard

import shardckpt

REPO = Path(__file__).resolve().parent.parent
MODES = ("none", "shardckpt", "shardckpt_eager", "dcp_async", "dcp_zero_overhead")
DEFAULT_MODES = ("none", "shardckpt", "dcp_async", "dcp_zero_overhead")
RANK = int(os.environ.get("RANK", "0"))


def log(msg: str) -> None:
    if RANK == 0:
        print(f"[overhead {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state-mb", type=float, default=128.0, help="fp32 state per rank, 1e6 B")
    p.add_argument("--layers", type=int, default=8, help="Linear layers of the model")
    p.add_argument("--step-time", type=float, default=1.2, help="target seconds per step")
    p.add_argument("--save-every", type=int, default=3, help="steps between saves")
    p.add_argument("--saves", type=int, default=4, help="saves per loop")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (medians over them)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"subset of {MODES}")
    p.add_argument("--dir", default="/work/bench_tmp", help="where checkpoints are written")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--plot", default=None, help="PNG: extra loop and blocked seconds per save")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if set(args.modes) - set(MODES) or "none" not in args.modes:
        p.error(f"--modes: a subset of {MODES} including none")
    return args


# ----------------------------------------------------------------------------- measurement
def schedstat() -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of the calling thread."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
            run_ns, wait_ns, _ = f.read().split()
        return int(run_ns) / 1e9, int(wait_ns) / 1e9
    except OSError:
        return time.thread_time(), 0.0


class Meter:
    """Wall, thread and process clocks over one loop."""

    def __init__(self) -> None:
        self.wall, self.sched = time.perf_counter(), schedstat()
        self.proc = resource.getrusage(resource.RUSAGE_SELF)

    def stop(self) -> dict[str, float]:
        wall, (run, wait) = time.perf_counter(), schedstat()
        proc = resource.getrusage(resource.RUSAGE_SELF)
        return {"loop_s": wall - self.wall, "main_cpu_s": run - self.sched[0],
                "main_runqueue_s": wait - self.sched[1],
                "proc_user_s": proc.ru_utime - self.proc.ru_utime,
                "proc_sys_s": proc.ru_stime - self.proc.ru_stime}


# ----------------------------------------------------------------------------- the model
class Trainer:
    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        params = args.state_mb * 1e6 / 12 * dist.get_world_size()  # 12 B per parameter
        self.width = width = max(64, round((params / args.layers) ** 0.5))
        torch.manual_seed(0)
        self.model = nn.Sequential(*[nn.Linear(width, width) for _ in range(args.layers)])
        self.model.to(device)
        for layer in self.model:
            fully_shard(layer)
        fully_shard(self.model)
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.device = device
        self.batch = 64
        self.x = torch.randn(self.batch, width, device=device)
        self.step(lambda: None)
        self.state_bytes = sum(t.numel() * t.element_size() for t in self._locals())

    def _locals(self) -> list[torch.Tensor]:
        out = [p.to_local() for p in self.model.parameters()]
        out += [v.to_local() if hasattr(v, "to_local") else v for st in self.optim.state.values()
                for v in st.values()]
        return out

    def calibrate(self, seconds: float) -> None:
        """Size the batch so that a step takes about ``seconds`` (the slowest rank decides)."""
        for _ in range(3):
            t0 = time.perf_counter()
            self.step(lambda: None)
            took = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
            self.batch = max(1, round(self.batch * seconds / float(took)))
            self.x = torch.randn(self.batch, self.width, device=self.device)

    def step(self, before_optim: Any) -> float:
        """One training step; returns the seconds of ``before_optim()`` + ``optimizer.step``."""
        self.model(self.x).square().mean().backward()
        t0 = time.perf_counter()
        before_optim()
        self.optim.step()
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # a step that waits on the GPU shows here
        took = time.perf_counter() - t0
        self.optim.zero_grad(set_to_none=True)
        return took


# ----------------------------------------------------------------------------- the modes
class Mode:
    """One way of checkpointing: ``save`` (timed: blocked), ``before_optim`` (timed with the
    next optimizer step), ``finish`` (untimed: waits for the last save)."""

    def __init__(self, name: str, root: str, trainer: Trainer, group: Any) -> None:
        self.name, self.root, self.t = name, root, trainer
        self.group = group
        self.pending: Any = None
        self.mgr: shardckpt.CheckpointManager | None = None
        self.stager: Any = None
        if name.startswith("shardckpt"):
            snapshot = "eager" if name == "shardckpt_eager" else "lazy"
            self.mgr = shardckpt.CheckpointManager(root, snapshot=snapshot, capture_rng=False)
        if name == "dcp_zero_overhead":
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = trainer.device.type == "cuda"
            self.stager = DefaultStager(StagingOptions(use_pinned_memory=cuda,
                                                       use_shared_memory=False,
                                                       use_async_staging=True,
                                                       use_non_blocking_copy=cuda))
        self.staging: Any = None

    def save(self, step: int) -> None:
        state = {"model": self.t.model, "optim": self.t.optim}
        if self.mgr is not None:
            self.pending = self.mgr.save(step, state)
            return
        if self.pending is not None:  # one save at a time, as mgr.save does
            self.pending.result()
        msd, osd = get_state_dict(self.t.model, self.t.optim)
        path = f"{self.root}/step-{step:06d}"
        if self.stager is None:
            self.pending = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=path,
                                          process_group=self.group)
        else:
            resp = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=path,
                                  process_group=self.group, async_stager=self.stager)
            self.staging, self.pending = resp.staging_completion, resp.upload_completion

    def before_optim(self) -> None:
        if self.staging is not None:  # DCP's zero-overhead pattern: the user waits here
            self.staging.result()
            self.staging = None

    def finish(self) -> None:
        if self.mgr is not None:
            self.mgr.wait()
        elif self.pending is not None:
            self.pending.result()
        self.pending = None

    def close(self) -> None:
        self.finish()
        if self.mgr is not None:
            self.mgr.close()
        if self.stager is not None:
            self.stager.close()


def run_loop(mode: Mode | None, trainer: Trainer, args: argparse.Namespace,
             first_step: int) -> dict[str, Any]:
    steps = (args.saves + 1) * args.save_every
    save_s, opt_s, after_save = [], [], []
    dist.barrier()
    meter = Meter()
    saved_at = None
    for i in range(1, steps + 1):
        took = trainer.step(mode.before_optim if mode is not None else lambda: None)
        opt_s.append(took)
        if saved_at is not None:
            after_save.append(took)
            saved_at = None
        if mode is not None and i % args.save_every == 0 and i <= args.saves * args.save_every:
            t0 = time.perf_counter()
            mode.save(first_step + i)
            save_s.append(time.perf_counter() - t0)
            saved_at = i
    out = meter.stop()
    t0 = time.perf_counter()
    if mode is not None:
        mode.finish()
    out["drain_s"] = time.perf_counter() - t0  # background work left when the loop ended
    out.update(save_s=save_s, opt_s=opt_s, opt_after_save_s=after_save, saves=len(save_s),
               steps=steps)
    if mode is not None and mode.mgr is not None:
        from shardckpt.engine import lazy
        from shardckpt.engine.save import last_profile

        out["last_save_profile"] = dict(last_profile)
        out["last_copy"] = dict(lazy.last_stats)
    return out


def gather(value: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, json.loads(json.dumps(value)))  # plain JSON values only
    return out


def per_save(mode: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, float]:
    """One round of one mode against the same round's baseline: the worst rank's figures."""
    figures: dict[str, list[float]] = {}
    for m, b in zip(mode, base):
        n = max(1, m["saves"])
        typical = statistics.median(b["opt_s"])
        row = {
            "extra_loop_s": (m["loop_s"] - b["loop_s"]) / n,
            "blocked_s": (sum(m["save_s"]) + sum(x - typical for x in m["opt_after_save_s"])) / n,
            "in_save_s": sum(m["save_s"]) / n,
            "next_step_extra_s": sum(x - typical for x in m["opt_after_save_s"]) / n,
            "main_cpu_extra_s": (m["main_cpu_s"] - b["main_cpu_s"]) / n,
            "main_runqueue_extra_s": (m["main_runqueue_s"] - b["main_runqueue_s"]) / n,
            "proc_user_extra_s": (m["proc_user_s"] - b["proc_user_s"]) / n,
            "proc_sys_extra_s": (m["proc_sys_s"] - b["proc_sys_s"]) / n,
            "drain_s": m["drain_s"],
        }
        row["main_other_wait_extra_s"] = (row["extra_loop_s"] - row["main_cpu_extra_s"]
                                          - row["main_runqueue_extra_s"])
        for k, v in row.items():
            figures.setdefault(k, []).append(v)
    return {k: max(v) for k, v in figures.items()}


# ----------------------------------------------------------------------------- main
def git_info() -> dict[str, Any]:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": run("git", "rev-parse", "--short", "HEAD") or None,
            "package_dirty_files": [x for x in run("git", "status", "--porcelain", "--",
                                                   "shardckpt").splitlines() if x]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        print("run under torchrun, e.g. torchrun --standalone --nproc-per-node 2 "
              "benchmarks/training_overhead.py", file=sys.stderr)
        return 64
    stdout = os.dup(1)
    os.dup2(2, 1)  # only the JSON goes to stdout
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    dcp_group = dist.new_group(backend="gloo")  # DCP's own group, as shardckpt has its own
    base = Path(args.dir) / f"overhead-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    if RANK == 0:
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
    dist.barrier()
    trainer = Trainer(args, device)
    trainer.calibrate(args.step_time)
    log(f"{trainer.state_bytes / 1e6:.1f} MB of state per rank, width {trainer.width}, "
        f"batch {trainer.batch}; modes {args.modes}")
    modes = {m: Mode(m, str(base / m), trainer, dcp_group) for m in args.modes if m != "none"}
    results: dict[str, list[Any]] = {m: [] for m in args.modes}
    loads, orders = [], []
    step = 0
    for r in range(-1, args.rounds):  # round -1: warm-up (first saves, allocations), untimed
        order = args.modes[r % len(args.modes):] + args.modes[:r % len(args.modes)]
        loads.append([round(x, 2) for x in os.getloadavg()])
        log(f"round {r + 1}/{args.rounds} {'(warm-up) ' if r < 0 else ''}order {order}, "
            f"load average {loads[-1]}")
        for name in order:
            res = run_loop(modes.get(name), trainer, args, step)
            step += 1000
            if r >= 0:
                results[name].append(gather(res))
            dist.barrier()
            if RANK == 0:  # old checkpoints out of the way (untimed)
                for m in modes:
                    for old in sorted((base / m).glob("step-*"))[:-1]:
                        shutil.rmtree(old, ignore_errors=True)
        if r >= 0:
            orders.append(order)
    for m in modes.values():
        m.close()
    if RANK == 0:
        doc = summarize(args, trainer, results, device)
        doc["machine"] = {"cpu_count": os.cpu_count(), "loadavg_per_round": loads,
                          "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                          "torch": torch.__version__, "device": str(device),
                          "gpu": torch.cuda.get_device_name() if cuda else None}
        doc["order_per_round"] = orders
        text = json.dumps(doc, indent=2)
        if args.out:
            Path(args.out).write_text(text + "\n")
        if args.plot:
            try:
                plot(doc, args.plot)
            except Exception as exc:  # no matplotlib: the JSON is still complete
                log(f"plot skipped: {type(exc).__name__}: {exc}")
        os.write(stdout, (text + "\n").encode())
        shutil.rmtree(base, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def summarize(args: argparse.Namespace, trainer: Trainer, results: dict[str, list[Any]],
              device: torch.device) -> dict[str, Any]:
    base = results["none"]
    rounds = {m: [per_save(results[m][r], base[r]) for r in range(args.rounds)]
              for m in results if m != "none"}
    medians = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for m, rs in rounds.items()}
    doc: dict[str, Any] = {
        "benchmark": "training-loop overhead (benchmarks/training_overhead.py)",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_info(),
        "config": {"world_size": dist.get_world_size(), "state_bytes_per_rank":
                   trainer.state_bytes, "layers": args.layers, "width": trainer.width,
                   "batch": trainer.batch, "step_time_target_s": args.step_time,
                   "save_every": args.save_every, "saves_per_loop": args.saves,
                   "rounds": args.rounds, "modes": args.modes, "dir": args.dir,
                   "device": str(device)},
        "baseline_loop_s": statistics.median(max(x["loop_s"] for x in r) for r in base),
        "baseline_step_s": statistics.median(max(x["loop_s"] / x["steps"] for x in r)
                                             for r in base),
        "per_save_median": medians,
        "per_save_rounds": rounds,
    }
    dcps = [m for m in ("dcp_async", "dcp_zero_overhead") if m in medians]
    if "shardckpt" in medians and dcps:
        ratios = {}
        for k in ("extra_loop_s", "blocked_s"):
            best = min(medians[m][k] for m in dcps)
            ratios[k] = medians["shardckpt"][k] / best if best > 0 else None
        doc["shardckpt_vs_best_dcp"] = ratios
        doc["target"] = "both ratios <= 0.5"
    doc["raw"] = results
    return doc


def plot(doc: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = doc["per_save_median"]
    modes = list(med)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "extra_loop_s", "extra loop seconds per save"),
                           (axes[1], "blocked_s", "training thread blocked, s per save")):
        values = [med[m][key] for m in modes]
        ax.bar(modes, values, color=["tab:blue" if m.startswith("shardckpt") else "tab:gray"
                                     for m in modes])
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3f}", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=20)
    cfg = doc["config"]
    fig.suptitle(f"{cfg['world_size']} ranks, {cfg['state_bytes_per_rank'] / 1e6:.0f} MB/rank, "
                 f"save every {cfg['save_every']} steps of {doc['baseline_step_s']:.2f} s "
                 f"({doc['git']['commit']}, {cfg['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
