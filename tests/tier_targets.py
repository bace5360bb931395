"""Rank functions for the node-local tier's multi-process tests (tests/test_tier_*.py), run by
``harness.run_ranks`` in fresh processes on real gloo groups."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

from shardckpt.engine import peer
from shardckpt.storage import open_location
from shardckpt.tier.placement import NodeMap


@contextlib.contextmanager
def forked_ranks() -> Iterator[None]:
    """``harness.run_ranks`` starts ranks from a fork server with torch and this module loaded."""
    import multiprocessing
    from types import SimpleNamespace

    import harness

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "shardckpt.manager"])
    real = harness.multiprocessing
    harness.multiprocessing = SimpleNamespace(get_context=lambda method="spawn": ctx)
    try:
        yield
    finally:
        harness.multiprocessing = real


STEP_DIR = "step-0000000007"


def file_bytes(rank: int, index: int) -> bytes:
    """Rank ``rank``'s file ``index``: odd sizes (a zero-length one too), a function of both."""
    size = [5000 + 37 * rank, 0, 12345][index % 3]
    return hashlib.shake_256(f"{rank}/{index}".encode()).digest(size) if size else b""


def names_of(rank: int, count: int = 3) -> list[str]:
    return [f"rank{rank:05d}-{i:03d}.shard" for i in range(count)]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def push_to_peers(rank: int, world: int, root: str, nodes: list[str], copies: int,
                  chunk: int, corrupt: str | None = None, missing: str | None = None
                  ) -> dict[str, Any]:
    """Each rank writes its files under its node's path, then pushes them to the ranks of its
    peer nodes (``NodeMap.pushes``). ``corrupt``: a file whose first chunk the sender flips a
    byte of after hashing it (a fault on the wire); ``missing``: a file the sender lacks."""
    node_map = NodeMap(tuple(nodes))
    here = open_location(os.path.join(root, f"node{nodes[rank]}"))
    here.makedirs(STEP_DIR)
    names = names_of(rank)
    for i, name in enumerate(names):
        if name != missing:
            here.write_atomic(f"{STEP_DIR}/{name}", file_bytes(rank, i))
    if corrupt is not None:
        real = peer._digest
        flipped: list[bool] = []

        def flip_after_hashing(view: memoryview) -> int:
            d = real(view)
            if not flipped and len(view) and bytes(view) == file_bytes(rank, 0)[:len(view)] \
                    and names[0] == corrupt:
                view[0] ^= 0xFF
                flipped.append(True)
            return d

        peer._digest = flip_after_hashing
    group = dist.new_group(backend="gloo")
    transfers = [peer.Transfer(s, d, tuple(names_of(s))) for s, d in node_map.pushes(copies)]
    dist.barrier(group)  # every sender's files are in place
    report = peer.run_transfers(group, rank, transfers, STEP_DIR, here, here, chunk)
    return {"sent": report.bytes_sent, "received": report.bytes_received,
            "files": report.received, "errors": report.errors}


def cycle(rank: int, world: int, root: str, chunk: int) -> dict[str, Any]:
    """Transfers that form a cycle (0->1, 1->2, 2->0) and a rank that sends twice: every rank
    both sends and receives, each into its own directory."""
    here = open_location(os.path.join(root, f"r{rank}"))
    here.makedirs(STEP_DIR)
    for i, name in enumerate(names_of(rank)):
        here.write_atomic(f"{STEP_DIR}/{name}", file_bytes(rank, i))
    transfers = [peer.Transfer(0, 1, tuple(names_of(0))), peer.Transfer(1, 2, tuple(names_of(1))),
                 peer.Transfer(2, 0, tuple(names_of(2))), peer.Transfer(0, 2, tuple(names_of(0)))]
    report = peer.run_transfers(None, rank, transfers, STEP_DIR, here, here, chunk)
    return {"received": report.received, "errors": report.errors}


# ------------------------------------------------------------------------------ local tier saves
def tier_state(step: int, rank: int) -> dict[str, Any]:
    """A rank's state at ``step``: a tensor of its own and one every rank holds alike."""
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    shared = torch.Generator().manual_seed(step)
    return {f"own{rank}": torch.randn(3000 + rank, generator=g),
            "shared": torch.randn(2000, generator=shared)}


def local_saves(rank: int, world: int, root: str, nodes: list[str], steps: list[int],
                copies: int, keep: int, kill_at: int | None = None) -> dict[str, Any]:
    """Save ``steps`` to a local tier at ``root/{node}``. ``kill_at``: rank ``world - 1``
    SIGKILLs itself in the middle of that step's peer copy (after its own files are durable)."""
    import signal
    import warnings

    import shardckpt
    from shardckpt.tier.local import LocalTierStore

    if kill_at is not None and rank == world - 1:
        real = peer.run_transfers

        def die_in_transfer(group: Any, r: int, transfers: Any, step_dir: str,
                            *args: Any) -> Any:
            if step_dir == f"step-{kill_at:010d}":
                os.kill(os.getpid(), signal.SIGKILL)
            return real(group, r, transfers, step_dir, *args)

        import shardckpt.tier.local as local_mod
        local_mod.run_transfers = die_in_transfer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = LocalTierStore(shardckpt.LocalTier(os.path.join(root, "{node}"), every=1,
                                                   copies=copies, keep=keep,
                                                   node=nodes[rank]))
        for step in steps:
            store.save(step, tier_state(step, rank))
    return {"steps": store.steps(), "report": store.report().to_json(),
            "leader": store.is_leader, "profile": store.last_save_profile,
            "warnings": [str(w.message) for w in caught]}


