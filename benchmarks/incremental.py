"""Incremental saves: bytes written per save, save time and load time, in one run (one process).

    python benchmarks/incremental.py --size-mb 256 --saves 5 --rounds 2 \\
        --dir /work/bench_tmp --out inc.json --plot inc.png

Workloads (each about ``--size-mb`` MB of fp32 state):

* ``lora``: a frozen base (about 90% of the bytes, never changing) plus low-rank adapters and
  their AdamW moments (``exp_avg``, ``exp_avg_sq``), all new at every save;
* ``embed_contiguous``: an embedding table of which 10% of the rows, one contiguous block at a
  random place, change between saves;
* ``embed_random``: the same table with 10% of the rows, drawn at random, changing.

Writers (each save goes through the writer's ordinary blocking call, files synced unless
``--no-fsync``):

* ``shardckpt_incremental``: ``CheckpointManager(incremental=True)``;
* ``shardckpt_full``: ``CheckpointManager()`` (the default, every save full);
* ``shardckpt_incremental_nocache`` (not run unless named): as ``shardckpt_incremental``, with
  the session-8 caches of engine/incremental.py switched off, so that each save reads and parses
  its base's manifest and shard headers again (what every save did before): the before/after
  of that change in one run;
* ``dcp_save``: ``torch.distributed.checkpoint.save`` to a directory per save;
* ``torch_checkpointing``: Meta's torch_checkpointing 0.1.1, when it is installed and runs here
  (else the document says why not).

Each round runs every writer once per workload (the order rotated per round): ``--saves``
saves of the evolving state, then a load of the last save into a zeroed state (checked bit for
bit against what was saved). Per save after the first: the bytes the save added to its
directory tree, its wall time (the writer's blocking call, the same for every shardckpt writer:
``mgr.save()`` with ``async_save=False`` returns once the step is committed) and, for shardckpt,
the save's phases (``phases_s``: collect, plan incl. the base lookup, write, commit); per
writer: the median of those over saves and rounds, and the median load time. The report states
the chunk size (``SHARDCKPT_CHUNK_SIZE``, default here ``--chunk-mb`` 4 MiB) and checks issue
30's targets, printed PASS/MISS on stderr:

* lora: incremental bytes per save <= 1.2 x (adapter + optimizer bytes + 1 MB); incremental
  save time <= 0.3 x shardckpt full and <= 0.3 x ``dcp.save``, in the same run;
* embed_contiguous: incremental bytes per save <= 0.15 x the full bytes (random rows: reported).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import shardckpt

from common.machine import git_info, machine_info
from common.output import capture_stdout, log, pyplot, write_outputs
from common.rounds import rotate

WRITERS = ["shardckpt_incremental", "shardckpt_full", "dcp_save", "torch_checkpointing"]
WORKLOADS = ["lora", "embed_contiguous", "embed_random"]
ROW = 256  # floats per embedding row
PHASES = ("collect", "plan", "write", "commit", "decision")


def make_state(workload: str, size_mb: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    n = size_mb * (1 << 20) // 4
    if workload == "lora":
        width, layers = 1024, max(1, int(n * 0.9) // (1024 * 1024))
        rank = max(1, int(n * 0.1) // (layers * 2 * width * 3))
        model: dict[str, torch.Tensor] = {}
        optim: dict[str, torch.Tensor] = {}
        for i in range(layers):
            model[f"layers.{i}.weight"] = torch.randn(width, width, generator=g)
            for name, shape in ((f"layers.{i}.lora_A", (rank, width)),
                                (f"layers.{i}.lora_B", (width, rank))):
                model[name] = torch.randn(*shape, generator=g)
                optim[f"{name}.exp_avg"] = torch.randn(*shape, generator=g)
                optim[f"{name}.exp_avg_sq"] = torch.rand(*shape, generator=g)
        return {"model": model, "optim": optim, "step": 0}
    return {"model": {"embed.weight": torch.randn(n // ROW, ROW, generator=g)}, "step": 0}


def changed_bytes(state: dict[str, Any]) -> int:
    """Bytes that change between saves in the lora workload (adapters + optimizer)."""
    return sum(v.numel() * 4 for k, v in state["model"].items() if "lora" in k) + \
        sum(v.numel() * 4 for v in state.get("optim", {}).values())


def evolve(workload: str, state: dict[str, Any], step: int) -> None:
    """Change what the workload changes between saves, in place."""
    g = torch.Generator().manual_seed(10_000 + step)
    state["step"] = step
    if workload == "lora":
        for k, v in [*state["model"].items(), *state["optim"].items()]:
            if "lora" in k:
                v.add_(torch.randn(v.shape, generator=g) * 1e-3)
        return
    table = state["model"]["embed.weight"]
    rows = table.shape[0]
    k = max(1, rows // 10)
    if workload == "embed_contiguous":
        start = int(torch.randint(0, rows - k + 1, (1,), generator=g))
        table[start:start + k] += 1e-3
    else:
        idx = torch.randperm(rows, generator=g)[:k]
        table[idx] += 1e-3


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def zeros(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: zeros(v) for k, v in state.items()}
    return 0


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


class Writer:
    """One writer's save/load over a run directory."""

    def __init__(self, name: str, root: Path) -> None:
        self.name, self.root = name, root
        self.mgr = None
        if name.startswith("shardckpt"):
            self.mgr = shardckpt.CheckpointManager(str(root), async_save=False,
                                                   incremental="incremental" in name,
                                                   capture_rng=False)
        elif name == "torch_checkpointing":
            self.tc = TorchCheckpointing(root)

    def save(self, step: int, state: dict[str, Any]) -> None:
        if self.name.endswith("nocache"):
            with uncached():
                self.mgr.save(step, state)
        elif self.mgr is not None:
            self.mgr.save(step, state)
        elif self.name == "dcp_save":
            import torch.distributed.checkpoint as dcp

            dcp.save(state, checkpoint_id=str(self.root / f"step-{step}"))
        else:
            self.tc.save(step, state)

    def load(self, step: int, state: dict[str, Any]) -> None:
        if self.mgr is not None:
            self.mgr.load(state, step=step)
        elif self.name == "dcp_save":
            import torch.distributed.checkpoint as dcp

            dcp.load(state, checkpoint_id=str(self.root / f"step-{step}"))
        else:
            self.tc.load(step, state)

    def phases(self) -> dict[str, float]:
        """shardckpt: the last save's phases (seconds; the save's own ``last_save_profile``):
        plan (incl. the base lookup of an incremental save), write, commit."""
        prof = self.mgr.last_save_profile if self.mgr is not None else {}
        return {k: float(prof[k]) for k in PHASES if k in prof}

    def close(self) -> None:
        if self.mgr is not None:
            self.mgr.close()
        elif self.name == "torch_checkpointing":
            self.tc.close()


