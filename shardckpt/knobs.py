"""Tunables in one place, each overridable by an environment variable.

Tests use the variables to force awkward cases (tiny chunks, one thread, a small budget); operators
use them to tune a cluster without touching training code. Values are read when asked for, so a
variable set after import still takes effect.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class Knob:
    env: str
    default: int
    minimum: int = 0
    doc: str = ""

    def get(self) -> int:
        raw = os.environ.get(self.env)
        if raw is None or raw.strip() == "":
            return self.default
        try:
            value = _parse_size(raw)
        except ValueError:
            raise ValueError(f"{self.env}={raw!r} is not an integer or size (e.g. 64M)") from None
        if value < self.minimum:
            raise ValueError(f"{self.env}={raw!r} is below the minimum {self.minimum}")
        return value


@dataclass(frozen=True)
class ChoiceKnob:
    """A knob that takes one of a few words."""

    env: str
    default: str
    choices: tuple[str, ...]
    doc: str = ""

    def get(self) -> str:
        raw = os.environ.get(self.env, "").strip().lower()
        if raw == "":
            return self.default
        if raw not in self.choices:
            raise ValueError(f"{self.env}={raw!r} is not one of {', '.join(self.choices)}")
        return raw


@dataclass(frozen=True)
class SwitchKnob:
    """A knob that is on or off: 1/0, true/false, on/off, yes/no (any case)."""

    env: str
    default: int
    doc: str = ""

    def get(self) -> int:
        raw = os.environ.get(self.env, "").strip().lower()
        if raw == "":
            return self.default
        if raw in _ON:
            return 1
        if raw in _OFF:
            return 0
        raise ValueError(f"{self.env}={os.environ.get(self.env)!r} is not a switch: use 1 or 0 "
                         f"(or true/false, on/off, yes/no)")


_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def check_switches() -> None:
    """Refuse a malformed switch knob now (at manager construction), not at the first save:
    ``ShardckptError`` naming the variable."""
    from .errors import ShardckptError  # errors never imports knobs; kept local all the same

    for knob in ALL_KNOBS:
        if isinstance(knob, SwitchKnob):
            try:
                knob.get()
            except ValueError as exc:
                raise ShardckptError(str(exc)) from None


def _parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    if scale != 1:
        text = text[:-1]
    return int(text) * scale


CHUNK_SIZE = Knob("SHARDCKPT_CHUNK_SIZE", 16 * MiB, 1, "bytes of tensor data per checksummed chunk")
IO_THREADS = Knob("SHARDCKPT_IO_THREADS", 4, 1, "concurrent file writers / readers per rank")
FILES_PER_RANK = Knob("SHARDCKPT_FILES_PER_RANK", 2, 1, "shard files each rank writes per save")
MEMORY_BUDGET = Knob(
    "SHARDCKPT_MEMORY_BUDGET", 512 * MiB, 1, "bytes the I/O pipeline may hold beyond the snapshot"
)
ENCODE_THREADS = Knob("SHARDCKPT_ENCODE_THREADS", 2, 0,
                      "threads hashing/compressing chunks ahead of the writers (0: inline)")
COLLECTIVE_TIMEOUT_S = Knob(
    "SHARDCKPT_COLLECTIVE_TIMEOUT", 600, 1, "seconds a save/load collective may wait for peers"
)
FSYNC = Knob("SHARDCKPT_FSYNC", 1, 0, "1: fsync files and directories before commit; 0: skip")
DIRECT_IO = Knob("SHARDCKPT_DIRECT_IO", 1, 0,
                 "1: large aligned writes to local files bypass the page cache (O_DIRECT, where "
                 "the filesystem has it); 0: every write buffered")
CONNECT_TIMEOUT_S = Knob(
    "SHARDCKPT_CONNECT_TIMEOUT", 3, 1,
    "seconds a remote location has to answer a reachability probe (and to connect, on S3)")
CONNECT_ATTEMPTS = Knob("SHARDCKPT_CONNECT_ATTEMPTS", 2, 1,
                        "reachability probes of a remote location that fails fast, before it "
                        "counts as unreachable")
UNREACHABLE_TTL_S = Knob("SHARDCKPT_UNREACHABLE_TTL", 30, 0,
                         "seconds a location found unreachable is skipped before its next probe")
STORAGE_ATTEMPTS = Knob("SHARDCKPT_STORAGE_ATTEMPTS", 2, 1,
                        "tries of one storage operation when it fails transiently (1: no retry)")
STORAGE_RETRY_SECONDS = Knob(
    "SHARDCKPT_STORAGE_RETRY_SECONDS", 120, 0,
    "seconds after which a failing storage operation is no longer retried")
S3_BLOCK_SIZE = Knob("SHARDCKPT_S3_BLOCK_SIZE", 32 * MiB, 5 * MiB,
                     "bytes buffered per S3 upload part (S3's minimum part is 5 MiB)")
LEASE_TTL_S = Knob("SHARDCKPT_LEASE_TTL", 300, 1, "seconds a writer/reaper lease lives unrenewed")
PRUNE_LOCK_TTL_S = Knob("SHARDCKPT_PRUNE_LOCK_TTL", 120, 1,
                        "seconds the prune lock lives unrenewed (a dead holder's lock expires)")
LOCK_SETTLE_MS = Knob("SHARDCKPT_LOCK_SETTLE_MS", 250, 0,
                      "ms between writing the prune lock and reading it back (Fischer's delay)")
EXIT_WAIT_S = Knob("SHARDCKPT_EXIT_WAIT_S", 600, 0,
                   "seconds the interpreter's exit waits for saves still in flight (no close())")

SAVE_NICE = Knob("SHARDCKPT_SAVE_NICE", 10, 0,
                 "nice value (0-19) of a background save's copy, hashing and writing threads: "
                 "higher leaves training more of the CPU (Linux); 0: the caller's priority")

MAX_FAILED_SAVES = Knob("SHARDCKPT_MAX_FAILED_SAVES", 3, 1,
                        "background saves that may fail in a row under on_error='warn' before the "
                        "next save() raises on every rank")

READ_ONCE = ChoiceKnob("SHARDCKPT_READ_ONCE", "auto", ("auto", "1", "0"),
                       "1: bytes several loading ranks need are read from storage by one of them "
                       "and sent to the others; 0: every rank reads its own; auto: on for object "
                       "stores and network filesystems, off for local disks")

STREAM_COPY = SwitchKnob("SHARDCKPT_STREAM_COPY", 1,
                   "1: an eager snapshot's large CPU copies use streaming stores (x86-64 Linux, "
                   "where the kernel allows the routine: engine/streamcopy.py); 0: memmove")

ALL_KNOBS: tuple[Knob | ChoiceKnob | SwitchKnob, ...] = (
             CHUNK_SIZE, IO_THREADS, FILES_PER_RANK, MEMORY_BUDGET, ENCODE_THREADS,
             COLLECTIVE_TIMEOUT_S, FSYNC, DIRECT_IO, CONNECT_TIMEOUT_S, CONNECT_ATTEMPTS,
             UNREACHABLE_TTL_S, STORAGE_ATTEMPTS, STORAGE_RETRY_SECONDS, S3_BLOCK_SIZE,
             LEASE_TTL_S, PRUNE_LOCK_TTL_S, LOCK_SETTLE_MS, EXIT_WAIT_S,
             SAVE_NICE, MAX_FAILED_SAVES, READ_ONCE, STREAM_COPY)
