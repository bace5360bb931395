"""One worker of ``benchmarks/recovery.py``, started by one of two ``torchrun --nnodes 2
--node-rank i`` agents on 127.0.0.1 (the node id is torchrun's ``GROUP_RANK``). CPU and gloo.

It reads its configuration from the JSON file the driver wrote, and first writes
``RUN/pids/LAUNCH/node<G>-rank<R>.json`` (its pid and process group: torchrun starts each worker
in a session of its own, so the driver kills a node by these process groups and its agent's).

* ``train``: the measured saves first (pairs of windows per save, ``overhead_pairs``), then the
  job the driver kills: a local save every ``local_every`` steps and a persistent one (local
  disk and S3 alike) every ``persistent_every``; at ``hold_step`` (the step before the next
  local save) it waits for every save in flight, writes ``RUN/marker-rank<R>.json`` (the
  committed steps) and waits to be killed.
* ``resume``: a relaunched job: build the model, construct the manager of one variant, time
  ``mgr.load(state)``, check the restored state against the fingerprint saved with that step,
  run one training step, and write ``RUN/result/LAUNCH-rank<R>.json`` with wall-clock
  timestamps (``time.time()``, the driver's clock) of each phase.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import shardckpt

from common.fsdp_state import build, fingerprint, local_tensors, same_fingerprint
from common.rounds import rotate

OVERHEAD_VARIANTS = ("none", "local", "persistent_disk", "persistent_s3")


def write_json(path: Path, value: Any) -> None:
    """Atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, default=str))
    os.replace(tmp, path)


class Trainer:
    """The FSDP2 + AdamW model of ``common.fsdp_state.build`` and one training step."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.model, self.optim, self.shape = build(cfg["state_gb"], cfg["width"],
                                                   torch.device("cpu"))
        gen = torch.Generator().manual_seed(dist.get_rank())
        self.x = torch.randn(cfg["batch"], self.shape["width"], generator=gen)
        self.state = {"model": self.model, "optim": self.optim}

    def step(self) -> None:
        self.model(self.x).pow(2).mean().backward()
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)

    def fingerprint(self) -> list[float]:
        return fingerprint(local_tensors(self.model, self.optim))

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in local_tensors(self.model, self.optim))


def all_true(flag: bool) -> bool:
    """Collective: whether ``flag`` holds on every rank."""
    t = torch.tensor([0 if flag else 1], dtype=torch.int32)
    dist.all_reduce(t)
    return int(t.item()) == 0


def gather(value: Any) -> list[Any]:
    """Collective: every rank's JSON-ready ``value``."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, json.loads(json.dumps(value)))
    return out


# ----------------------------------------------------------------------- extra loop time
def measure_pair(trainer: Trainer, save: Any, wait: Any, window: int, max_steps: int,
                 step: int) -> dict[str, float]:
    """A window of ``window`` steps without a save, then the save and the steps that run while
    it is in flight (at least ``window``, until it has committed on every rank or ``max_steps``),
    then whatever it still has to do (``drain_s``: waited for and counted). Every step of both
    windows ends with the same one-integer all-reduce (whether the save is done everywhere)."""
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(window):
        trainer.step()
        all_true(True)
    base_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    handle = save(step) if save is not None else None
    in_save_s = time.perf_counter() - t0
    steps = 0
    while True:
        trainer.step()
        steps += 1
        done = all_true(handle is None or handle.done())
        if (steps >= window and done) or steps >= max_steps:
            break
    t1 = time.perf_counter()
    if wait is not None:
        wait()
    drain_s = time.perf_counter() - t1
    after_s = time.perf_counter() - t0
    return {"base_s": base_s, "after_s": after_s, "steps_after": steps,
            "in_save_s": in_save_s, "drain_s": drain_s,
            "extra_loop_s": after_s - steps * base_s / window}


def overhead_pairs(cfg: dict[str, Any], trainer: Trainer, options: dict[str, Any]
                   ) -> dict[str, Any]:
    """Each variant's save (``none``: no save) once per round, rounds rotated; one save of each
    tier first, untimed (first-save costs: buffers, plans, connections)."""
    rounds, window = cfg["overhead_rounds"], cfg["window"]
    if rounds <= 0:
        return {"rounds": 0, "pairs": {}}
    local = shardckpt.CheckpointManager(
        cfg["overhead_disk"], local=shardckpt.LocalTier(cfg["overhead_local"], every=1,
                                                        copies=2, keep=1))
    s3 = shardckpt.CheckpointManager(cfg["overhead_s3"], storage_options=options)
    st = trainer.state
    saves = {"none": (None, None),
             "local": (lambda s: local.save(s, st, tier="local"), local.wait),
             "persistent_disk": (lambda s: local.save(s, st, tier="persistent"), local.wait),
             "persistent_s3": (lambda s: s3.save(s, st), s3.wait)}
    step = 1
    for save, wait in saves.values():  # warm-up, untimed
        if save is not None:
            save(step)
            wait()
            step += 1
    pairs: dict[str, list[Any]] = {v: [] for v in OVERHEAD_VARIANTS}
    orders = []
    for r in range(rounds):
        order = rotate(OVERHEAD_VARIANTS, r)
        orders.append(order)
        for name in order:
            save, wait = saves[name]
            pairs[name].append(gather(measure_pair(trainer, save, wait, window,
                                                   cfg["max_window"], step)))
            step += 1
            if dist.get_rank() == 0:  # older persistent steps out of the way (untimed)
                for old in sorted(Path(cfg["overhead_disk"]).glob("step-*"))[:-1]:
                    shutil.rmtree(old, ignore_errors=True)
            dist.barrier()
    local.close()
    s3.close()
    return {"rounds": rounds, "order_per_round": orders, "pairs": pairs}


