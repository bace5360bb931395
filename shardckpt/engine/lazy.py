"""Lazy snapshots: ``save`` returns before the state is copied; the copy overlaps training.

An explicit opt-in (``snapshot="lazy"``; the default is eager), with a contract: **nothing but an
optimizer step may write parameters or optimizer state between ``save()`` and the next step**,
and writes through ``.data``, ``.numpy()`` or DLPack are not seen. A process that uses it is
warned once (:func:`warn_contract_once`). A tensor found changed outside an optimizer step fails
that save (:class:`TornSnapshotError`); from then on that key is copied inside ``save()``, with a
warning naming it. A module known to write its own weights in forward (``nn.Embedding`` /
``nn.EmbeddingBag`` with ``max_norm``: :func:`written_in_forward`) has them copied inside
``save()`` from the start.

A lazy snapshot copies a parameter or an optimizer state tensor (a *guarded* leaf: only an
optimizer step changes it in place) after ``save`` has returned: on a copy thread for CPU
tensors (at the background saves' lower priority: engine/background.py), on a side stream for
CUDA tensors (queued by that thread). Everything else (buffers, which a forward pass may
update in place, plain tensors, an object's state) is copied inside ``save``, as an eager snapshot
does: it is small, or nothing could make its writer wait.

What keeps the copy consistent:

* **A process-wide optimizer step pre-hook** (``register_optimizer_step_pre_hook``: every
  ``torch.optim.Optimizer``, including one nested inside a wrapper that calls its ``step``) waits
  for every copy in flight before the step changes anything. The waiting thread helps: it takes
  the tensors nobody has started copying yet, so a step never waits on a thread that has not
  been scheduled. On CUDA, the host only waits until the copies are *queued*; the training
  stream then waits for the copies' event on the GPU.
* **Version counters.** Each guarded tensor's ``_version`` is recorded in ``save``. On CPU it is
  compared right after that tensor's copy (an in-place op bumps the counter before it writes, so
  an unchanged counter after the copy proves the copy saw the data of ``save``). On CUDA the copy
  completes later, on the GPU, so the counters are compared when the window closes: once the
  copies have completed, or when the first optimizer step has made training's stream wait for
  them, whichever comes first. Any change is reported as a :class:`TornSnapshotError` naming the
  keys, and the save fails on every rank: a checkpoint never mixes two steps.

What a version counter cannot see: writes through ``tensor.data`` (it has a counter of its own),
through ``.numpy()``, DLPack or raw pointers, and kernels that skip the autograd layer (such as
the CPU fused AdamW kernel, harmless here because its step waits). Those are not detected.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..errors import TornSnapshotError
from ..planning.statedict import Collected, modules_in


class CopyJob:
    """One tensor to copy into its host buffer; ``version`` set: check the source's counter."""

    __slots__ = ("buf", "key", "source", "src", "version")

    def __init__(self, key: str, src: torch.Tensor, buf: torch.Tensor,
                 source: torch.Tensor | None = None, version: int | None = None) -> None:
        self.key, self.src, self.buf, self.source, self.version = key, src, buf, source, version

    def changed(self) -> bool:
        return self.version is not None and self.source is not None and \
            self.source._version != self.version


def copy_cpu(job: CopyJob) -> None:
    """The copy of one CPU tensor (a module function, so that tests can slow it down)."""
    job.buf.copy_(job.src)


class CudaFence:
    """The side streams of one snapshot: their copies are ordered after the work queued before
    ``save``, and one event per device marks the end of the copies."""

    def __init__(self, streams: dict[torch.device, Any]) -> None:
        self.streams = streams
        self.done: dict[torch.device, Any] = {}
        for device, stream in streams.items():
            # the copies see every write training queued before save(); nothing after it
            stream.wait_stream(torch.cuda.current_stream(device))

    def enqueue(self, job: CopyJob) -> None:
        stream = self.streams[job.src.device]
        with torch.cuda.stream(stream):
            job.buf.copy_(job.src, non_blocking=True)
            job.src.record_stream(stream)  # the allocator must not reuse src before the copy

    def record(self) -> None:
        for device, stream in self.streams.items():
            event = torch.cuda.Event()
            event.record(stream)
            self.done[device] = event

    def train_waits(self) -> None:
        """Training's streams wait for the copies, on the GPU: the host does not block."""
        for device, event in self.done.items():
            torch.cuda.current_stream(device).wait_event(event)

    def synchronize(self) -> None:
        for event in self.done.values():
            event.synchronize()


