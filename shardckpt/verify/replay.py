"""Replay golden batches through a rebuilt model and compare with the outputs recorded at save.

Comparison is bitwise when both tolerances are 0 (bytes, so NaN equals NaN only with the same
bits and -0.0 differs from 0.0); otherwise element-wise ``|a - b| <= atol + rtol * |b|`` with NaN
equal to NaN and an infinity equal to itself. Each rank replays every batch; :func:`merge` then
combines the ranks' reports and checks that they all computed the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from ..engine.tensorbytes import byte_view
from ..golden import call, detach
from .phases import Check

MAX_BATCH_DETAIL = 300


@dataclass
class Diff:
    """The worst differences of one batch and where the first offending value is."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    path: str | None = None
    reason: str = ""

    def fail(self, path: str, reason: str) -> None:
        if self.path is None:
            self.path, self.reason = path, reason

    def worst(self, abs_: float, rel: float) -> None:
        self.max_abs = _max(self.max_abs, abs_)
        self.max_rel = _max(self.max_rel, rel)


def _max(a: float, b: float) -> float:
    return b if math.isnan(b) or b > a else a


def compare(got: Any, want: Any, atol: float, rtol: float, path: str, diff: Diff) -> None:
    """Walk ``want`` and ``got`` together, recording differences into ``diff``."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            diff.fail(path, f"expected a tensor, got {type(got).__name__}")
        elif got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
            diff.fail(path, f"expected {_describe(want)}, got {_describe(got)}")
        else:
            _compare_tensor(got.detach().cpu(), want, atol, rtol, path, diff)
    elif isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            diff.fail(path, f"expected a dict with keys {sorted(map(str, want))}, got "
                      f"{sorted(map(str, got)) if isinstance(got, dict) else type(got).__name__}")
            return
        for k in want:
            compare(got[k], want[k], atol, rtol, f"{path}[{k!r}]", diff)
    elif isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            diff.fail(path, f"expected a sequence of {len(want)}, got "
                      f"{len(got) if isinstance(got, (list, tuple)) else type(got).__name__}")
            return
        for i, (g, w) in enumerate(zip(got, want)):
            compare(g, w, atol, rtol, f"{path}[{i}]", diff)
    elif isinstance(want, float) and isinstance(got, float):
        _compare_tensor(torch.tensor([got], dtype=torch.float64),
                        torch.tensor([want], dtype=torch.float64), atol, rtol, path, diff)
    elif got != want or type(got) is not type(want):
        diff.fail(path, f"expected {want!r}, got {got!r}"[:MAX_BATCH_DETAIL])


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


def _compare_tensor(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float, path: str,
                    diff: Diff) -> None:
    n = want.numel()
    if n == 0:
        return
    a, b = got.contiguous().reshape(-1), want.contiguous().reshape(-1)
    bits_differ = (a.view(torch.uint8).reshape(n, -1) != b.view(torch.uint8).reshape(n, -1)) \
        .any(dim=1)
    wide = torch.complex128 if b.is_complex() else torch.float64
    af, bf = a.to(wide), b.to(wide)
    both_nan = af.isnan() & bf.isnan()
    with torch.no_grad():
        delta = (af - bf).abs()
        delta[both_nan | (af == bf)] = 0.0  # inf == inf, nan "==" nan
        delta = torch.nan_to_num(delta, nan=math.inf)
        scale = bf.abs()
        rel = torch.where(scale > 0, delta / scale, torch.full_like(delta, math.inf))
        rel[delta == 0] = 0.0
    diff.worst(float(delta.max()), float(rel.max()))
    bad = bits_differ if atol == 0 and rtol == 0 else delta > atol + rtol * scale
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        index = list(_unravel(i, tuple(want.shape)))
        what = f"{_describe(want)} at index {index}: got {a[i].item()!r}, expected " \
               f"{b[i].item()!r}"
        if atol == 0 and rtol == 0 and float(delta[i]) == 0:
            what += " (same value, different bits: -0.0 vs 0.0 or another NaN)"
        diff.fail(path, what)


def _unravel(i: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for n in reversed(shape):
        out.append(i % n)
        i //= n
    return tuple(reversed(out))


def digest(value: Any) -> str:
    """XXH3 of the output structure's types, shapes and bytes (equal on ranks that agree)."""
    h = xxhash.xxh3_64()

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{_describe(t)};".encode())
            if t.numel():
                h.update(byte_view(t))
        elif isinstance(v, dict):
            h.update(f"d{len(v)};".encode())
            for k in v:
                h.update(f"{k!r};".encode())
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(f"l{len(v)};".encode())
            for x in v:
                walk(x)
        else:
            h.update(f"{type(v).__name__}:{v!r};".encode())
    walk(value)
    return h.hexdigest()


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def replay(model: torch.nn.Module, inputs: Sequence[Any], outputs: Sequence[Any], atol: float,
           rtol: float, device: torch.device, tick: Callable[[], None] = lambda: None
           ) -> list[dict[str, Any]]:
    """Run every batch (eval mode, no grad) on this rank; one JSON report per batch. Collective
    for sharded models: every rank calls it with the same batches. A batch whose forward raises
    is reported as failed and ends the replay (the later batches are reported as not run)."""
    model.eval()
    reports: list[dict[str, Any]] = []
    broken = ""
    with torch.no_grad():
        for i, (batch, want) in enumerate(zip(inputs, outputs)):
            if broken:
                reports.append({"batch": i, "ok": False, "max_abs": None, "max_rel": None,
                                "path": None, "reason": f"not run: {broken}", "digest": None})
                continue
            try:
                got = detach(call(model, to_device(batch, device)))
            except Exception as exc:
                broken = f"batch {i} raised {type(exc).__name__}"
                reports.append({"batch": i, "ok": False, "max_abs": None, "max_rel": None,
                                "path": "forward", "digest": None, "reason":
                                f"forward raised {type(exc).__name__}: {exc}"[:MAX_BATCH_DETAIL]})
                continue
            diff = Diff()
            compare(got, want, atol, rtol, "output", diff)
            reports.append({"batch": i, "ok": diff.path is None, "max_abs": diff.max_abs,
                            "max_rel": diff.max_rel, "path": diff.path,
                            "reason": diff.reason[:MAX_BATCH_DETAIL], "digest": digest(got)})
            tick()
    return reports


