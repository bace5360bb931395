"""Snapshots: copy a rank's tensor leaves into reusable host buffers so training may change its
tensors the moment it is allowed to.

Buffers are kept per leaf key between saves (a training state has the same keys and shapes at
every save), so after the first save a snapshot is a plain memory copy into warm pages: no
allocation, no page faults (large CPU copies are one streamed copy or ``memmove`` each, into
buffers on huge pages: engine/hostcopy.py). A save reuses them only once the previous save has
finished: the manager waits for it before staging. Buffers for CUDA tensors are pinned and
filled on a side stream that is ordered after the current stream's work. Large CPU buffers are
page-aligned (anonymous ``mmap``) so that the writer can hand them to the disk without the page
cache (storage/direct.py); pinned buffers already are.

* **Eager** (``snapshot="eager"``, the default): every tensor is copied inside ``save``, so the
  checkpoint is the state at ``save()`` whatever writes it later; for CUDA tensors the training
  stream is then made to wait for the copy, so the host never blocks on it and training never
  overwrites a tensor before it was copied.
* **Lazy** (opt-in, with a contract: :mod:`.lazy`): parameters and optimizer state are copied
  after ``save`` returns, on a copy thread, while the next forward and backward run, and
  optimizer steps wait for the copy. The rest is copied inside ``save``: on CUDA as a
  device-side clone queued on training's stream, which costs the host nothing. So are keys found
  torn by an earlier save, and the weights of modules that rewrite them in forward.
"""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch

from .. import knobs
from ..planning.statedict import Collected, TensorLeaf
from ..storage.direct import aligned_buffer
from .bounce import trim as trim_bounce
from .hostcopy import copy_into
from .lazy import (
    CopyJob,
    CudaFence,
    LazySnapshot,
    storage_ptr,
    warn_contract_once,
    written_in_forward,
)
from .priority import lower_thread_priority

ALIGNED_MIN = 1 << 20  # smaller buffers are written through the page cache anyway


