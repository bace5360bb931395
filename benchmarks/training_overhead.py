"""Training-loop overhead of asynchronous checkpointing: shardckpt vs PyTorch DCP, in one run.

Run under torchrun (see docs/benchmarks.md):

    torchrun --standalone --nproc-per-node 2 benchmarks/training_overhead.py \
        --state-mb 128 --step-time 1.2 --save-every 3 --rounds 3 --out t.json --plot t.png

Every rank trains the same FSDP2 (``fully_shard``) stack of Linear layers with AdamW, about
``--state-mb`` MB of fp32 state (parameters + ``exp_avg`` + ``exp_avg_sq``) per rank, with a
batch sized so that one step takes about ``--step-time`` seconds. Each round runs the same loop
once per mode, in an order rotated by one per round:

* ``none``: no checkpoints (the baseline);
* ``shardckpt_eager``: ``mgr.save(step, state)`` with ``snapshot="eager"`` (the default);
* ``shardckpt_lazy``: the same with ``snapshot="lazy"`` (the opt-in);
* ``shardckpt_NAME``: shardckpt (eager) with the environment of ``--variant NAME:KEY=VALUE,...``
  set during each of its saves (``SHARDCKPT_*`` knobs: threads, nice value, ...);
* ``dcp_async``: ``get_state_dict`` + ``dcp.async_save`` on its own gloo group (thread mode);
* ``dcp_zero_overhead``: ``dcp.async_save(..., async_stager=DefaultStager(StagingOptions(...)))``
  (one stager, reused), waiting on ``staging_completion`` before the next ``optimizer.step``.

A loop of one mode is ``--saves`` pairs of windows of ``--save-every`` steps: a window without a
save, then the save and the window after it, then whatever the save has left to do (waited for
and counted, as if training had waited). Per save, the figures are:

* **extra loop seconds**: the second window (with the save and what was left of it) minus the
  first. The two windows are seconds apart, so a change of load from outside mostly cancels;
  ``none`` runs the same pairs with no save, and its figure is the noise floor;
* **blocked seconds**: the time inside the save call (with ``get_state_dict`` for DCP), plus how
  much longer the next ``optimizer.step`` took (with DCP's wait for staging) than the median
  optimizer step of the first window;
* where the extra time went: the training thread's extra CPU, run-queue delay (runnable but no
  core free) and other waiting (the GIL, collectives waiting on the slower rank), from
  ``/proc/self/task/<tid>/schedstat``, and the process's extra CPU (user, system), which
  includes the background work.

Each figure is the worst rank's per save, then the median over every save of every round. One
JSON document goes to stdout (rank 0) and to ``--out``; logs go to stderr. Its ``targets``
checks issue 24's acceptance: eager blocked <= 1.0x ``dcp_async``'s and extra loop time <= 0.5x
the better DCP mode's; lazy blocked <= 0.5x ``dcp_zero_overhead``'s.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
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

from common.machine import git_info

MODES = ("none", "shardckpt_eager", "shardckpt_lazy", "dcp_async", "dcp_zero_overhead")
DEFAULT_MODES = MODES
RANK = int(os.environ.get("RANK", "0"))


def log(msg: str) -> None:
    if RANK == 0:
        print(f"[overhead {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state-mb", type=float, default=128.0, help="fp32 state per rank, 1e6 B")
    p.add_argument("--layers", type=int, default=8, help="Linear layers of the model")
    p.add_argument("--step-time", type=float, default=1.2, help="target seconds per step")
    p.add_argument("--batch", type=int, default=None,
                   help="batch rows per step instead of sizing it to --step-time (the step "
                        "time then follows the machine's load; comparable across runs)")
    p.add_argument("--save-every", type=int, default=3, help="steps between saves")
    p.add_argument("--saves", type=int, default=4, help="saves per loop")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (medians over them)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"subset of {MODES}")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "shardckpt-bench"),
                   help="where checkpoints are written (a local disk, not tmpfs)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--plot", default=None, help="PNG: extra loop and blocked seconds per save")
    p.add_argument("--profile-saves", type=int, default=4,
                   help="at the end, saves per mode with training stopped, for the CPU profile "
                        "(and the parts of a save measured alone); 0: none")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="add mode shardckpt_NAME, saving with these environment variables set")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if set(args.modes) - set(MODES) or "none" not in args.modes:
        p.error(f"--modes: a subset of {MODES} including none")
    args.variants = {}
    for v in args.variant:
        name, _, spec = v.partition(":")
        try:
            env = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
        except ValueError:
            p.error(f"--variant {v!r}: expected NAME:KEY=VALUE,...")
        args.variants[f"shardckpt_{name}"] = env
        args.modes.append(f"shardckpt_{name}")
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
    """Wall seconds, the training thread's CPU and run-queue seconds, and the process's CPU
    seconds (user, system: every thread, the background included) over a window of steps."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, ...]:
        run, wait = schedstat()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), run, wait, usage.ru_utime, usage.ru_stime

    def stop(self) -> dict[str, float]:
        end = self._read()
        d = [b - a for a, b in zip(self.start, end)]
        return {"wall_s": d[0], "main_cpu_s": d[1], "main_runqueue_s": d[2],
                "main_other_wait_s": d[0] - d[1] - d[2], "proc_user_s": d[3],
                "proc_sys_s": d[4]}


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

    def __init__(self, name: str, root: str, trainer: Trainer, group: Any,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.root, self.t, self.env = name, root, trainer, env or {}
        self.group = group
        self.pending: Any = None
        self.saved = False
        self.mgr: shardckpt.CheckpointManager | None = None
        self.stager: Any = None
        if name.startswith("shardckpt"):
            snapshot = "lazy" if name == "shardckpt_lazy" else "eager"
            self.mgr = shardckpt.CheckpointManager(root, snapshot=snapshot, capture_rng=False)
        # torch 2.11's DefaultStager cannot stage twice (pytorch/pytorch#183413: KeyError
        # <class 'type'>), so there a stager is made per save; elsewhere one is reused
        self.stager_per_save = torch.__version__.startswith("2.11")
        if name == "dcp_zero_overhead":
            self.stager = self.new_stager()
        self.staging: Any = None

    def new_stager(self) -> Any:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        cuda = self.t.device.type == "cuda"
        return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                            use_async_staging=True, use_non_blocking_copy=cuda))

    def save(self, step: int) -> None:
        state = {"model": self.t.model, "optim": self.t.optim}
        if self.mgr is not None:
            os.environ.update(self.env)  # knobs are read by the save thread as the save starts
            self.pending = self.mgr.save(step, state)
            return
        if self.pending is not None:  # one save at a time, as mgr.save does
            self.pending.result()
        if self.stager is not None and self.stager_per_save and self.saved:
            self.stager.close()
            self.stager = self.new_stager()
        self.saved = True
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
        self.pending = self.staging = None
        for key in self.env:
            os.environ.pop(key, None)

    def close(self) -> None:
        self.finish()
        if self.mgr is not None:
            self.mgr.close()
        if self.stager is not None:
            self.stager.close()


