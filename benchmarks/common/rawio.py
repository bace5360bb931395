"""The disk's raw speed for a rank's exact state bytes: the baseline for checkpoint throughput.

``HostBuffers`` holds every local tensor in one flat, pre-faulted CPU buffer (a copy into it is
the lower bound for a snapshot); ``write_raw``/``read_raw`` move those bytes to and from one file
in fixed-size ``os.write``/``readinto`` calls, with nothing else (no format, no checksum).
"""

from __future__ import annotations

import os

import torch

from .fsdp_state import nbytes


class HostBuffers:
    """One flat CPU byte buffer holding every local tensor (64-byte aligned views into it).

    ``views[name]`` is the buffer's view shaped like tensor ``name``; ``spans`` the (offset,
    length) of each in ``flat``; ``mv`` a memoryview of ``flat``; ``nbytes`` the tensors' bytes.
    ``pin`` allocates pinned memory (for device-to-host copies with CUDA).
    """

    def __init__(self, tensors: list[tuple[str, torch.Tensor]], pin: bool) -> None:
        offsets, off = [], 0
        for _, t in tensors:
            offsets.append(off)
            off += (nbytes(t) + 63) // 64 * 64
        self.nbytes = sum(nbytes(t) for _, t in tensors)
        self.flat = torch.empty(off, dtype=torch.uint8, pin_memory=pin)
        self.flat.zero_()  # fault the pages in now, not inside a timed phase
        self.views: dict[str, torch.Tensor] = {}
        self.spans: list[tuple[int, int]] = []
        for (name, t), o in zip(tensors, offsets):
            n = nbytes(t)
            self.views[name] = self.flat[o:o + n].view(t.dtype).view(t.shape)
            self.spans.append((o, n))
        self.mv = memoryview(self.flat.numpy())

    def copy_from(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Copy ``tensors`` into their views (and wait for the device, with CUDA)."""
        for name, t in tensors:
            self.views[name].copy_(t, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def fsync_dir(path: str) -> None:
    """fsync the directory ``path`` (makes a new entry in it durable)."""
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_raw(path: str, buffers: HostBuffers, chunk: int, fsync: bool) -> None:
    """Write the tensors' bytes of ``buffers`` to ``path`` in writes of at most ``chunk`` bytes;
    with ``fsync``, then fsync the file and its directory."""
    mv = buffers.mv
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for o, n in buffers.spans:
            end = o + n
            while o < end:
                o += os.write(fd, mv[o:min(end, o + chunk)])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if fsync:
        fsync_dir(os.path.dirname(path))


def read_raw(path: str, buffers: HostBuffers, chunk: int) -> None:
    """Read a file written by ``write_raw`` back into ``buffers`` in reads of at most ``chunk``
    bytes; ``OSError`` if it is short."""
    mv = buffers.mv
    with open(path, "rb", buffering=0) as f:
        for o, n in buffers.spans:
            end = o + n
            while o < end:
                got = f.readinto(mv[o:min(end, o + chunk)])
                if not got:
                    raise OSError(f"{path}: short read")
                o += got
