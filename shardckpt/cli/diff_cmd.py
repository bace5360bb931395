"""``shardckpt diff A B``: per-tensor comparison of two committed checkpoints.

A and B are ``ROOT@STEP`` (the last ``@`` splits, so URLs with ``@`` in them work). Each tensor
key is reported as ``same`` (dtype, shape and bytes identical), ``changed`` (with the largest
absolute difference), ``added`` (only in B) or ``removed`` (only in A). Tensors whose pieces carry
identical chunk checksums in both manifests are declared ``same`` without reading their bytes;
the others are read in full, one key at a time, to bound memory.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .progress import bar, wanted

if TYPE_CHECKING:
    from ..format.manifest import Manifest, TensorMeta
    from ..storage import Location

_EPILOG = """\
A and B are ROOT@STEP: a checkpoint root (path or fsspec URL) and a committed step, split at
the last '@' (so 's3://user@bucket/run@100' works). ROOT alone, or ROOT@latest, is the newest
step directory holding a manifest (exit 2 if that manifest is corrupt). Both may live in the
same root or in two.
--replica URL names another location holding copies of A's root; it is read from for B too
when B is in the same root.

Per tensor: same (dtype, shape and raw bytes identical: NaN payloads and -0.0 count), changed
(max_abs_diff computed in float64, or as an exact integer for integer/bool tensors; a dtype or
shape change reports reason 'dtype' / 'shape' and no difference), added (in B only), removed
(in A only). Top-level keys of the non-tensor state whose JSON differs are listed too.