def page_aligned(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor; from ``ALIGNED_MIN`` bytes on, on pages of its own (the
    tensor keeps the mapping alive)."""
    nbytes = shape.numel() * dtype.itemsize
    if nbytes < ALIGNED_MIN:
        return torch.empty(shape, dtype=dtype)
    pages = aligned_buffer(nbytes)  # on huge pages where the kernel gives them
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)


class StagingPool:
    """Host buffers reused across saves, keyed by leaf key, dtype and shape."""

    def __init__(self, lazy: bool = False) -> None:
        self.lazy = lazy
        if lazy:
            warn_contract_once()
        self.eager_keys: set[str] = set()  # lazy: keys once found torn, copied inside save()
        self._buffers: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._streams: dict[torch.device, Any] = {}
        self._copier: ThreadPoolExecutor | None = None  # runs lazy copies

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def _buffer(self, key: str, src: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.dtype != src.dtype or buf.shape != src.shape:
            if src.device.type == "cuda":
                buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=True)
            else:
                buf = page_aligned(src.shape, src.dtype)
            self._buffers[key] = buf
        return buf

    def stage(self, collected: Collected, blocking: bool, state: object = None
              ) -> Collected | Snapshot | LazySnapshot:
        """What a save writes from: a snapshot for an async save; for a blocking one the live
        tensors, unless some are on a GPU: those go through the pinned buffers and the side
        stream too (one D2H pass at full speed instead of a pageable copy per piece)."""
        if blocking and all(leaf.data.device.type != "cuda" for leaf in collected.leaves):
            return collected
        return self.snapshot(collected, state)

    def snapshot(self, collected: Collected, state: object = None) -> Snapshot | LazySnapshot:
        """Stage every leaf into its buffer; aliases share their target's copy."""
        with self._lock:
            live = {leaf.key for leaf in collected.leaves if leaf.alias_of is None}
            for stale in set(self._buffers) - live:  # keys gone from the state: free them
                del self._buffers[stale]
            if self.lazy:
                return self._lazy(collected, written_in_forward(state))
            copies: dict[str, torch.Tensor] = {}
            leaves: list[TensorLeaf] = []
            events = []
            for leaf in collected.leaves:
                if leaf.alias_of is not None and leaf.alias_of in copies:
                    leaves.append(replace(leaf, data=copies[leaf.alias_of]))
                    continue
                src = leaf.data
                buf = self._buffer(leaf.key, src)
                if src.device.type == "cuda":
                    events.append(self._copy_cuda(buf, src))
                else:
                    copy_into(buf, src)
                copies[leaf.key] = buf
                leaves.append(replace(leaf, data=buf, source=None))
            return Snapshot(Collected(collected.tree, leaves), [e for e in events if e])

    def _lazy(self, collected: Collected, in_forward: set[int]) -> LazySnapshot:
        """Copy the unguarded leaves now; queue the guarded ones (parameters, optimizer state)
        as jobs for the background copy, unless they were found torn before or their module
        writes them in forward (``in_forward``: storage addresses)."""
        copies: dict[str, torch.Tensor] = {}
        leaves: list[TensorLeaf] = []
        jobs: list[CopyJob] = []
        streams: dict[torch.device, Any] = {}
        for leaf in collected.leaves:
            if leaf.alias_of is not None and leaf.alias_of in copies:
                leaves.append(replace(leaf, data=copies[leaf.alias_of], source=None))
                continue
            src = leaf.data
            buf = self._buffer(leaf.key, src)
            kind = src.device.type
            later = leaf.guarded and leaf.version is not None and \
                leaf.key not in self.eager_keys and \
                not (in_forward and storage_ptr(leaf.source) in in_forward)
            if kind == "cuda":
                streams.setdefault(src.device, self._stream(src.device))
                if later:
                    jobs.append(CopyJob(leaf.key, src, buf, leaf.source, leaf.version))
                else:  # a private clone, queued on training's stream before anything later
                    jobs.append(CopyJob(leaf.key, src.clone(), buf))
            elif later and kind == "cpu":
                jobs.append(CopyJob(leaf.key, src, buf, leaf.source, leaf.version))
            else:
                copy_into(buf, src)
            copies[leaf.key] = buf
            leaves.append(replace(leaf, data=buf, source=None))
        fence = CudaFence(streams) if streams else None
        snap = LazySnapshot(Collected(collected.tree, leaves), jobs, fence=fence,
                            on_torn=self._torn)
        if self._copier is None:  # at the background saves' priority: training goes first
            self._copier = ThreadPoolExecutor(1, thread_name_prefix="shardckpt-copy",
                                              initializer=lower_thread_priority,
                                              initargs=(knobs.SAVE_NICE.get(),))
        snap.start(self._copier)
        return snap

    def _torn(self, keys: list[str]) -> None:
        """A lazy save found ``keys`` changed outside an optimizer step: copy them inside
        ``save()`` from now on."""
        new = sorted(set(keys) - self.eager_keys)
        if new:
            self.eager_keys.update(new)
            warnings.warn(f"snapshot='lazy': {len(new)} tensor(s) changed outside an optimizer "
                          f"step after save(); from now on they are copied inside save(): "
                          f"{', '.join(repr(k) for k in new[:10])}{' ...' * (len(new) > 10)}",
                          stacklevel=2)

    def _stream(self, device: torch.device) -> Any:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        return stream

    def _copy_cuda(self, buf: torch.Tensor, src: torch.Tensor) -> Any:
        device = src.device
        stream = self._stream(device)
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)  # the copy sees every write training queued before save
        with torch.cuda.stream(stream):
            buf.copy_(src, non_blocking=True)
            src.record_stream(stream)  # the allocator must not recycle src before the copy
            event = torch.cuda.Event()
            event.record(stream)
        current.wait_stream(stream)  # training's later writes wait for the copy, on the GPU
        return event

    def release(self) -> None:
        with self._lock:
            self._buffers.clear()
            self._streams.clear()
            if self._copier is not None:
                self._copier.shutdown(wait=True)
                self._copier = None
        trim_bounce()  # a blocking save's bounce buffers (engine/bounce.py)


class Snapshot:
    """A staged state: the collected tree with leaves pointing at host buffers."""

    def __init__(self, collected: Collected, events: list[Any]) -> None:
        self.collected = collected
        self._events = events

    def ready(self) -> Collected:
        """Wait (background thread) until device-to-host copies have landed; the staged state."""
        for event in self._events:
            event.synchronize()
        self._events = []
        return self.collected