# ------------------------------------------------------------------------------ recovery
def save_both(rank: int, world: int, root: str, nodes: list[str], steps: list[int],
              persistent_every: int, keep: int = 3) -> None:
    """A training loop's saves: every step to the local tier, every ``persistent_every`` to
    the persistent one (``root/persistent``)."""
    import shardckpt
    from shardckpt.tier.local import LocalTierStore

    store = LocalTierStore(shardckpt.LocalTier(os.path.join(root, "{node}"), every=1, copies=2,
                                               keep=keep, node=nodes[rank]))
    with shardckpt.CheckpointManager(os.path.join(root, "persistent"), async_save=False,
                                     capture_rng=False) as mgr:
        for step in steps:
            store.save(step, tier_state(step, rank))
            if step % persistent_every == 0:
                mgr.save(step, tier_state(step, rank))


def forbid_other_nodes(root: str, mine: str, nodes: list[str]) -> None:
    """A test-only audit hook: any open() under another node's path fails this worker."""
    import sys

    others = [os.path.join(root, n) + os.sep for n in set(nodes) if n != mine]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(os.fspath(args[0]))
            if any(path.startswith(o) for o in others):
                raise PermissionError(f"audit: worker on node {mine} opened {path}")

    sys.addaudithook(hook)


def recover_job(rank: int, world: int, root: str, nodes: list[str]) -> dict[str, Any]:
    """A restarted job: restore from the best candidate across tiers; report what it got."""
    import warnings

    import torch

    import shardckpt
    from shardckpt.tier.local import LocalTierStore
    from shardckpt.tier.recover import recover

    forbid_other_nodes(root, nodes[rank], nodes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = LocalTierStore(shardckpt.LocalTier(os.path.join(root, "{node}"), every=1,
                                                   copies=min(2, len(set(nodes))), keep=3,
                                                   node=nodes[rank]))
        state = {k: torch.zeros_like(v) for k, v in tier_state(0, rank).items()}
        with shardckpt.CheckpointManager(os.path.join(root, "persistent"), async_save=False,
                                         capture_rng=False) as mgr:
            steps = store.comm.broadcast_json(mgr.steps(), "test: persistent steps")

            def load_persistent(step: int) -> dict[str, float]:
                mgr.load(state, step=step, restore_rng=False)
                return dict(mgr.last_load_profile)

            cand, profile = recover(store, state, True, persistent_steps=steps,
                                    load_persistent=load_persistent)
    want = tier_state(cand.step, rank)
    return {"tier": cand.tier, "step": cand.step, "sources": list(cand.sources),
            "bytes_received": profile["bytes_received"],
            "bytes_read": profile.get("bytes_read", -1),
            "exact": all(torch.equal(state[k], v) for k, v in want.items()),
            "warnings": [str(w.message) for w in caught]}


def open_other_node(rank: int, world: int, root: str) -> str:
    forbid_other_nodes(root, "0", ["0", "1"])
    try:
        with open(os.path.join(root, "1", "x"), "rb"):
            return "opened"
    except PermissionError as exc:
        return f"PermissionError: {exc}"


# ------------------------------------------------------------------------------ the manager
def manager_loop(rank: int, world: int, root: str, nodes: list[str]) -> dict[str, Any]:
    """A loop over steps 1-7 with ``save_every=5`` and a local tier every step; then a local
    save due while the previous one is held up (on every rank) is skipped, not queued."""
    import threading
    import warnings

    import torch

    import shardckpt
    from shardckpt.tier import local as local_mod

    mgr = shardckpt.CheckpointManager(
        os.path.join(root, "persistent"), save_every=5, capture_rng=False,
        local=shardckpt.LocalTier(os.path.join(root, "{node}"), every=1, copies=2, keep=2,
                                  node=nodes[rank]))
    due = []
    for step in range(1, 8):
        if mgr.should_save(step):
            due.append(step)
            mgr.save(step, tier_state(step, rank), blocking=True)  # none skipped here
    result: dict[str, Any] = {"due": due, "persistent": mgr.steps(),
                              "local": mgr.steps(tier="local")}
    release = threading.Event()
    real = local_mod.LocalTierStore.save

    def held_up(self: Any, *args: Any, **kwargs: Any) -> Any:
        release.wait(60)
        return real(self, *args, **kwargs)

    local_mod.LocalTierStore.save = held_up  # type: ignore[method-assign]
    first = mgr.save(8, tier_state(8, rank), tier="local")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = mgr.save(9, tier_state(9, rank), tier="local")
    mgr.save(11, tier_state(11, rank), tier="persistent", blocking=True)
    result["persistent_waited"] = first.done()  # a persistent save never waits for a local one
    release.set()
    first.wait()
    mgr.wait()
    mgr.save(10, {"w": torch.ones(3)}, tier="both")
    mgr.close()
    result.update(skipped=mgr._local.skipped, second=second is None,
                  warnings=[str(w.message) for w in caught], after=mgr.steps(),
                  local_after=mgr.steps(tier="local"))
    return result


def manager_train(rank: int, world: int, root: str, nodes: list[str], steps: list[int]) -> None:
    """Saves through the manager: local every step, persistent every 5; each step's RNG is
    seeded from (rank, step) right before its save, so a resume can tell which it restored."""
    import torch

    import shardckpt

    with shardckpt.CheckpointManager(
            os.path.join(root, "persistent"), save_every=5,
            local=shardckpt.LocalTier(os.path.join(root, "{node}"), every=1, copies=2, keep=2,
                                      node=nodes[rank])) as mgr:
        for step in steps:
            torch.manual_seed(100 * rank + step)
            if mgr.should_save(step):
                mgr.save(step, tier_state(step, rank), blocking=True)


def resume_with_tier(rank: int, root: str, nodes: list[str],
                     load: Callable[[Any, dict[str, Any]], int]) -> dict[str, Any]:
    """A restarted job on node ``nodes[rank]`` (other nodes' folders forbidden) opens the
    manager with a local tier and resumes with ``load(mgr, state)``: the step, the load profile,
    whether the state is bit-exact, and every warning raised meanwhile."""
    import warnings

    import torch

    import shardckpt

    forbid_other_nodes(root, nodes[rank], nodes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with shardckpt.CheckpointManager(
                os.path.join(root, "persistent"), save_every=5,
                local=shardckpt.LocalTier(os.path.join(root, "{node}"), every=1, copies=2,
                                          keep=2, node=nodes[rank])) as mgr:
            state = {k: torch.zeros_like(v) for k, v in tier_state(0, rank).items()}
            step = load(mgr, state)
            profile = dict(mgr.last_load_profile)
    return {"step": step, "profile": profile,
            "exact": all(torch.equal(state[k], v) for k, v in tier_state(step, rank).items()),
            "warnings": [str(w.message) for w in caught]}


def manager_resume(rank: int, world: int, root: str, nodes: list[str]) -> dict[str, Any]:
    """A restarted job resumes through the manager's local tier (``load_for``)."""
    import torch

    got = resume_with_tier(rank, root, nodes, lambda mgr, state: mgr._local.load_for(mgr, state))
    step, profile = got["step"], got["profile"]
    drawn = torch.rand(1).item()
    torch.manual_seed(100 * rank + step)
    return {"step": step, "tier": profile["tier"], "bytes_received": profile["bytes_received"],
            "exact": got["exact"], "rng": drawn == torch.rand(1).item(),
            "warnings": got["warnings"]}


# ------------------------------------------------------------------------------ golden replay
def golden_fallback(rank: int, world: int, root: str) -> dict[str, Any]:
    """An FSDP2 model on 2 nodes of 1 rank: local step 1 saved with its true golden outputs,
    step 2 with shifted ones; ``load(verify_golden=True)`` replays collectively and every rank
    falls back to step 1 together."""
    import warnings

    import torch
    from torch.distributed.fsdp import fully_shard

    import shardckpt
    import shardckpt.extras as extras

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    fully_shard(model)
    golden = shardckpt.Golden([torch.ones(3, 8)])
    mgr = shardckpt.CheckpointManager(
        os.path.join(root, "persistent"), save_every=100, async_save=False, capture_rng=False,
        local=shardckpt.LocalTier(os.path.join(root, "{node}"), every=1, copies=2, keep=2,
                                  node=str(rank)))
    weights = {}
    real = extras.record_golden
    for step in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        if step == 2:
            extras.record_golden = lambda g, s: {**real(g, s), "outputs": [
                o + 1.0 for o in real(g, s)["outputs"]]}
        weights[step] = [p.to_local().clone() for p in model.parameters()]
        mgr.save(step, {"model": model}, golden=golden)
    extras.record_golden = real
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = mgr.load({"model": model}, verify_golden=True)
    mgr.close()
    return {"step": step, "tier": mgr.last_load_profile["tier"],
            "exact": all(torch.equal(p.to_local(), w)
                         for p, w in zip(model.parameters(), weights[1])),
            "warnings": [str(w.message) for w in caught]}


def path_check(rank: int, world: int, root: str, template: str, nodes: list[str]) -> str:
    """Build a manager whose local tier path is ``template`` (``{root}`` filled in); returns
    the ValueError's text, or "ok"."""
    import shardckpt

    try:
        mgr = shardckpt.CheckpointManager(
            os.path.join(root, "persistent"), save_every=5, capture_rng=False,
            local=shardckpt.LocalTier(template.replace("{root}", root), every=1,
                                      copies=min(2, len(set(nodes))), keep=2,
                                      node=nodes[rank]))
    except ValueError as exc:
        return str(exc)
    mgr.close()
    return "ok"
