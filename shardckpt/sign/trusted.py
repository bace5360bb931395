"""``CheckpointManager(..., trusted_keys=[PUB.pem])``: loads only validly signed checkpoints.

Before any byte reaches the user's tensors, rank 0 checks the step's signature against the
trusted keys, then reads every file the signature covers, whole, at every reachable location
holding the step, and compares its SHA-256 with the signed one (:func:`.step.check_step`);
the verdict is broadcast, and only then does the ordinary load run (which reads the data a
second time, checking XXH3 as always). The cost is that extra read of the step on one rank:
see docs/operations.md (Governance) for measured numbers. The manifest cache is dropped first,
so that the load uses the manifest that was hashed. The local tier is not used while
``trusted_keys`` is set (node-local copies are not signed).

Without a step, the newest step that is validly signed is loaded; newer unsigned steps are
skipped with a warning naming them; a step whose signature exists but fails (bad signature,
a file that differs) raises :class:`~.bundle.SignatureError` rather than being skipped.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable
from typing import Any

from .. import knobs
from ..engine.resume import load_state
from ..errors import ShardckptError
from ..storage import step_dirname
from .bundle import SignatureError, UnsignedCheckpointError, load_public_key
from .step import SIGNATURE_NAME, check_step


def trusted_keys_of(paths: Iterable[str | os.PathLike[str]] | None) -> tuple[Any, ...]:
    """The public keys of ``paths`` (PEM files); ``ValueError`` naming a bad one."""
    if paths is None:
        return ()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return tuple(load_public_key(p) for p in paths)


def _check_everywhere(locations: list[Any], step: int, keys: tuple[Any, ...]) -> int:
    """Check ``step`` at every location holding it; returns the bytes hashed. Raises."""
    holding = [loc for loc in locations
               if loc.size(f"{step_dirname(step)}/manifest.json") is not None]
    if not holding:
        raise UnsignedCheckpointError(f"step {step}: committed nowhere")
    nbytes = 0
    for loc in holding:
        result = check_step(loc, step, keys)
        if not result.ok:
            cls = SignatureError if result.signed else UnsignedCheckpointError
            raise cls(f"refusing to load step {step}: {result.detail()}")
        nbytes += result.nbytes
    return nbytes


def _refuse_signed_but_broken(locations: list[Any], committed: list[int]) -> None:
    """A step directory holding a signature whose manifest is missing or corrupt (a step
    swapped or overwritten in place) is tampering or damage, never skipped quietly: it raises
    :class:`SignatureError` naming it."""
    good = set(committed)
    for loc in locations:
        try:
            listed = loc.list_step_dirs()
        except (ShardckptError, OSError):
            continue
        for s in sorted(set(listed) - good, reverse=True):
            if loc.size(f"{step_dirname(s)}/{SIGNATURE_NAME}") is not None:
                raise SignatureError(
                    f"refusing to load: {loc.display}/{step_dirname(s)} is signed but its "
                    f"manifest is missing or does not match the step (replaced, swapped or "
                    f"damaged since it was signed); run 'shardckpt verify ROOT --step {s} "
                    f"--public-key PUB.pem', or load an explicit older step")


def choose_signed_step(locations: list[Any], committed: list[int], step: int | None,
                       keys: tuple[Any, ...]) -> tuple[int, int]:
    """The step to load and the bytes hashed to check it (see the module docstring)."""
    if step is not None:
        return step, _check_everywhere(locations, step, keys)
    _refuse_signed_but_broken(locations, committed)
    unsigned: list[int] = []
    for s in reversed(committed):
        try:
            nbytes = _check_everywhere(locations, s, keys)
        except UnsignedCheckpointError:
            unsigned.append(s)
            continue
        if unsigned:
            warnings.warn(f"trusted_keys: skipping newer unsigned step(s) "
                          f"{', '.join(map(str, unsigned))} (no {SIGNATURE_NAME}); loading "
                          f"step {s}, the newest validly signed one", stacklevel=4)
        return s, nbytes
    where = locations[0].display if locations else "?"
    raise UnsignedCheckpointError(
        f"{where}: no signed checkpoint to load with trusted_keys (unsigned steps: "
        f"{', '.join(map(str, sorted(unsigned))) or 'none'}); sign one with "
        f"'shardckpt sign ROOT --step N --key KEY.pem'")


def trusted_load(mgr: Any, state: dict[str, Any], step: int | None, strict: bool,
                 restore_rng: bool, keys: tuple[Any, ...]) -> int:
    """Collective: the manager's ``load`` under ``trusted_keys``."""
    mgr.wait()
    comm = mgr._comm
    mgr._finder.manifests.clear()  # the load must use the manifest that is hashed below
    t0 = time.monotonic()
    decision: dict[str, Any] | None = None
    if comm.rank == 0:
        try:
            found = mgr._finder.survey()
            chosen, nbytes = choose_signed_step(found.reachable, found.committed(), step, keys)
            decision = {"step": chosen, "nbytes": nbytes}
        except ShardckptError as exc:
            decision = {"error": str(exc), "unsigned": isinstance(exc, UnsignedCheckpointError)}
    if comm.world_size > 1:
        decision = comm.broadcast_json(decision, "load: signature check")
    assert decision is not None
    if "error" in decision:
        raise (UnsignedCheckpointError if decision["unsigned"] else SignatureError)(
            decision["error"])
    check_s = time.monotonic() - t0
    loaded, profile = load_state(comm, mgr._finder, state, decision["step"], strict,
                                 restore_rng, knobs.IO_THREADS.get())
    mgr.last_load_profile = {**profile, "signature_check_s": check_s,
                             "signature_bytes_hashed": decision["nbytes"]}
    return loaded


__all__ = ["choose_signed_step", "trusted_keys_of", "trusted_load"]
