"""What crosses ranks in the save protocol, as frozen types (JSON on the wire, never pickle).

One save exchanges four messages, in this order:

- :class:`RankPlan`, every rank to rank 0: its error so far, its state tree, and its leaves
  (only when their structure changed: :mod:`shardckpt.planning.plancache`);
- :class:`Assignment`, rank 0 to every rank: the failures so far, the save id, the locations
  prepared for writing, and each rank's writes as runs of indexes into its own leaf list;
- :class:`WriteReport`, every rank to rank 0: the files it wrote and where each is stored;
- :class:`Outcome`, rank 0 to every rank: committed, or the failures (and whether the storage,
  or another writer of the same step, was to blame).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..format import manifest as M


def _ranks(failures: Mapping[Any, str]) -> dict[int, str]:
    return {int(r): str(m) for r, m in failures.items()}


def _wire(failures: Mapping[int, str]) -> dict[str, str]:
    return {str(r): m for r, m in failures.items()}


@dataclass(frozen=True)
class RankPlan:
    error: str | None
    tree: Any
    leaves: Mapping[str, Any]  # the plan cache's part: hash, digests, leaves or None
    step: int = -1  # the step this rank's save() was called with

    def to_json(self) -> dict[str, Any]:
        return {"error": self.error, "tree": self.tree, "step": self.step, **self.leaves}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RankPlan:
        rest = {k: v for k, v in doc.items() if k not in ("error", "tree", "step")}
        return cls(doc["error"], doc["tree"], rest, int(doc.get("step", -1)))


@dataclass(frozen=True)
class Assignment:
    failures: Mapping[int, str]
    save_id: str = ""
    prepared: tuple[int, ...] = ()
    writes: tuple[M.Ranges, ...] = ()
    known: list[str | None] | None = None  # the structure hash rank 0 holds for each rank
    cause: str = ""  # of a refusal: "" (a rank's state), STORAGE or RIVAL (see Outcome)
    base: int | None = None  # incremental: the base step (engine/incremental.py)
    base_id: str = ""  # incremental: the base's save id, as rank 0 read it

    def to_json(self) -> dict[str, Any]:
        return {"failures": _wire(self.failures), "save_id": self.save_id,
                "prepared": list(self.prepared),
                "writes": [[list(run) for run in w] for w in self.writes], "known": self.known,
                "cause": self.cause, "base": self.base, "base_id": self.base_id}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Assignment:
        base = doc.get("base")
        return cls(_ranks(doc["failures"]), doc["save_id"], tuple(doc["prepared"]),
                   tuple(tuple((a, b) for a, b in w) for w in doc["writes"]), doc["known"],
                   str(doc.get("cause", "")), int(base) if base is not None else None,
                   str(doc.get("base_id", "")))


@dataclass(frozen=True)
class FileEntry:
    """One shard file a rank wrote: its record, and the locations that hold it whole."""

    name: str
    nbytes: int
    header_offset: int
    header_xxh3: str
    stored_at: tuple[int, ...]


@dataclass(frozen=True)
class WriteReport:
    error: str | None = None
    files: tuple[FileEntry, ...] = ()
    loc_failures: Mapping[int, str] = field(default_factory=dict)
    refs: tuple[tuple[int, str, int], ...] = ()  # incremental: (step, file, bytes) referenced

    def to_json(self) -> dict[str, Any]:
        return {"error": self.error,
                "files": [[f.name, f.nbytes, f.header_offset, f.header_xxh3, list(f.stored_at)]
                          for f in self.files],
                "loc_failures": _wire(self.loc_failures), "refs": [list(r) for r in self.refs]}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> WriteReport:
        files = tuple(FileEntry(f[0], f[1], f[2], f[3], tuple(f[4])) for f in doc["files"])
        refs = tuple((int(s), str(f), int(n)) for s, f, n in doc.get("refs", ()))
        return cls(doc["error"], files, _ranks(doc["loc_failures"]), refs)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    failures: Mapping[int, str] = field(default_factory=dict)
    storage: bool = False  # the failure is the storage's (fewer than min_replicas locations)
    rival: bool = False  # another writer holds or committed the step (ConcurrentWriterError)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "failures": _wire(self.failures), "storage": self.storage,
                "rival": self.rival}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Outcome:
        return cls(bool(doc["ok"]), _ranks(doc["failures"]), bool(doc["storage"]),
                   bool(doc.get("rival", False)))


STORAGE, RIVAL = "storage", "rival"  # causes of a refused save (Assignment.cause)
