"""The eager snapshot's copy with streaming stores (engine/streamcopy.py, engine/hostcopy.py):
exact bytes for every size, alignment and tail; a fallback to ``memmove`` wherever the routine
cannot or must not run; and a committed checkpoint that is the state at ``save()`` when the
caller overwrites every tensor the moment ``save()`` returns."""

from __future__ import annotations

import ctypes
import platform
import sys
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.engine import hostcopy, streamcopy

X86_LINUX = sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")
MiB = 1 << 20


@pytest.fixture
def fresh_routine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The routine is loaded again by the test (its module state restored afterwards)."""
    for name in ("_loaded", "_fn", "_page", "why_not"):
        monkeypatch.setattr(streamcopy, name, getattr(streamcopy, name))
    monkeypatch.setattr(streamcopy, "_loaded", False)


def memmoves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = ctypes.memmove
    monkeypatch.setattr(hostcopy.ctypes, "memmove",
                        lambda dst, src, n: (calls.append(n), real(dst, src, n))[1])
    return calls


def test_the_routine_loads_on_x86_64_linux() -> None:
    assert (streamcopy.routine() is not None) == X86_LINUX, streamcopy.why_not
    assert streamcopy.enabled() == X86_LINUX


@pytest.mark.parametrize("nbytes", [0, 64, 65, 127, 4096, 3 * MiB + 13, 8 * MiB])
@pytest.mark.parametrize("src_offset", [0, 1, 8, 60])
def test_stream_copy_is_exact_for_every_size_and_source_alignment(nbytes: int,
                                                                   src_offset: int) -> None:
    src = torch.randint(0, 256, (nbytes + src_offset + 64,), dtype=torch.uint8)
    dst = torch.full((nbytes + 64,), 0xA5, dtype=torch.uint8)  # a guard after the copy
    done = streamcopy.stream_copy(dst.data_ptr(), src.data_ptr() + src_offset, nbytes)
    assert done == X86_LINUX  # elsewhere it declines, and copy_into uses memmove
    if not done:
        return
    assert torch.equal(dst[:nbytes], src[src_offset:src_offset + nbytes])
    assert bool((dst[nbytes:] == 0xA5).all()), "wrote past the end"


def test_stream_copy_declines_what_it_must_not_do() -> None:
    buf = torch.zeros(1024, dtype=torch.uint8)
    base = buf.data_ptr()
    assert not streamcopy.stream_copy(base + 1, base + 512, 256)  # destination not aligned
    assert not streamcopy.stream_copy(base + 64, base, 256)  # overlapping ranges
    assert bool((buf == 0).all())


def test_large_copies_stream_and_small_ones_memmove(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = memmoves(monkeypatch)
    big = torch.randn(hostcopy.STREAM_MIN // 4 + 5)  # a tail of 20 bytes after whole blocks
    small = torch.randn(hostcopy.MEMCPY_MIN // 4)
    for src in (big, small):
        buf = torch.empty_like(src)
        hostcopy.copy_into(buf, src)
        assert torch.equal(buf, src)
    tail = big.numel() * 4 % streamcopy.BLOCK
    assert calls == ([tail] if X86_LINUX else [big.numel() * 4]) + [small.numel() * 4]


def test_knob_off_copies_by_memmove(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDCKPT_STREAM_COPY", "0")
    calls = memmoves(monkeypatch)
    src = torch.randn(hostcopy.STREAM_MIN // 4 * 2)
    buf = torch.empty_like(src)
    hostcopy.copy_into(buf, src)
    assert torch.equal(buf, src) and calls == [src.numel() * 4]


@pytest.mark.parametrize("failure", ["self_test", "mprotect"])
def test_a_routine_that_cannot_be_trusted_falls_back_to_memmove(
        failure: str, fresh_routine: None, monkeypatch: pytest.MonkeyPatch) -> None:
    if failure == "self_test":
        monkeypatch.setattr(streamcopy, "_self_test", lambda fn: False)
    else:  # the kernel refuses executable memory (SELinux execmem, PaX)
        monkeypatch.setattr(streamcopy, "_CODE", streamcopy._CODE)
        monkeypatch.setattr(streamcopy.ctypes, "CDLL", lambda *a, **k: _NoExec())
    assert streamcopy.routine() is None and streamcopy.why_not
    calls = memmoves(monkeypatch)
    src = torch.randn(hostcopy.STREAM_MIN // 4 * 2)
    buf = torch.empty_like(src)
    hostcopy.copy_into(buf, src)
    assert torch.equal(buf, src) and calls == [src.numel() * 4]


class _NoExec:
    """libc whose ``mprotect`` refuses to make a page executable."""

    def __init__(self) -> None:
        self.mprotect = _Refused()


class _Refused:
    argtypes: object = None
    restype: object = None

    def __call__(self, *args: object) -> int:
        return -1


def test_save_commits_the_state_at_save_when_every_tensor_is_overwritten_at_once(
        tmp_path: Path) -> None:
    """Default (eager) async saves of large tensors, each overwritten in place the moment
    ``save()`` returns, three saves in a row: every checkpoint holds the values of its save."""
    state = {"w": torch.randn(3 * MiB // 4 + 7), "v": torch.randn(MiB // 2),
             "odd": torch.randn(5 * MiB // 4)[3:]}  # a source at an unaligned address
    expected = []
    with shardckpt.CheckpointManager(str(tmp_path)) as mgr:
        for step in range(1, 4):
            expected.append({k: v.clone() for k, v in state.items()})
            mgr.save(step, state)
            for t in state.values():
                t.mul_(-2.0).add_(1.0)
        mgr.wait()
        for step, want in enumerate(expected, start=1):
            out = {k: torch.zeros_like(v) for k, v in state.items()}
            mgr.load(out, step=step, restore_rng=False)
            for key, value in want.items():
                assert torch.equal(out[key], value), (step, key)
