"""``load(..., verify_golden=True)``: after a restore, replay the checkpoint's golden batches
(saved with ``save(..., golden=shardckpt.Golden(...))``) through the restored model and compare
with the outputs recorded at the save; a difference on any rank fails the restore on every
rank, so the caller falls back to the next candidate together.

The golden record is read with the restore itself (the reserved key is added to what the load
fills, then taken out again: the caller's ``state`` never sees it). Each rank compares its
replay with its own record (bitwise unless the save recorded tolerances); the replay runs in
eval mode without gradients, and the module's train mode, its FSDP2 sharding and every RNG
stream are put back afterwards, so a verified resume continues exactly as an unverified one.
Collective for sharded models (every rank replays the same batches). A step saved without
golden batches cannot be verified: it fails the check, naming why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..engine.failures import gather_failures
from ..errors import ShardckptError
from ..extras import has_key
from ..format import manifest as M
from ..golden import GOLDEN_KEY
from ..repro import capture_rng_state, restore_rng_state
from ..verify.replay import replay


class GoldenMismatchError(ShardckptError):
    """The restored model does not reproduce the golden outputs recorded at the save."""


def golden_spec(manifest: M.Manifest) -> dict[str, Any] | None:
    spec = manifest.extra.get("golden")
    if isinstance(spec, dict) and isinstance(spec.get("module"), str) and \
            has_key(manifest, GOLDEN_KEY):
        return spec
    return None


def with_golden(target: dict[str, Any], manifest: M.Manifest, enabled: bool) -> dict[str, Any]:
    """``target`` with a slot for the golden record when ``enabled`` and the step has one."""
    return {**target, GOLDEN_KEY: {}} if enabled and golden_spec(manifest) else target


def _device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _reshard(module: torch.nn.Module) -> None:
    """FSDP2 keeps the root's parameters unsharded after a forward without backward: shard
    them again, as the restore left them."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _replay_here(state: Mapping[str, Any], spec: Mapping[str, Any], record: Any) -> str | None:
    """None if this rank's replay matches its record, else why not."""
    module = state.get(spec["module"])
    if not isinstance(module, torch.nn.Module):
        return f"the state has no nn.Module under {spec['module']!r} to replay the batches on"
    if not isinstance(record, dict) or not isinstance(record.get("inputs"), list) or \
            not isinstance(record.get("outputs"), list) or \
            len(record["inputs"]) != len(record["outputs"]):
        return f"malformed {GOLDEN_KEY!r} record"
    rng, was_training = capture_rng_state(), module.training
    try:
        reports = replay(module, record["inputs"], record["outputs"],
                         float(spec.get("atol", 0.0)), float(spec.get("rtol", 0.0)),
                         _device(module))
    finally:
        module.train(was_training)
        _reshard(module)
        restore_rng_state(rng)
    bad = next((r for r in reports if not r["ok"]), None)
    if bad is None:
        return None
    at = f" at {bad['path']}" if bad.get("path") else ""
    return f"golden batch {bad['batch']} of {len(reports)} differs{at}: {bad['reason']}"


def check_golden(comm: Any, state: Mapping[str, Any], manifest: M.Manifest, record: Any,
                 where: str) -> None:
    """Collective: replay the golden batches of ``manifest``'s step through the model in
    ``state``; ``GoldenMismatchError`` on every rank if any rank's outputs differ (or the step
    has no golden batches)."""
    spec = golden_spec(manifest)
    try:
        why = "it was saved without golden batches (save(..., golden=shardckpt.Golden(...)))" \
            if spec is None or record is None else _replay_here(state, spec, record)
    except Exception as exc:  # never leave the other ranks waiting below
        why = f"the replay raised {type(exc).__name__}: {exc}"
    error = GoldenMismatchError(f"{where}: {why}") if why else None
    failures = gather_failures(comm, error, f"load: golden replay of {where}")
    if failures:
        raise GoldenMismatchError(f"{where} failed its golden replay: " + "; ".join(
            f"rank {r}: {m}" for r, m in sorted(failures.items())))