exit codes: 0 compared, whether or not the checkpoints differ (diff is informational);
2 a checkpoint is missing, incomplete or corrupt; 64 usage error (e.g. no such root).
"""


@dataclass(frozen=True)
class Spec:
    root: str
    step: int | None  # None: the latest

    def __str__(self) -> str:
        return f"{self.root}@{'latest' if self.step is None else self.step}"


def parse_spec(text: str) -> Spec:
    """``ROOT@STEP`` split at the last '@'; ``ROOT`` or ``ROOT@latest``: the newest step
    directory holding a manifest. ``UsageError`` if what follows the '@' is no step."""
    from .common import UsageError

    root, sep, step = text.rpartition("@")
    if not sep or "/" in step:  # no '@', or one inside the URL (s3://user@bucket/run)
        root, step = text, "latest"
    if not root:
        raise UsageError(f"{text!r}: expected ROOT@STEP")
    if step == "latest":
        return Spec(root, None)
    from ..format.manifest import MAX_STEP

    if not (step.isascii() and step.isdigit()) or int(step) > MAX_STEP:
        raise UsageError(f"{text!r}: step {step!r} is not a non-negative integer or 'latest'")
    return Spec(root, int(step))


def _open(spec: Spec, replicas: Sequence[str]) -> tuple[list[Location], int]:
    """The reachable locations of ``spec`` (UsageError for a missing root) and its step."""
    from .common import latest_step, open_locations

    locs = open_locations([spec.root, *replicas], warn="diff")
    return locs, latest_step(locs) if spec.step is None else spec.step


def _pieces_sig(meta: TensorMeta) -> tuple[Any, ...]:
    return tuple((p.offsets, p.lengths, tuple((c.raw, c.xxh3, c.codec) for c in p.chunks))
                 for p in meta.pieces)


def _metas(manifest: Manifest) -> dict[str, tuple[TensorMeta | None, str | None]]:
    from ..consolidate import tensor_keys

    out: dict[str, tuple[TensorMeta | None, str | None]] = {}
    for name, meta, target in tensor_keys(manifest):
        if meta is None:
            assert target is not None
            meta = manifest.resolve(name)  # None when the target is per-rank
        out[name] = (meta, target)
    return out


def _raw_equal(a: Any, b: Any) -> bool:
    import torch

    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def max_abs_diff(a: Any, b: Any) -> float | int:
    """Largest |a - b| of two same-shape, same-dtype tensors: float64 for floating and complex
    dtypes (NaN against NaN counts 0, NaN against a number counts inf), exact int otherwise."""
    import torch

    if a.numel() == 0:
        return 0 if not (a.is_floating_point() or a.is_complex()) else 0.0
    if a.is_floating_point() or a.is_complex():
        wide = torch.complex128 if a.is_complex() else torch.float64
        x, y = a.to(wide), b.to(wide)
        d = (x - y).abs()
        d[x == y] = 0.0  # equal infinities
        nx, ny = torch.isnan(x), torch.isnan(y)
        d[nx & ny] = 0.0
        d[nx ^ ny] = math.inf
        return float(d.max())
    if a.dtype == torch.uint64:
        return max(abs(int(p) - int(q)) for p, q in zip(a.reshape(-1).tolist(),
                                                         b.reshape(-1).tolist()))
    x, y = a.to(torch.int64), b.to(torch.int64)
    d = x - y  # wraps on overflow, possible only for int64 inputs
    bad = (((x >= 0) != (y >= 0)) & ((d >= 0) != (x >= 0))) | (d == torch.iinfo(torch.int64).min)
    best = int(d[~bad].abs().max()) if bool((~bad).any()) else 0
    if bool(bad.any()):
        best = max(best, max(abs(p - q) for p, q in zip(x[bad].tolist(), y[bad].tolist())))
    return best


def _tree_changes(ta: Any, tb: Any) -> list[str]:
    def top(tree: Any) -> dict[str, Any] | None:
        if isinstance(tree, list) and len(tree) == 2 and tree[0] == "d" and \
                isinstance(tree[1], dict):
            return tree[1]
        return None

    da, db = top(ta), top(tb)
    if da is None or db is None:
        return [] if _canon(ta) == _canon(tb) else ["<root>"]
    return sorted(k for k in set(da) | set(db)
                  if k not in da or k not in db or _canon(da[k]) != _canon(db[k]))


def _canon(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def diff(locs_a: Sequence[Location], step_a: int, locs_b: Sequence[Location], step_b: int,
         atol: float = 0.0, progress: bool = False) -> dict[str, Any]:
    """The report of ``diff`` (the ``--json`` document without ``a`` / ``b``)."""
    from ..catalog import find_manifest
    from ..consolidate import read_full
    from ..engine.index import full_manifest
    from ..engine.reader import CheckpointReader
    from ..storage import step_dirname

    reader_a = CheckpointReader(locs_a, step_dirname(step_a), find_manifest(locs_a, step_a)[0])
    reader_b = CheckpointReader(locs_b, step_dirname(step_b), find_manifest(locs_b, step_b)[0])
    ma, mb = full_manifest(reader_a), full_manifest(reader_b)
    ka, kb = _metas(ma), _metas(mb)
    rows: list[dict[str, Any]] = []
    keys = sorted(set(ka) | set(kb))
    for key in bar(keys, desc="diff", total=len(keys), enabled=progress, unit="tensor"):
        if key not in kb:
            rows.append({"key": key, "status": "removed", "max_abs_diff": None})
            continue
        if key not in ka:
            rows.append({"key": key, "status": "added", "max_abs_diff": None})
            continue
        (a, ta), (b, tb) = ka[key], kb[key]
        if a is None or b is None:  # an alias of a per-rank tensor: compare the targets' names
            same = a is None and b is None and ta == tb
            rows.append({"key": key, "status": "same" if same else "changed",
                         "max_abs_diff": None, **({} if same else {"reason": "alias"})})
            continue
        if a.dtype != b.dtype or a.shape != b.shape:
            rows.append({"key": key, "status": "changed", "max_abs_diff": None,
                         "reason": "dtype" if a.dtype != b.dtype else "shape"})
            continue
        if _pieces_sig(a) == _pieces_sig(b):
            rows.append({"key": key, "status": "same", "max_abs_diff": 0})
            continue
        xa, xb = read_full(reader_a, a), read_full(reader_b, b)
        if _raw_equal(xa, xb):
            rows.append({"key": key, "status": "same", "max_abs_diff": 0})
        else:
            d = max_abs_diff(xa, xb)
            row = {"key": key, "status": "changed", "max_abs_diff": d}
            if atol > 0 and d <= atol:
                row["status"], row["reason"] = "same", "within_atol"
            elif d == 0:
                row["reason"] = "bits"  # -0.0 vs 0.0, or a different NaN payload
            rows.append(row)
        del xa, xb
    summary = {s: sum(1 for r in rows if r["status"] == s)
               for s in ("same", "changed", "added", "removed")}
    return {"summary": summary, "tensors": rows, "tree_changed": _tree_changes(ma.tree, mb.tree)}


def _fmt(d: Any) -> str:
    if d is None:
        return "-"
    if isinstance(d, float):
        return f"{d:.6g}"
    return str(d)


def cmd_diff(args: argparse.Namespace) -> int:
    from .common import UsageError, emit, latest_step

    a, b = parse_spec(args.a), parse_spec(args.b)
    if not (math.isfinite(args.atol) and args.atol >= 0):
        raise UsageError(f"--atol {args.atol}: must be a finite number >= 0")
    locs_a, step_a = _open(a, args.replica)
    if b.root == a.root:  # one root: opened (and its replicas probed) once
        locs_b, step_b = locs_a, latest_step(locs_a) if b.step is None else b.step
    else:
        locs_b, step_b = _open(b, ())
    report = diff(locs_a, step_a, locs_b, step_b, args.atol, progress=wanted(args))
    a, b = Spec(a.root, step_a), Spec(b.root, step_b)
    if args.json:
        from ..format.manifest import encode_float

        tensors = [{**r, "max_abs_diff": encode_float(r["max_abs_diff"])}
                   if isinstance(r["max_abs_diff"], float) else r for r in report["tensors"]]
        emit({"a": str(a), "b": str(b), **report, "tensors": tensors})
        return 0
    shown = [r for r in report["tensors"] if r["status"] != "same"]
    if shown:
        width = max(40, *(len(r["key"]) for r in shown))
        print(f"{'TENSOR':<{width}}  {'STATUS':<8} {'MAX ABS DIFF':>14}  REASON")
        for r in shown:
            print(f"{r['key']:<{width}}  {r['status']:<8} {_fmt(r['max_abs_diff']):>14}  "
                  f"{r.get('reason', '')}".rstrip())
    if report["tree_changed"]:
        print("non-tensor state differs under: " + ", ".join(report["tree_changed"]))
    s = report["summary"]
    print(f"{s['same']} same, {s['changed']} changed, {s['added']} added, "
          f"{s['removed']} removed")
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG
    p.add_argument("a", metavar="A", help="the old checkpoint, ROOT@STEP (ROOT: the latest)")
    p.add_argument("b", metavar="B", help="the new checkpoint, ROOT@STEP (ROOT: the latest)")
    p.add_argument("--atol", type=float, default=0.0, metavar="X",
                   help="report tensors whose max abs diff is at most X as same, with reason "
                   "'within_atol' (default 0: any byte difference counts)")
