"""The CUDA paths of a save, checked on a real GPU: pinned staging, side-stream copies, lazy
snapshots (the training stream waits for the copy only at the optimizer step), torn-snapshot
detection, bit-identical round trips; and how long the training stream is held per save.

    python benchmarks/cuda_check.py --out cuda_check.json [--state-mb 2000] [--dir DIR]

One process, no torchrun. Prints one JSON document (stdout and ``--out``); exits 1 if a check
fails, 2 without CUDA. CI has no GPU: run it where one is (docs/benchmarks.md, "GPU").
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import shardckpt


def build(width: int, layers: int, device: torch.device, seed: int = 0
          ) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, optim, torch.randn(64, width, device=device))  # the optimizer state exists
    return model, optim


def train(model: nn.Module, optim: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model(x).square().mean().backward()
    optim.step()
    optim.zero_grad(set_to_none=True)


def host_values(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for i, st in enumerate(optim.state.values()):
        out.update({f"optim/{i}/{k}": v.detach().cpu().clone() for k, v in st.items()
                    if isinstance(v, torch.Tensor)})
    return out


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    bad = sorted(set(a) ^ set(b))
    bad += [k for k in a if k in b and not torch.equal(a[k], b[k])]
    return bad


def roundtrip(root: str, snapshot: str, width: int, layers: int, device: torch.device,
              blocking: bool = False) -> dict[str, Any]:
    """Save, train on right away (the step must wait for the copy), load: the checkpoint holds
    the values of the moment of ``save``, bit for bit. Every staging buffer of a GPU tensor is
    pinned (AdamW's ``step`` counters live on the CPU: their buffers are not)."""
    model, optim = build(width, layers, device)
    x = torch.randn(64, width, device=device)
    expected = host_values(model, optim)
    with shardckpt.CheckpointManager(root, snapshot=snapshot, capture_rng=False) as mgr:
        handle = mgr.save(1, {"model": model, "optim": optim}, blocking=blocking)
        train(model, optim, x)  # overlaps the copy; the step waits for it on the GPU
        train(model, optim, x)
        handle.wait()
        bufs = [b for b in mgr._staging._buffers.values() if b.dim() > 0]
        pinned = bool(bufs) and all(b.is_pinned() for b in bufs)
        model2, optim2 = build(width, layers, device, seed=7)
        mgr.load({"model": model2, "optim": optim2}, step=1)
    return {"snapshot": snapshot, "blocking": blocking, "pinned_staging": pinned,
            "mismatches": differences(expected, host_values(model2, optim2))}


def torn(root: str, width: int, layers: int, device: torch.device) -> dict[str, Any]:
    """A parameter changed on the GPU after a lazy ``save`` and before any optimizer step fails
    the save naming the key; the next save commits whole."""
    model, optim = build(width, layers, device)
    error = ""
    with shardckpt.CheckpointManager(root, capture_rng=False) as mgr:
        handle = mgr.save(1, {"model": model, "optim": optim})
        with torch.no_grad():
            model[0].weight.mul_(2)
        try:
            handle.wait()
        except shardckpt.ShardckptError as exc:
            error = f"{type(exc).__name__}: {exc}"
        expected = host_values(model, optim)
        mgr.save(2, {"model": model, "optim": optim}).wait()
        steps = mgr.steps()
        model2, optim2 = build(width, layers, device, seed=7)
        mgr.load({"model": model2, "optim": optim2}, step=2)
    return {"error": error[:300], "steps": steps,
            "mismatches": differences(expected, host_values(model2, optim2))}


def stalls(root: str, snapshot: str, width: int, layers: int, device: torch.device,
           reps: int) -> dict[str, Any]:
    """Per save: seconds inside ``save``, and how much longer the next optimizer step took
    (until the training stream has run it) than a step without a save in flight."""
    model, optim = build(width, layers, device)
    x = torch.randn(256, width, device=device)
    nbytes = sum(v.numel() * v.element_size() for v in host_values(model, optim).values())

    def timed_step() -> float:
        model(x).square().mean().backward()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        optim.step()
        torch.cuda.synchronize()
        took = time.perf_counter() - t0
        optim.zero_grad(set_to_none=True)
        return took

    in_save, extra_step, base_step, total = [], [], [], []
    with shardckpt.CheckpointManager(root, snapshot=snapshot, capture_rng=False) as mgr:
        for rep in range(reps + 1):  # the first is a warm-up (buffers allocated, pinned)
            base = statistics.median(timed_step() for _ in range(3))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            handle = mgr.save(rep + 1, {"model": model, "optim": optim})
            t1 = time.perf_counter()
            step_s = timed_step()
            handle.wait()
            t2 = time.perf_counter()
            if rep:
                in_save.append(t1 - t0)
                extra_step.append(step_s - base)
                base_step.append(base)
                total.append(t2 - t0)
            for old in sorted(Path(root).glob("step-*"))[:-1]:
                shutil.rmtree(old, ignore_errors=True)
    med = statistics.median
    return {"snapshot": snapshot, "state_bytes": nbytes, "reps": reps,
            "in_save_s": med(in_save), "next_step_extra_s": med(extra_step),
            "training_stream_blocked_s": med(in_save) + max(0.0, med(extra_step)),
            "optimizer_step_s": med(base_step), "save_to_commit_s": med(total),
            "samples": {"in_save_s": in_save, "next_step_extra_s": extra_step}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state-mb", type=float, default=2000.0,
                   help="fp32 state (parameters + AdamW moments) of the stall measurement")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_check.py: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0)
    base = Path(args.dir or tempfile.mkdtemp(prefix="shardckpt-cuda-"))
    base.mkdir(parents=True, exist_ok=True)
    layers = 8
    width = max(64, int((args.state_mb * 1e6 / 12 / layers) ** 0.5))
    doc: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "shardckpt": shardckpt.__version__, "checks": {}, "stalls": []}
    checks = doc["checks"]
    for snapshot in ("lazy", "eager"):
        checks[f"roundtrip_{snapshot}"] = roundtrip(str(base / f"rt-{snapshot}"), snapshot,
                                                    256, 4, device)
    checks["roundtrip_blocking"] = roundtrip(str(base / "rt-blocking"), "lazy", 256, 4, device,
                                             blocking=True)
    checks["torn"] = torn(str(base / "torn"), 256, 4, device)
    for snapshot in ("lazy", "eager"):
        doc["stalls"].append(stalls(str(base / f"stall-{snapshot}"), snapshot, width, layers,
                                    device, args.reps))
    ok = (all(c["pinned_staging"] and not c["mismatches"]
              for k, c in checks.items() if k.startswith("roundtrip"))
          and "changed in place" in checks["torn"]["error"]
          and checks["torn"]["steps"] == [2] and not checks["torn"]["mismatches"])
    doc["ok"] = ok
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