def run_loop(mode: Mode | None, trainer: Trainer, args: argparse.Namespace,
             first_step: int) -> dict[str, Any]:
    """``--saves`` pairs of windows of ``--save-every`` steps: a baseline window, then the save
    and the window after it, then whatever the save still has to do (``drain``: counted, as if
    training had waited for it). A pair's difference is one sample of the extra loop time; its
    two windows are seconds apart, so a change of load from outside mostly cancels out."""
    k = args.save_every
    step = first_step
    pairs = []
    dist.barrier()
    before = mode.before_optim if mode is not None else (lambda: None)
    for _ in range(args.saves):
        meter = Meter()
        base_opt = [trainer.step(before) for _ in range(k)]
        base = meter.stop()
        step += k
        meter = Meter()
        t0 = time.perf_counter()
        if mode is not None:
            mode.save(step)
        save_s = time.perf_counter() - t0
        opt = [trainer.step(before) for _ in range(k)]
        t0 = time.perf_counter()
        if mode is not None:
            mode.finish()
        drain_s = time.perf_counter() - t0
        after = meter.stop()
        step += k
        pairs.append({"base": base, "after": after, "save_s": save_s, "drain_s": drain_s,
                      "base_opt_s": base_opt, "opt_s": opt})
    out: dict[str, Any] = {"pairs": pairs}
    if mode is not None and mode.mgr is not None:
        from shardckpt.engine import lazy

        out["last_save_profile"] = dict(mode.mgr.last_save_profile)
        out["last_copy"] = dict(lazy.last_stats) if mode.mgr._staging.lazy else {}
    return out