class LazySnapshot:
    """A staged state whose guarded tensors are copied after ``save`` has returned."""

    def __init__(self, collected: Collected, jobs: Sequence[CopyJob], step: int | None = None,
                 fence: CudaFence | None = None,
                 on_torn: Callable[[list[str]], None] | None = None) -> None:
        self.collected = collected
        self.step = step
        self._on_torn = on_torn  # told the torn keys (the pool then copies them inside save)
        self._jobs = list(jobs)
        self._fence = fence
        self._lock = threading.Lock()
        self._next = 0
        self._finished = 0
        self._done = threading.Event()
        self._closed = False
        self._torn: list[str] = []
        self._error: BaseException | None = None
        self.waited_s = 0.0  # seconds optimizer steps spent waiting for this snapshot
        self.copy_cpu_s = 0.0  # CPU seconds of the copy thread
        self._started: Any = None
        self._t0, self._t_done = time.perf_counter(), 0.0
        # the storages this snapshot still has to read: an optimizer with no parameter in them
        # cannot tear it, and steps freely (say, a second model trained alongside)
        self._storages = {storage_ptr(j.src) for j in self._jobs if j.version is not None}
        self._concerns: dict[int, bool] = {}
        if not self._jobs:
            self._finish()
        else:
            register(self)

    # ----------------------------------------------------------------------------- the copy
    def start(self, executor: Any) -> None:
        """Run the copy on ``executor``'s thread (``ready`` and the step hook then wait for it,
        or take over what it has not started)."""
        if not self._done.is_set():
            self._started = executor.submit(self._copy_thread)

    def _copy_thread(self) -> None:
        cpu0 = time.thread_time()
        self._work()
        self.copy_cpu_s += time.thread_time() - cpu0

    def _work(self) -> None:
        """Copy (CPU) or queue (CUDA) every job nobody has taken yet; any thread may call it."""
        jobs, n = self._jobs, len(self._jobs)
        while True:
            with self._lock:
                i = self._next
                if i >= n:
                    return
                self._next = i + 1
            job = jobs[i]
            try:
                if job.src.device.type == "cuda":
                    assert self._fence is not None
                    self._fence.enqueue(job)
                else:
                    copy_cpu(job)
                    if job.changed():
                        with self._lock:
                            self._torn.append(job.key)
            except BaseException as exc:  # reported by ready(); training itself carries on
                with self._lock:
                    self._error = self._error or exc
            finally:
                with self._lock:
                    self._finished += 1
                    last = self._finished == n
                if last:
                    self._finish()

    def _finish(self) -> None:
        """Every job is copied (CPU) or queued (CUDA): mark the end of the copies."""
        self._t_done = time.perf_counter()
        if self._fence is not None:
            try:
                self._fence.record()
            except BaseException as exc:
                self._error = self._error or exc
        else:
            self._close()
        self._done.set()

    def _close(self) -> None:
        """Close the window: from now on, changing a guarded tensor no longer tears this
        snapshot. CUDA jobs are checked here (CPU jobs were checked after their copies)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._fence is not None:
                self._torn.extend(j.key for j in self._jobs
                                  if j.src.device.type == "cuda" and j.changed())
        unregister(self)

    # ----------------------------------------------------------------------------- waiters
    def concerns(self, optimizer: Any) -> bool:
        """Whether ``optimizer`` steps a parameter whose storage this snapshot copies (or has
        parameters that cannot be told apart: then it waits, to be safe)."""
        known = self._concerns.get(id(optimizer))
        if known is None:
            try:
                known = any(storage_ptr(p) in self._storages
                            for group in optimizer.param_groups for p in group["params"])
            except Exception:
                known = True
            self._concerns[id(optimizer)] = known
        return known

    def before_step(self) -> None:
        """Called by the optimizer step pre-hook (training's thread): returns once the step may
        change guarded tensors."""
        if self._closed:
            return
        t0 = time.perf_counter()
        self._work()
        self._done.wait()
        if self._fence is not None:
            try:
                self._fence.train_waits()
            except BaseException as exc:
                with self._lock:
                    self._error = self._error or exc
            self._close()
        self.waited_s += time.perf_counter() - t0

    def ready(self) -> Collected:
        """Copy what is left (the save thread), wait until every copy has landed, and return the
        staged state; :class:`TornSnapshotError` if a guarded tensor changed before its copy."""
        cpu0 = time.thread_time()
        if self._started is None:  # no copy thread: this one copies
            self._work()
        self._done.wait()
        last_stats.update(copy_s=self._t_done - self._t0, jobs=len(self._jobs),
                          copy_cpu_s=self.copy_cpu_s + time.thread_time() - cpu0,
                          waited_s=self.waited_s)
        error = self._error
        if self._fence is not None:
            try:
                self._fence.synchronize()
            except BaseException as exc:
                error = error or exc
            self._close()
        if error is not None:
            raise error
        if self._torn:
            keys = sorted(self._torn)
            if self._on_torn is not None:
                self._on_torn(keys)
            at = f"step {self.step}: " if self.step is not None else ""
            raise TornSnapshotError(
                f"{at}{len(keys)} tensor(s) changed in place after save() and before they were "
                f"copied: {', '.join(repr(k) for k in keys[:10])}"
                f"{' ...' if len(keys) > 10 else ''}; nothing is committed. Call mgr.wait() "
                f"before changing parameters or optimizer state outside an optimizer step, or "
                f"use snapshot='eager'")
        return self.collected

    def done(self) -> bool:
        return self._done.is_set() and self._closed

    def cancel(self) -> None:
        """Abandon this snapshot (its save was refused before it began): no copy starts after
        this, the copy in progress ends before this returns (its buffers are reused by the next
        save), and no optimizer step waits for it any more."""
        with self._lock:
            self._next = len(self._jobs)
        if self._started is not None:
            try:
                self._started.result()
            except BaseException:  # a failed copy of an abandoned snapshot matters to no one
                pass
        if self._fence is not None:
            try:
                self._fence.synchronize()
            except BaseException:
                pass
        self._close()
        self._done.set()


_contract_warned = False

CONTRACT = ("snapshot='lazy': nothing but an optimizer step may write parameters or optimizer "
            "state between save() and the next optimizer step; writes through .data, .numpy() "
            "or DLPack are not detected and can commit a checkpoint that differs from the "
            "state at save(). snapshot='eager' (the default) has no such condition")


def warn_contract_once() -> None:
    """The lazy mode's contract, warned once per process, the first time it is used."""
    global _contract_warned
    if not _contract_warned:
        _contract_warned = True
        warnings.warn(CONTRACT, stacklevel=3)


def written_in_forward(state: object) -> set[int]:
    """Storage addresses of the weights that a module of ``state`` rewrites in place during its
    forward (``nn.Embedding`` / ``nn.EmbeddingBag`` with ``max_norm`` renormalise the rows they
    look up): those are copied inside ``save``, never lazily."""
    return {storage_ptr(m.weight) for module in modules_in(state) for m in module.modules()
            if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
            and m.max_norm is not None}


last_stats: dict[str, float] = {}
"""The last lazy snapshot of this process (for benchmarks): seconds from ``save`` to the end of
its copies, CPU seconds of the copy and save threads on it, jobs, seconds optimizer steps had
waited by the time the save thread had it."""


# --------------------------------------------------------------------------- the step hook
_inflight: list[LazySnapshot] = []
_registry_lock = threading.Lock()
_hook: Any = None


def register(snapshot: LazySnapshot) -> None:
    global _hook
    with _registry_lock:
        if _hook is None:  # one hook per process, kept: removing it could race a running step
            _hook = register_optimizer_step_pre_hook(_before_step)
        _inflight.append(snapshot)


def unregister(snapshot: LazySnapshot) -> None:
    with _registry_lock:
        if snapshot in _inflight:
            _inflight.remove(snapshot)


def inflight() -> list[LazySnapshot]:
    with _registry_lock:
        return list(_inflight)


def _before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    if _inflight:  # the common case, no save in flight, costs one truth test
        for snapshot in inflight():
            if snapshot.concerns(optimizer):
                snapshot.before_step()


def storage_ptr(t: Any) -> int:
    """The address of the storage holding ``t`` (a DTensor: its local shard); 0 if none."""
    local = getattr(t, "_local_tensor", None)  # DTensor, without an autograd call
    t = local if isinstance(local, torch.Tensor) else t
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0
