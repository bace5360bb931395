"""The collective load protocol: every rank plans, reads the boxes it needs and applies them,
and all ranks agree on the outcome of each phase before the next begins (see :func:`load_step`):
nothing of the caller's state changes unless every rank's plan fits.

Tensors are loaded in place: the local shard of a DTensor gets exactly its box of the global
tensor (whatever the saving world size was), a plain tensor gets the whole tensor. Reads run in
parallel threads and every chunk is checked against its checksum.

A per-rank tensor (its bytes differed between the ranks that saved it: BatchNorm running stats
trained on different data, say) goes to each rank that saved one, at the saving world size. A
rank without a copy of its own (another world size, or a rank that did not save the key) that
has a slot for it gets the copy of the lowest rank that saved one (rank 0's, when every rank
did), as DDP broadcasts rank 0's buffers, and one warning names those keys.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CollectiveError, CorruptCheckpointError, IncompleteCheckpointError
from ..format.dtypes import torch_dtype
from ..format.manifest import TensorMeta
from ..planning.restore import LoadContext, restore
from ..planning.statedict import local_box
from .comm import Comm
from .failures import describe, raise_failures
from .index import PieceIndex
from .reader import CheckpointReader
from .readonce import bytes_read, share_reads


@dataclass
class ReadRequest:
    key: str
    meta: TensorMeta
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    out: torch.Tensor


class LoadPlanner:
    """Turns tensor references of the tree into read requests against a manifest."""

    def __init__(self, reader: CheckpointReader, rank: int | None, strict: bool) -> None:
        self.manifest = reader.manifest
        self.rank = rank
        self.strict = strict
        self.index = PieceIndex(reader, rank)
        self.requests: list[ReadRequest] = []
        self.skipped: list[str] = []
        self.borrowed: list[str] = []  # "path (rank r)": per-rank tensors loaded from rank r
        self._fresh: dict[str, torch.Tensor] = {}  # tensors allocated here, by resolved key

    def _allocate(self, key: str, target: str, meta: TensorMeta,
                  dtype: torch.dtype) -> torch.Tensor:
        """A new full tensor for ``key``, once per storage: aliases (tied weights) share it.

        Its pieces are found (headers read and checked against the files' real sizes, coverage
        checked) first, so a manifest cannot make us allocate more than its files could hold.
        """
        if target in self._fresh:
            return self._fresh[target]
        meta = self.index.meta_for(meta, target, (0,) * len(meta.shape), meta.shape)
        out = torch.empty(meta.shape, dtype=dtype)
        self.requests.append(ReadRequest(key, meta, (0,) * len(meta.shape), meta.shape, out))
        self._fresh[target] = out
        return out

    def request(self, key: str, dest: torch.Tensor | None, where: str) -> Any:
        if key not in self.manifest.tensors:
            raise CorruptCheckpointError(f"manifest: tree refers to tensor {key!r}, which the "
                                         f"manifest does not list")
        meta = self.manifest.resolve(key, self.rank)
        if meta is None:  # a per-rank tensor, and this rank has no copy of its own
            if dest is None:  # ... nor a slot for one
                self.skipped.append(where)
                return dest
            meta, source = self._lowest_copy(key)
            self.borrowed.append(f"{where} (rank {source})")
        alias = self.manifest.tensors[key].alias_of
        target = key if alias is None else alias
        dtype = torch_dtype(meta.dtype, key)
        if dest is None:
            return self._allocate(key, target, meta, dtype)
        local, shape, offsets, _ = local_box(dest)
        if local.is_meta:
            raise ValueError(f"{where}: the given tensor is on the meta device (it has no "
                             f"storage to load into): materialize it first, e.g. "
                             f"module.to_empty(device=...), then load")
        if overlaps(local):
            raise ValueError(f"{where}: the given tensor's elements overlap in memory (an "
                             f"expand()ed or other stride-0 view, strides {list(local.stride())})"
                             f": a load cannot fill it; pass a tensor of its own (.clone())")
        if tuple(shape) != meta.shape:
            raise ValueError(f"{where}: checkpoint shape {list(meta.shape)} differs from the "
                             f"given tensor's {list(shape)}")
        if local.dtype != dtype and self.strict:
            raise ValueError(f"{where}: checkpoint dtype {meta.dtype} differs from the given "
                             f"tensor's {str(local.dtype).removeprefix('torch.')} (strict=True)")
        meta = self.index.meta_for(meta, target, tuple(offsets), tuple(local.shape))
        self.requests.append(ReadRequest(key, meta, offsets, tuple(local.shape), local))
        return dest

    def _lowest_copy(self, key: str) -> tuple[TensorMeta, int]:
        entry = self.manifest.tensors[key]
        if entry.alias_of is not None:
            entry = self.manifest.tensors[entry.alias_of]
        assert entry.per_rank is not None
        return next((m, r) for r, m in enumerate(entry.per_rank) if m is not None)


def overlaps(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share memory (writing one would change another)."""
    if any(n > 1 and st == 0 for n, st in zip(t.shape, t.stride())):
        return True
    if t.numel() <= 1 or t.is_contiguous():
        return False
    span = 1  # the strides, smallest first, each past every element the smaller ones reach
    for st, n in sorted((abs(st), n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if st < span:
            break
        span += st * (n - 1)
    else:
        return False
    offsets = torch.zeros((), dtype=torch.int64)  # an unusual layout: count distinct offsets
    for n, st in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st
    return int(torch.unique(offsets).numel()) != t.numel()


def _execute(reader: CheckpointReader, req: ReadRequest) -> None:
    out = req.out
    if out.device.type != "cpu":
        host = torch.empty(out.shape, dtype=out.dtype)
        reader.read_box(req.meta, req.offsets, req.lengths, host)
        out.copy_(host)
    else:
        reader.read_box(req.meta, req.offsets, req.lengths, out)


class LoadError(CollectiveError):
    """A load failed on one or more ranks; every rank raises the same account. ``phase`` is
    ``"plan"`` (nothing of the caller's state was changed), ``"read"`` (tensors may hold bytes
    of this step: the state is partly loaded) or ``"apply"``."""

    def __init__(self, message: str, failures: dict[int, str], phase: str) -> None:
        super().__init__(message, failures)
        self.phase = phase


class CorruptLoadError(LoadError, CorruptCheckpointError):
    """Every failing rank found bad checkpoint data (a bad chunk, a truncated shard): a load
    without an explicit step tries the next older step."""


class IncompleteLoadError(LoadError, IncompleteCheckpointError):
    """Every failing rank found checkpoint data missing (a shard file gone)."""


def _kind(exc: BaseException) -> str:
    if isinstance(exc, (CollectiveError, TypeError, ValueError, KeyError)):
        return "other"
    if isinstance(exc, CorruptCheckpointError):
        return "corrupt"
    if isinstance(exc, (IncompleteCheckpointError, FileNotFoundError)):
        return "incomplete"  # a file the manifest lists is gone (a prune ran meanwhile, say)
    return "other"


def agree(comm: Comm, error: BaseException | None, phase: str, step: int) -> None:
    """Collective: if any rank failed in ``phase``, every rank raises. One all-reduce when all
    is well.

    Bad or missing data on every failing rank: every rank raises :class:`CorruptLoadError`
    (or :class:`IncompleteLoadError`), the same on every rank and in one process. Any other
    failure: one process, or the only failing rank, raises its own error; every other rank a
    ``CollectiveError``. Messages say whether the state was changed.
    """
    if comm.world_size == 1:
        if error is None:
            return
        outcomes: list[Any] = [[describe(error), _kind(error)]]
    else:
        if not comm.any_true(error is not None, f"load: {phase}"):
            return
        outcomes = comm.all_gather_json(
            [describe(error), _kind(error)] if error is not None else None, f"load: {phase}")
    failures = {r: o[0] for r, o in enumerate(outcomes) if o}
    kinds = {o[1] for o in outcomes if o}
    if phase == "plan":
        after = "nothing was loaded, the state is unchanged"
    else:
        after = ("the state is partly loaded: some tensors may hold this step's values, others "
                 "their earlier ones; load a valid step before training on")
    lines = "; ".join(f"rank {r}: {m}" for r, m in sorted(failures.items()))
    message = f"load of step {step} failed on rank(s) {sorted(failures)} ({after}): {lines}"
    if kinds <= {"corrupt", "incomplete"}:
        cls = IncompleteLoadError if kinds == {"incomplete"} else CorruptLoadError
        raise cls(message, failures, phase) from error
    if error is not None and phase != "plan":
        error.add_note(f"shardckpt: {after}")
    if error is not None and comm.world_size == 1:
        raise_failures(message, failures, error, 1)  # the error itself (OSError: StorageError)
    if error is not None and len(failures) == 1:
        raise error  # this rank alone failed: its own error says it best
    raise CollectiveError(message, failures) from error


def load_step(comm: Comm, reader: CheckpointReader, state: dict[str, Any],
              strict: bool, threads: int) -> dict[str, float]:
    """Fill ``state`` from the checkpoint on this rank; every rank calls it. Returns this rank's
    profile: seconds planning (tree walk and header reads, wall and CPU), headers read, reads.

    Three phases, each ending in an agreement of all ranks: *plan* (keys, shapes, dtypes and
    destinations checked, headers read; nothing of ``state`` changes), *read* (bytes into the
    tensors, every chunk checked), *apply* (values put into containers, ``load_state_dict`` of
    modules and optimizers). If any rank fails, every rank raises :class:`LoadError` naming the
    failing ranks, so no rank goes on training with state its peers did not load.
    """
    manifest = reader.manifest
    same_world = manifest.world_size == comm.world_size
    rank = comm.rank if same_world else None
    planner = LoadPlanner(reader, rank, strict)
    error: BaseException | None = None
    profile: dict[str, float] = {}
    ctx = LoadContext(planner.request, rank, manifest.world_size, strict, caller_rank=comm.rank,
                      defer=True)
    try:
        start, cpu = time.perf_counter(), time.thread_time()
        restore(state, manifest.tree, ctx)
        profile.update(plan_s=time.perf_counter() - start,
                       plan_cpu_s=time.thread_time() - cpu,
                       headers_read=planner.index.headers_read,
                       requests=len(planner.requests))
    except Exception as exc:
        error = exc
    agree(comm, error, "plan", manifest.step)
    try:
        # read-once (engine/readonce.py): bytes several ranks need come from one reader
        source = share_reads(comm, reader, planner.requests, threads, profile)
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for f in [pool.submit(_execute, source, r) for r in planner.requests]:
                f.result()
    except Exception as exc:
        error = exc
    profile["bytes_read"] = float(bytes_read(reader))
    agree(comm, error, "read", manifest.step)
    try:
        for apply in ctx.appliers:
            apply()
    except Exception as exc:
        error = exc
    agree(comm, error, "apply", manifest.step)
    skipped = sorted(set(ctx.skipped + planner.skipped))
    if planner.borrowed:
        warnings.warn(
            f"checkpoint step {manifest.step} (saved at world size {manifest.world_size}, loaded "
            f"at {comm.world_size}): rank {comm.rank} has no copy of its own of these per-rank "
            f"tensors, which differ between the ranks that saved them; loaded the copy of the "
            f"rank named: {', '.join(planner.borrowed[:20])}"
            + (f" ... ({len(planner.borrowed)} in all)" if len(planner.borrowed) > 20 else ""),
            stacklevel=3)
    if skipped:
        warnings.warn(
            f"checkpoint step {manifest.step} (saved at world size {manifest.world_size}, loaded "
            f"at {comm.world_size}): per-rank state that differs between the ranks that saved it, "
            f"with no copy of rank {comm.rank}'s own, not restored: {', '.join(skipped[:20])}"
            + (" ..." if len(skipped) > 20 else ""), stacklevel=3)
    return profile