# ----------------------------------------------------------------------- the job that fails
def train(cfg: dict[str, Any], trainer: Trainer, options: dict[str, Any], run: Path) -> None:
    rank = dist.get_rank()
    overhead = overhead_pairs(cfg, trainer, options)
    mgr = shardckpt.CheckpointManager(
        cfg["disk_root"], save_every=cfg["persistent_every"],
        local=shardckpt.LocalTier(cfg["local_path"], every=cfg["local_every"], copies=2,
                                  keep=cfg["keep"]))
    s3 = shardckpt.CheckpointManager(cfg["s3_root"], save_every=cfg["persistent_every"],
                                     storage_options=options)
    step_s = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        planned = cfg["hold_step"] - cfg["hold_step"] % cfg["local_every"]  # step K
        for step in range(1, cfg["hold_step"] + 1):
            if step == planned:  # K's local save is never skipped for a slow earlier one
                mgr.wait()
            t0 = time.perf_counter()
            trainer.step()
            saved = False
            if mgr.should_save(step):
                mgr.save(step, trainer.state)
                saved = True
            if s3.should_save(step):
                s3.save(step, trainer.state)
                saved = True
            step_s.append(time.perf_counter() - t0)
            if saved:  # untimed: what a resume from this step must find
                write_json(run / "fp" / f"step{step}-rank{rank}.json", trainer.fingerprint())
        t0 = time.perf_counter()
        mgr.wait()  # the failure comes once the saves before it have committed
        s3.wait()
        wait_s = time.perf_counter() - t0
    marker = {"rank": rank, "node": os.environ["GROUP_RANK"], "last_step": cfg["hold_step"],
              "local_steps": mgr.steps(tier="local"), "persistent_disk_steps": mgr.steps(),
              "persistent_s3_steps": s3.steps(), "skipped_local_saves": mgr._local.skipped,
              "step_s": step_s, "final_wait_s": wait_s,
              "state_bytes": trainer.state_bytes(), "shape": trainer.shape,
              "warnings": [str(w.message) for w in caught]}
    overhead = {**overhead, "pairs": overhead["pairs"] if rank == 0 else {}}
    write_json(run / f"marker-rank{rank}.json", {**marker, "overhead": overhead})
    # The driver kills this node now, or stops it as the survivor. A worker left alive past
    # the deadline (a driver that died) exits rather than linger.
    threading.Event().wait(cfg["hold_timeout_s"])
    os._exit(3)


# ----------------------------------------------------------------------- the relaunched job
def resume(cfg: dict[str, Any], trainer: Trainer, options: dict[str, Any], run: Path,
           stamps: dict[str, float]) -> dict[str, Any]:
    variant = cfg["variant"]
    if variant == "local":  # the example: S3 persistent, plus the local tier
        mgr = shardckpt.CheckpointManager(
            cfg["s3_root"], save_every=cfg["persistent_every"], storage_options=options,
            local=shardckpt.LocalTier(cfg["local_path"], every=cfg["local_every"], copies=2,
                                      keep=cfg["keep"]))
    elif variant == "persistent_disk":
        mgr = shardckpt.CheckpointManager(cfg["disk_root"], save_every=cfg["persistent_every"])
    else:
        mgr = shardckpt.CheckpointManager(cfg["s3_root"], save_every=cfg["persistent_every"],
                                          storage_options=options)
    stamps["manager_ready"] = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        step = mgr.load(trainer.state)
        load_s = time.perf_counter() - t0
    stamps["loaded"] = time.time()
    want = json.loads((run / "fp" / f"step{step}-rank{dist.get_rank()}.json").read_text())
    matches = same_fingerprint(trainer.fingerprint(), want)
    t0 = time.perf_counter()
    trainer.step()
    first_step_s = time.perf_counter() - t0
    stamps["first_step_done"] = time.time()
    profile = {k: v for k, v in mgr.last_load_profile.items()
               if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    mgr.close()
    return {"variant": variant, "step": step, "tier": profile.get("tier", "persistent"),
            "load_s": load_s, "first_step_s": first_step_s, "state_matches": matches,
            "bytes_read": profile.get("bytes_read"),
            "bytes_received": profile.get("bytes_received", 0), "profile": profile,
            "warnings": [str(w.message) for w in caught]}


def main(config_path: str) -> int:
    stamps = {"process_started": time.time()}
    cfg = json.loads(Path(config_path).read_text())
    run = Path(cfg["run_dir"])
    rank, node = int(os.environ["RANK"]), os.environ["GROUP_RANK"]
    write_json(run / "pids" / cfg["launch"] / f"node{node}-rank{rank}.json",
               {"pid": os.getpid(), "pgid": os.getpgid(0), "rank": rank, "node": node})
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    stamps["process_group_ready"] = time.time()
    options = cfg["storage_options"]
    trainer = Trainer(cfg)
    stamps["model_built"] = time.time()
    if cfg["mode"] == "train":
        train(cfg, trainer, options, run)
        return 0  # not reached: train() ends by being killed
    result = resume(cfg, trainer, options, run, stamps)
    result.update(rank=rank, node=node, stamps=stamps)
    write_json(run / "result" / f"{cfg['launch']}-rank{rank}.json", result)
    dist.barrier()
    dist.destroy_process_group()
    return 0
