"""The verifier's phases that need no model: integrity, completeness, environment drift.

Each returns a :class:`Check`. :func:`integrity` is collective (every rank of ``comm`` calls it
and gets the same result); the others are pure functions of their arguments.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..catalog import read_manifest
from ..engine.index import full_manifest
from ..engine.reader import CheckpointReader
from ..errors import (
    EXIT_INTEGRITY,
    EXIT_MISMATCH,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StorageError,
)
from ..format import manifest as M
from ..format.refs import depends_on
from ..refcheck import referenced_todo, untrusted_targets
from ..repair import verify_file
from ..storage import Location, step_dirname


@dataclass
class Check:
    """One line of the verdict. ``code`` is the exit code this check causes when it fails."""

    name: str
    ok: bool
    detail: str
    skipped: bool = False
    code: int = EXIT_MISMATCH
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail,
                "skipped": self.skipped, **self.data}


def skipped(name: str, why: str) -> Check:
    return Check(name, True, f"skipped: {why}", skipped=True)


def integrity(locations: Sequence[Location], step: int, manifest: M.Manifest, comm: Any,
              tick: Callable[[], None] = lambda: None) -> Check:
    """Collective. Every shard file has a good copy (size, header, every chunk checksum) in at
    least one location. File ``i`` (sorted by name) is read by rank ``i % world_size``."""
    names = sorted(manifest.files)
    bad: list[dict[str, str]] = []
    degraded: list[dict[str, str]] = []
    # incremental: the files of earlier steps it references are checked as its own
    referenced = referenced_todo(locations, manifest)
    todo = [(step, name, manifest, None) for name in names] + referenced
    for s, name, m, only in todo[comm.rank::comm.world_size]:
        step_dir = step_dirname(s)
        problems = [_verify_file(loc, s, m, name, only) for loc in locations]
        named = [p if p is None or name in p else f"{loc.display}/{step_dir}/{name}: {p}"
                 for loc, p in zip(locations, problems)]
        name = name if s == step else f"{step_dir}/{name}"
        if all(p is not None for p in named):
            bad.append({"file": name, "problem": str(named[0])})
        else:
            degraded += [{"location": loc.display, "file": name, "problem": p}
                         for loc, p in zip(locations, named) if p is not None]
        tick()
    if comm.rank == 0:
        for loc in locations:  # a replica without a valid manifest cannot serve as a fallback
            try:
                read_manifest(loc, step)
            except (CorruptCheckpointError, IncompleteCheckpointError, StorageError) as exc:
                degraded.append({"location": loc.display, "file": M.MANIFEST_NAME,
                                 "problem": str(exc)})
    parts = comm.all_gather_json({"bad": bad, "degraded": degraded}, "verify: integrity")
    bad = sorted((b for p in parts for b in p["bad"]), key=lambda b: b["file"])
    degraded = [d for p in parts for d in p["degraded"]]
    where = f"{len(locations)} location{'s' * (len(locations) > 1)}"
    data = {"files": len(names), "referenced_files": len(referenced),
            "files_checked": len(todo), "nbytes": manifest.nbytes, "bad_files": bad,
            "degraded": degraded, "depends_on": depends_on(manifest.extra, step)}
    files = f"{len(todo)} files"
    if referenced:  # incremental: its own files and those of earlier steps it references
        files += f" ({len(names)} of its own, {len(referenced)} referenced from step(s) " \
                 f"{data['depends_on']})"
    untrusted = untrusted_targets(locations, manifest) if bad and comm.rank == 0 else {}
    if bad and comm.world_size > 1:  # ``bad`` is alike on every rank: all or none ask
        untrusted = {int(k): v for k, v in comm.broadcast_json(
            {str(k): v for k, v in untrusted.items()}, "verify: untrusted references").items()}
    if untrusted:  # the data may be intact: the references to those steps cannot be trusted
        data["untrusted_references"] = [{"step": s, "problem": p} for s, p in untrusted.items()]
        first = next(iter(untrusted.items()))
        also = f" (and step(s) {sorted(untrusted)[1:]})" if len(untrusted) > 1 else ""
        return Check("integrity", False, f"step {step} references step {first[0]}, which has "
                     f"no valid manifest at any location ({first[1]}){also}: no reference to "
                     f"it can be trusted, so {len(bad)} of {files} could not be checked (their "
                     f"bytes may be intact) and the step cannot load; `shardckpt repair` from a "
                     f"replica holding a valid manifest of step {first[0]} restores it "
                     f"({', '.join(b['file'] for b in bad)})", code=EXIT_INTEGRITY, data=data)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        own = sum(1 for b in bad if "/" not in b["file"])
        others = sorted({int(b["file"].split("/")[0][5:]) for b in bad if "/" in b["file"]})
        held = ", ".join([f"{own} of step {step}'s own"] * bool(own) + [
            f"{len(bad) - own} of step{'s' * (len(others) > 1)} "
            f"{', '.join(map(str, others))}"] * bool(others))
        return Check("integrity", False, f"{len(bad)} of {files} have no good copy: "
                     f"{bad[0]['problem']}{more}; without a good copy: {held} "
                     f"({', '.join(b['file'] for b in bad)})", code=EXIT_INTEGRITY, data=data)
    detail = f"{files}, each with a good copy (every chunk checksum checked at " \
             f"{where}, read by {comm.world_size} rank{'s' * (comm.world_size > 1)})"
    if degraded:
        n = len(degraded)
        detail += f"; {n} damaged cop{'ies' if n > 1 else 'y'} elsewhere (shardckpt repair " \
                  f"can fix): {degraded[0]['problem']}"
    return Check("integrity", True, detail, data=data)


def _verify_file(location: Location, step: int, manifest: M.Manifest, name: str,
                 only: set[int] | None = None) -> str | None:
    try:
        return verify_file(location, step, manifest, name, only)
    except Exception as exc:  # never leave the peers waiting in the gather below
        return f"cannot be checked: {type(exc).__name__}: {exc}"


def tree_refs(node: Any) -> Iterator[str]:
    """Every tensor key the state tree refers to (see :mod:`shardckpt.planning.tree`)."""
    if not isinstance(node, list) or len(node) != 2 or not isinstance(node[0], str):
        return
    tag, body = node
    if tag == "T" and isinstance(body, str):
        yield body
    elif tag == "d" and isinstance(body, dict):
        for child in body.values():
            yield from tree_refs(child)
    elif tag in ("l", "t", "R") and isinstance(body, list):
        for child in body:
            yield from tree_refs(child)
    elif tag in ("D", "P") and isinstance(body, list):
        for item in body:
            if isinstance(item, list) and len(item) == 2:
                yield from tree_refs(item[1])
    elif tag in ("M", "O", "S"):
        yield from tree_refs(body)


def completeness(locations: Sequence[Location], step: int, manifest: M.Manifest) -> Check:
    """Every tensor's pieces (read from the headers of all shard files) tile its global shape
    exactly once; every alias and every tensor reference of the state tree resolves."""
    problems: list[str] = []
    try:
        manifest = full_manifest(CheckpointReader(locations, step_dirname(step), manifest))
    except (IncompleteCheckpointError, CorruptCheckpointError, StorageError) as exc:
        problems.append(str(exc))
    for key, entry in manifest.tensors.items():
        if entry.alias_of is not None:
            target = manifest.tensors.get(entry.alias_of)
            if target is None or target.alias_of is not None:
                problems.append(f"tensor {key!r}: alias of {entry.alias_of!r}, not a tensor")
            continue
        metas = entry.per_rank if entry.per_rank is not None else (entry.meta,)
        for r, meta in enumerate(metas):
            if meta is None and entry.per_rank is not None:
                continue  # rank r did not hold this key (rank-local state)
            if meta is None:
                problems.append(f"tensor {key!r}: no metadata")
                continue
            where = f"tensor {key!r}" + (f" rank {r}" if entry.per_rank is not None else "")
            if not manifest.indexed:
                continue
            try:
                M.check_coverage(meta, where)
            except (IncompleteCheckpointError, CorruptCheckpointError) as exc:
                problems.append(str(exc))
    refs = set(tree_refs(manifest.tree))
    problems += [f"the state tree refers to tensor {k!r}, which the manifest does not list"
                 for k in sorted(refs - set(manifest.tensors))]
    data = {"tensors": len(manifest.tensors), "tree_references": len(refs),
            "problems": problems[:50]}
    if problems:
        return Check("completeness", False, f"{len(problems)} problems: {problems[0]}",
                     code=EXIT_INTEGRITY, data=data)
    return Check("completeness", True, f"{len(manifest.tensors)} tensors covered exactly once, "
                 f"{len(refs)} tree references resolved", data=data)


def current_environment(hostnames: Sequence[str], world_size: int) -> dict[str, Any]:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "world_size": world_size,
            "hostnames": sorted(set(hostnames))}


def saved_environment(provenance: Any, world_size: int) -> dict[str, Any] | None:
    """The comparable facts of a provenance record (a dict, or a list of per-rank dicts)."""
    records = provenance if isinstance(provenance, list) else [provenance]
    records = [r for r in records if isinstance(r, dict)]
    if not records:
        return None
    first = records[0]

    def sub(key: str, name: str) -> Any:
        value = first.get(key)
        return value.get(name) if isinstance(value, dict) else None

    python = sub("python", "version")
    hosts: set[str] = set()
    for rec in records:
        for h in rec.get("hosts") or [rec.get("host")]:
            name = h.get("hostname") if isinstance(h, dict) else h
            if isinstance(name, str):
                hosts.add(name)
    return {"torch": sub("torch", "version"), "cuda": sub("torch", "cuda"),
            "python": python.split()[0] if isinstance(python, str) and python else None,
            "world_size": first.get("world_size", world_size), "hostnames": sorted(hosts)}


def environment(manifest: M.Manifest, current: dict[str, Any], strict: bool) -> Check:
    """Provenance of the save against this run's environment; fails only when ``strict``."""
    saved = saved_environment(manifest.extra.get("provenance"), manifest.world_size)
    data: dict[str, Any] = {"saved": saved, "current": current, "strict": strict}
    if saved is None:
        detail = "no provenance recorded"
        if strict:
            return Check("environment", False, f"{detail}: --strict-env has nothing to compare "
                         "against", data={**data, "drift": []})
        return Check("environment", True, detail, data={**data, "drift": []})
    drift = [f"{k}: saved {saved[k]}, now {current[k]}" for k in
             ("torch", "python", "cuda", "world_size", "hostnames")
             if saved.get(k) not in (None, []) and saved.get(k) != current.get(k)]
    data["drift"] = drift
    if not drift:
        return Check("environment", True, "same torch, python, cuda, world size and hosts as "
                     "the save", data=data)
    detail = "; ".join(drift)
    if strict:
        return Check("environment", False, f"drift (--strict-env): {detail}", data=data)
    return Check("environment", True, f"drift (reported only): {detail}", data=data)