@contextlib.contextmanager
def uncached() -> Iterator[None]:
    """Incremental saves as before session 8: no kept base table or manifest, none kept."""
    from shardckpt.catalog import read_manifest
    from shardckpt.engine import incremental as inc
    from shardckpt.engine import save as save_mod

    names = ("_cached_table", "_read_manifest")
    saved = [getattr(inc, n) for n in names]
    kept = (save_mod.remember_manifest, save_mod.remember_written)
    inc._cached_table, inc._read_manifest = (lambda *a, **k: None), read_manifest
    save_mod.remember_manifest = save_mod.remember_written = lambda *a, **k: None
    try:
        yield
    finally:
        for n, f in zip(names, saved):
            setattr(inc, n, f)
        save_mod.remember_manifest, save_mod.remember_written = kept


class TorchCheckpointing:
    """torch_checkpointing 0.1.1: ``CheckpointManager(Config.with_sync_save())``,
    ``save(path, {...})`` / ``load(path, into={...})``, a directory per save, direct I/O off
    (its O_DIRECT writes fail on ext4 here). Raises if it is not installed or does not run."""

    def __init__(self, root: Path) -> None:
        import torch_checkpointing as tc  # type: ignore[import-not-found]
        from torch_checkpointing.storage.filesystem import (  # type: ignore[import-not-found]
            LocalFileSystemStorageConfig,
        )

        cfg = tc.CheckpointManager.Config.with_sync_save()
        cfg.storage_config = LocalFileSystemStorageConfig(use_direct_io=False)
        self.root = root
        self.mgr = cfg.build()

    def save(self, step: int, state: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        future = self.mgr.save(str(self.root / f"step-{step}"), state)
        if future is not None:
            future.result()

    def load(self, step: int, state: dict[str, Any]) -> None:
        state.update(self.mgr.load(str(self.root / f"step-{step}"), into=state))

    def close(self) -> None:
        self.mgr.close()


def run_one(writer: str, workload: str, args: argparse.Namespace, base: Path) -> dict[str, Any]:
    root = base / f"{writer}-{workload}"
    shutil.rmtree(root, ignore_errors=True)
    state = make_state(workload, args.size_mb, seed=1)
    w = Writer(writer, root)
    per_save: list[dict[str, float]] = []
    try:
        for step in range(1, args.saves + 1):
            if step > 1:
                evolve(workload, state, step)
            before = tree_bytes(root)
            t0 = time.perf_counter()
            w.save(step, state)
            seconds = time.perf_counter() - t0
            per_save.append({"step": step, "seconds": seconds,
                             "bytes": tree_bytes(root) - before, "phases_s": w.phases()})
        got = zeros(state)
        t0 = time.perf_counter()
        w.load(args.saves, got)
        load_s = time.perf_counter() - t0
        ok = same(got, state)
    finally:
        w.close()
        shutil.rmtree(root, ignore_errors=True)
    return {"saves": per_save, "load_s": load_s, "bit_identical": ok}


def probe_torch_checkpointing(base: Path) -> str | None:
    """None if torch_checkpointing saves and loads a small state here, else why not."""
    try:
        tc = TorchCheckpointing(base / "probe")
        st = {"model": {"w": torch.arange(8.0)}, "step": 1}
        tc.save(1, st)
        got = {"model": {"w": torch.zeros(8)}, "step": 0}
        tc.load(1, got)
        tc.close()
        if not torch.equal(got["model"]["w"], st["model"]["w"]):
            return "loaded values differ from the saved ones"
        return None
    except ImportError:
        return "torch_checkpointing is not installed (pip install torch-checkpointing==0.1.1)"
    except Exception as exc:
        return f"does not run on this CPU-only host: {type(exc).__name__}: {str(exc)[:300]}"
    finally:
        shutil.rmtree(base / "probe", ignore_errors=True)


def summarize(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for workload, by_writer in results.items():
        out[workload] = {}
        for writer, runs in by_writer.items():
            later = [s for r in runs for s in r["saves"][1:]]
            out[workload][writer] = {
                "first_save_bytes": statistics.median(r["saves"][0]["bytes"] for r in runs),
                "bytes_per_save": statistics.median(s["bytes"] for s in later),
                "save_s": statistics.median(s["seconds"] for s in later),
                "load_s": statistics.median(r["load_s"] for r in runs),
                "phases_s": {k: statistics.median(s["phases_s"].get(k, 0.0) for s in later)
                             for k in PHASES if any(k in s["phases_s"] for s in later)},
                "bit_identical": all(r["bit_identical"] for r in runs),
            }
    return out


def targets(summary: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []

    def check(name: str, value: float | None, limit: float | None) -> None:
        ok = value is not None and limit is not None and value <= limit
        out.append({"target": name, "value": value, "limit": limit,
                    "result": "PASS" if ok else "MISS"})

    lora = summary.get("lora", {})
    inc = lora.get("shardckpt_incremental")
    if inc:
        changed = changed_bytes(make_state("lora", args.size_mb, 1))
        check("lora: incremental bytes per save <= 1.2 x (adapters + optimizer + 1 MB)",
              inc["bytes_per_save"], 1.2 * (changed + (1 << 20)))
        for other in ("shardckpt_full", "dcp_save"):
            if other in lora:
                check(f"lora: incremental save time <= 0.3 x {other}", inc["save_s"],
                      0.3 * lora[other]["save_s"])
    emb = summary.get("embed_contiguous", {})
    if "shardckpt_incremental" in emb and "shardckpt_full" in emb:
        check("embed_contiguous: incremental bytes per save <= 0.15 x full",
              emb["shardckpt_incremental"]["bytes_per_save"],
              0.15 * emb["shardckpt_full"]["bytes_per_save"])
    return out


def draw(doc: dict[str, Any], path: str) -> None:
    plt = pyplot()
    summary = doc["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, label, scale) in zip(axes, [("bytes_per_save", "MB written per save", 1e6),
                                              ("save_s", "save time (s)", 1.0),
                                              ("load_s", "load time (s)", 1.0)]):
        workloads = list(summary)
        writers = sorted({w for v in summary.values() for w in v})
        width = 0.8 / max(1, len(writers))
        for i, writer in enumerate(writers):
            xs = [j + i * width for j in range(len(workloads))]
            ys = [summary[wl].get(writer, {}).get(key, 0) / scale for wl in workloads]
            ax.bar(xs, ys, width, label=writer)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))], workloads)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"incremental saves: {doc['config']['size_mb']} MB state, chunk "
                 f"{doc['config']['chunk_bytes'] >> 20} MiB, median of "
                 f"{doc['config']['rounds']} rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=int, default=256)
    p.add_argument("--saves", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--chunk-mb", type=int, default=4)
    p.add_argument("--dir", default=None)
    p.add_argument("--no-fsync", action="store_true")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--writers", default=",".join(WRITERS))
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    capture_stdout()
    os.environ["SHARDCKPT_CHUNK_SIZE"] = str(args.chunk_mb << 20)
    if args.no_fsync:
        os.environ["SHARDCKPT_FSYNC"] = "0"
    base = Path(tempfile.mkdtemp(prefix="inc-bench-", dir=args.dir))
    writers = [w for w in args.writers.split(",") if w]
    skipped: dict[str, str] = {}
    if "torch_checkpointing" in writers:
        why = probe_torch_checkpointing(base)
        if why is not None:
            skipped["torch_checkpointing"] = why
            writers.remove("torch_checkpointing")
            log(f"torch_checkpointing skipped: {why}")
    workloads = [w for w in args.workloads.split(",") if w]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {wl: {} for wl in workloads}
    try:
        for r in range(args.rounds):
            for workload in workloads:
                for writer in rotate(writers, r):
                    log(f"round {r} {workload} {writer}")
                    results[workload].setdefault(writer, []).append(
                        run_one(writer, workload, args, base))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    summary = summarize(results)
    checks = targets(summary, args)
    for c in checks:
        log(f"{c['result']}: {c['target']}: {c['value']} (limit {c['limit']})")
    doc = {"benchmark": "incremental", "config": {**vars(args), "chunk_bytes": args.chunk_mb << 20},
           "machine": machine_info(args.dir or tempfile.gettempdir(), fsync=not args.no_fsync),
           "git": git_info(), "skipped": skipped, "summary": summary, "targets": checks,
           "runs": results}
    write_outputs(doc, out=args.out, plot=args.plot, draw=draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