def _json_float(x: float | None) -> float | str | None:
    return x if x is None or math.isfinite(x) else repr(x)


def merge(per_rank: Sequence[Sequence[dict[str, Any]]], atol: float, rtol: float) -> Check:
    """One replay check from every rank's reports: per batch the worst difference over the
    ranks, the first offending rank, and whether all ranks produced the same bytes."""
    batches: list[dict[str, Any]] = []
    first: dict[str, Any] | None = None
    for i in range(len(per_rank[0])):
        reps = [rank_reports[i] for rank_reports in per_rank]
        digests = {r["digest"] for r in reps}
        agree = len(digests) == 1 and None not in digests
        failed = [(rank, r) for rank, r in enumerate(reps) if not r["ok"]]
        abs_ = [r["max_abs"] for r in reps if r["max_abs"] is not None]
        rel = [r["max_rel"] for r in reps if r["max_rel"] is not None]
        entry = {"batch": i, "ok": not failed and agree,
                 "max_abs": _json_float(max(abs_) if abs_ else None),
                 "max_rel": _json_float(max(rel) if rel else None),
                 "ranks_agree": agree}
        if failed:
            rank, r = failed[0]
            entry["first_offending"] = {"batch": i, "rank": rank, "path": r["path"],
                                        "reason": r["reason"]}
        elif not agree:
            seen = ", ".join(f"rank {k}: {r['digest']}" for k, r in enumerate(reps))
            entry["first_offending"] = {"batch": i, "rank": None, "path": None,
                                        "reason": f"ranks computed different outputs ({seen})"}
        if first is None and "first_offending" in entry:
            first = entry["first_offending"]
        batches.append(entry)
    mode = "bitwise" if atol == 0 and rtol == 0 else f"atol={atol:g} rtol={rtol:g}"
    data = {"batches": batches, "atol": atol, "rtol": rtol, "mode": mode,
            "first_offending": first}
    if first is not None:
        bad = sum(1 for b in batches if not b["ok"])
        where = f" on rank {first['rank']}" if first["rank"] is not None else ""
        at = f" at {first['path']}" if first["path"] else ""
        return Check("replay", False, f"{bad} of {len(batches)} batches differ ({mode}): batch "
                     f"{first['batch']}{where}{at}: {first['reason']}", data=data)
    worst = max((b["max_abs"] for b in batches if isinstance(b["max_abs"], float)), default=0.0)
    return Check("replay", True, f"{len(batches)} batches match ({mode}; max abs diff "
                 f"{worst:.3g}) on {len(per_rank)} rank{'s' * (len(per_rank) > 1)}, "
                 "all ranks agree", data=data)