def cpu_now() -> tuple[float, float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime, usage.ru_stime


def cpu_since(t: tuple[float, float, float]) -> dict[str, float]:
    now = cpu_now()
    return {"wall_s": now[0] - t[0], "user_s": now[1] - t[1], "sys_s": now[2] - t[2]}


def median_of(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def profile_components(trainer: Trainer, args: argparse.Namespace, where: Path) -> dict[str, Any]:
    """The CPU cost of the parts of a save, on this rank's state bytes, with training stopped:
    a memory copy, XXH3 over it, writing it into the page cache, and fsyncing it."""
    import xxhash

    src = torch.cat([t.detach().reshape(-1).view(torch.uint8).cpu() for t in trainer._locals()])
    dst = torch.empty_like(src)
    view = memoryview(dst.numpy())
    chunk = 16 << 20
    rows: dict[str, list[dict[str, float]]] = {}
    for i in range(4):
        t = cpu_now()
        dst.copy_(src)
        rows.setdefault("memcpy", []).append(cpu_since(t))
        t = cpu_now()
        for j in range(0, len(view), chunk):
            xxhash.xxh3_64_intdigest(view[j:j + chunk])
        rows.setdefault("xxh3", []).append(cpu_since(t))
        path = where / f"component-{RANK}-{i}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        t = cpu_now()
        for j in range(0, len(view), chunk):
            os.write(fd, view[j:j + chunk])
        rows.setdefault("write_page_cache", []).append(cpu_since(t))
        t = cpu_now()
        os.fsync(fd)
        rows.setdefault("fsync", []).append(cpu_since(t))
        os.close(fd)
        os.unlink(path)
    return {k: median_of(v[1:]) for k, v in rows.items()}  # the first is a warm-up


def profile_saves(modes: dict[str, Mode], args: argparse.Namespace) -> dict[str, Any]:
    """Each mode's save with training stopped, the modes interleaved: wall and process CPU from
    the call to the commit; for shardckpt, the save thread's CPU per phase and the copy's."""
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    phases: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for i in range(args.profile_saves):
        names = list(modes)
        for name in names[i % len(names):] + names[:i % len(names)]:
            mode = modes[name]
            dist.barrier()
            t = cpu_now()
            mode.save(10_000_000 + 1000 * names.index(name) + i)
            mode.finish()
            rows[name].append(cpu_since(t))
            if mode.mgr is not None:
                from shardckpt.engine import lazy

                copy = lazy.last_stats if mode.mgr._staging.lazy else {}
                phases[name].append({**{k: v for k, v in mode.mgr.last_save_profile.items()
                                        if k.endswith("_cpu") or k in ("plan", "write")},
                                     **{f"copy_{k}": v for k, v in copy.items()}})
    return {m: {"per_save": median_of(rows[m][1:] or rows[m]),
                "save_thread": median_of(phases[m][1:] or phases[m]) if phases[m] else None}
            for m in modes if rows[m]}


def gather(value: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, json.loads(json.dumps(value)))  # plain JSON values only
    return out


BREAKDOWN = ("main_cpu_s", "main_runqueue_s", "main_other_wait_s", "proc_user_s", "proc_sys_s")


def samples(rounds: list[list[dict[str, Any]]]) -> dict[str, list[float]]:
    """One sample per save (every pair of every round): the worst rank's figures."""
    out: dict[str, list[float]] = {}
    for rnd in rounds:
        for j in range(len(rnd[0]["pairs"])):
            ranks = [r["pairs"][j] for r in rnd]
            row = {
                "extra_loop_s": max(p["after"]["wall_s"] - p["base"]["wall_s"] for p in ranks),
                "blocked_s": max(p["save_s"] + p["opt_s"][0] - statistics.median(p["base_opt_s"])
                                 for p in ranks),
                "in_save_s": max(p["save_s"] for p in ranks),
                "drain_s": max(p["drain_s"] for p in ranks),
            }
            row["next_step_extra_s"] = row["blocked_s"] - row["in_save_s"]
            for key in BREAKDOWN:  # where the extra time went (rank mean)
                row[key[:-2] + "_extra_s"] = statistics.mean(
                    p["after"][key] - p["base"][key] for p in ranks)
            for key, value in row.items():
                out.setdefault(key, []).append(value)
    return out


# ----------------------------------------------------------------------------- main
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
    if args.batch is None:
        trainer.calibrate(args.step_time)
    else:
        trainer.batch = args.batch
        trainer.x = torch.randn(args.batch, trainer.width, device=device)
    log(f"{trainer.state_bytes / 1e6:.1f} MB of state per rank, width {trainer.width}, "
        f"batch {trainer.batch}; modes {args.modes}")
    modes = {m: Mode(m, str(base / m), trainer, dcp_group, args.variants.get(m))
             for m in args.modes if m != "none"}
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
    profile: dict[str, Any] = {}
    if args.profile_saves > 0:
        log("profile: saves and their parts with training stopped")
        profile = {"saves": gather(profile_saves(modes, args)),
                   "components": gather(profile_components(trainer, args, base))}
    for m in modes.values():
        m.close()
    if RANK == 0:
        doc = summarize(args, trainer, results, device)
        doc["profile"] = profile
        doc["machine"] = {"cpu_count": os.cpu_count(), "loadavg_per_round": loads,
                          "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                          "torch": torch.__version__, "device": str(device),
                          "gpu": torch.cuda.get_device_name() if cuda else None}
        doc["order_per_round"] = orders
        doc["dcp_stager_per_save"] = torch.__version__.startswith("2.11")  # see Mode
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
    per_mode = {m: samples(rounds) for m, rounds in results.items()}
    medians = {m: {k: statistics.median(v) for k, v in rows.items()}
               for m, rows in per_mode.items()}
    base_step = statistics.median(p["base"]["wall_s"] / args.save_every
                                  for rnd in results["none"] for r in rnd for p in r["pairs"])
    doc: dict[str, Any] = {
        "benchmark": "training-loop overhead (benchmarks/training_overhead.py)",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_info(),
        "config": {"world_size": dist.get_world_size(), "state_bytes_per_rank":
                   trainer.state_bytes, "layers": args.layers, "width": trainer.width,
                   "batch": trainer.batch, "step_time_target_s": args.step_time,
                   "save_every": args.save_every, "saves_per_loop": args.saves,
                   "rounds": args.rounds, "modes": args.modes, "variants": args.variants,
                   "dir": args.dir,
                   "device": str(device)},
        "baseline_step_s": base_step,
        "per_save_median": medians,
        "per_save_samples": per_mode,
        "note": "none: no save between its windows; its figures are the noise floor",
    }
    doc["targets"] = targets(medians)
    doc["raw"] = results
    return doc


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def targets(med: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Issue 24's acceptance ratios (each with its limit and whether it was met), for the modes
    that ran."""
    out: dict[str, Any] = {}

    def check(name: str, value: float | None, limit: float) -> None:
        out[name] = {"ratio": value, "limit": limit,
                     "met": value is not None and value <= limit}

    dcps = [m for m in ("dcp_async", "dcp_zero_overhead") if m in med]
    eager, lazy = med.get("shardckpt_eager"), med.get("shardckpt_lazy")
    if eager is not None and "dcp_async" in med:
        check("eager_blocked_vs_dcp_async", ratio(eager["blocked_s"],
                                                  med["dcp_async"]["blocked_s"]), 1.0)
    if eager is not None and dcps:
        check("eager_extra_loop_vs_best_dcp",
              ratio(eager["extra_loop_s"], min(med[m]["extra_loop_s"] for m in dcps)), 0.5)
    if lazy is not None and "dcp_zero_overhead" in med:
        check("lazy_blocked_vs_dcp_zero_overhead",
              ratio(lazy["blocked_s"], med["dcp_zero_overhead"]["blocked_s"]), 0.5)
    return out


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
