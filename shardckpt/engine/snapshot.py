"""Snapshots: copy a rank's tensor leaves into reusable host buffers so training may change its
tensors the moment ``save`` returns.

Buffers are kept per leaf key between saves (a training state has the same keys and shapes at
every save), so after the first save a snapshot is a plain memory copy into warm pages: no
allocation, no page faults. Buffers for CUDA tensors are pinned and filled on a side stream that
is ordered after the current stream's work; training's stream is then made to wait for the copy,
so the host never blocks on it and training never overwrites a tensor before it was copied.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import torch

from ..planning.statedict import Collected, TensorLeaf


class StagingPool:
    """Host buffers reused across saves, keyed by leaf key, dtype and shape."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._streams: dict[torch.device, Any] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def _buffer(self, key: str, src: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.dtype != src.dtype or buf.shape != src.shape:
            pin = src.device.type == "cuda"
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buf
        return buf

    def snapshot(self, collected: Collected) -> Snapshot:
        """Copy every leaf into its buffer; aliases share their target's copy."""
        with self._lock:
            live = {leaf.key for leaf in collected.leaves if leaf.alias_of is None}
            for stale in set(self._buffers) - live:  # keys gone from the state: free them
                del self._buffers[stale]
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
                    buf.copy_(src)
                copies[leaf.key] = buf
                leaves.append(replace(leaf, data=buf))
            return Snapshot(Collected(collected.tree, leaves), [e for e in events if e])

    def _copy_cuda(self, buf: torch.Tensor, src: torch.Tensor) -> Any:
        device = src.device
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
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
