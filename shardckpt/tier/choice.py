"""Which step to restore: the newest one recoverable from either tier, as one pure function over
what the ranks report (like :mod:`shardckpt.policy.retention`: plain records in, a plan out; no
I/O, no clock, no torch).

Every rank reports its node's holdings (:class:`NodeReport`: for each local step on the node, the
ranks whose files verified there). :func:`plan_recovery` turns the reports of all ranks, the
job's current :class:`~shardckpt.tier.placement.NodeMap` and the persistent tier's valid steps
into a :class:`RecoveryPlan`: the candidates, best first, that every rank tries in the same
order (a failed restore falls back to the next one, on every rank together), and why each local
step that is not a candidate was skipped.

Rules:

* A local step is a candidate only if *every* rank's files verified on some node that reported
  it; no node is assumed to hold its own ranks' files. Each rank's files come from its own node
  when that node holds them, else from the holder that serves the fewest ranks so far (ties: the
  node order), so the transfers spread over the holders.
* A local step saved at another world size, or under another node→ranks map, is skipped, with
  the reason.
* Candidates are ordered by step, newest first; at the same step the local tier comes first
  (it is the faster to read). Persistent steps are taken as given (the caller lists the valid
  ones).
* Two ranks of the same node may report it differently (one failed to read a file): a rank's
  files count as held there only if every report of that node says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .placement import NodeMap

LOCAL = "local"
PERSISTENT = "persistent"


@dataclass(frozen=True)
class StepReport:
    """One local step on one node: the node map it was saved under, the ranks whose files
    verified there, and why the others it should hold did not."""

    step: int
    node_map: NodeMap
    valid: frozenset[int]
    problems: Mapping[int, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "nodes": self.node_map.to_json(), "valid": sorted(self.valid),
                "problems": {str(r): m for r, m in sorted(self.problems.items())}}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> StepReport:
        return cls(int(doc["step"]), NodeMap.from_json(doc["nodes"]),
                   frozenset(int(r) for r in doc["valid"]),
                   {int(r): str(m) for r, m in doc["problems"].items()})


@dataclass(frozen=True)
class NodeReport:
    """What one rank found on its node's local path (a step whose ``holdings.json`` is missing
    or corrupt appears in ``unusable`` with the reason)."""

    node: str
    steps: tuple[StepReport, ...] = ()
    unusable: Mapping[int, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "steps": [s.to_json() for s in self.steps],
                "unusable": {str(s): m for s, m in sorted(self.unusable.items())}}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> NodeReport:
        return cls(str(doc["node"]), tuple(StepReport.from_json(s) for s in doc["steps"]),
                   {int(s): str(m) for s, m in doc["unusable"].items()})


@dataclass(frozen=True)
class Candidate:
    """A step to try. For the local tier, ``sources[r]`` is the node that provides rank
    ``r``'s files."""

    tier: str
    step: int
    sources: tuple[str, ...] = ()

    def receivers(self, node_map: NodeMap) -> tuple[int, ...]:
        """The ranks whose files come from another node than their own."""
        return tuple(r for r, src in enumerate(self.sources) if src != node_map.nodes[r])

    def to_json(self) -> dict[str, Any]:
        return {"tier": self.tier, "step": self.step, "sources": list(self.sources)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Candidate:
        return cls(str(doc["tier"]), int(doc["step"]), tuple(str(s) for s in doc["sources"]))


@dataclass(frozen=True)
class RecoveryPlan:
    candidates: tuple[Candidate, ...]
    skipped: Mapping[int, str]  # local step -> why it is not a candidate

    def why_not_newer(self, chosen: Candidate) -> list[str]:
        """Why each local step newer than ``chosen`` was skipped, newest first."""
        return [f"local step {s}: {m}" for s, m in sorted(self.skipped.items(), reverse=True)
                if s > chosen.step]


def _merge(reports: Iterable[NodeReport]) -> dict[str, dict[int, StepReport | str]]:
    """node -> step -> its merged report (or why it is unusable)."""
    out: dict[str, dict[int, StepReport | str]] = {}
    for rep in reports:
        steps = out.setdefault(rep.node, {})
        for step, why in rep.unusable.items():
            steps[step] = why
        for s in rep.steps:
            prev = steps.get(s.step)
            if isinstance(prev, str):
                continue
            if prev is None:
                steps[s.step] = s
            elif prev.node_map != s.node_map:
                steps[s.step] = f"node {rep.node}'s ranks disagree on its node map"
            else:
                problems = {**s.problems, **prev.problems}
                steps[s.step] = StepReport(s.step, s.node_map, prev.valid & s.valid, problems)
    return out


def _local_candidate(step: int, per_node: Mapping[str, StepReport | str],
                     current: NodeMap) -> Candidate | str:
    reports = {n: r for n, r in per_node.items() if isinstance(r, StepReport)}
    maps = {r.node_map for r in reports.values()}
    if len(maps) > 1:
        return "the nodes recorded different node maps"
    if maps:
        saved = maps.pop()
        if saved.world_size != current.world_size:
            return (f"saved at world size {saved.world_size}, this job has "
                    f"{current.world_size}")
        if saved != current:
            return (f"saved under another node->ranks map ({saved.to_json()}, now "
                    f"{current.to_json()})")
    holders: dict[int, list[str]] = {}
    for rank in range(current.world_size):
        holders[rank] = [n for n in current.order if n in reports and rank in reports[n].valid]
        if not holders[rank]:
            why = [f"node {n}: {r.problems[rank]}" for n, r in sorted(reports.items())
                   if rank in r.problems]
            why += [f"node {n}: {m}" for n, m in sorted(per_node.items()) if isinstance(m, str)]
            return f"rank {rank}'s files are on no live node" + (
                " (" + "; ".join(why) + ")" if why else "")
    # a rank's own node first (no transfer); the others from the least busy holder
    sources = {r: current.nodes[r] for r in holders if current.nodes[r] in holders[r]}
    load: dict[str, int] = {}
    for src in sources.values():
        load[src] = load.get(src, 0) + 1
    for rank in sorted(set(holders) - set(sources)):
        src = min(holders[rank], key=lambda n: (load.get(n, 0), current.order.index(n)))
        load[src] = load.get(src, 0) + 1
        sources[rank] = src
    return Candidate(LOCAL, step, tuple(sources[r] for r in range(current.world_size)))


def plan_recovery(reports: Iterable[NodeReport], current: NodeMap,
                  persistent_steps: Sequence[int] = ()) -> RecoveryPlan:
    """The candidates to restore from, best first, and why the other local steps were skipped
    (see the module for the rules). Every rank computes the same plan from the same reports."""
    merged = _merge(reports)
    steps = sorted({s for per in merged.values() for s in per}, reverse=True)
    candidates: list[Candidate] = []
    skipped: dict[int, str] = {}
    for step in steps:
        per_node = {n: per[step] for n, per in merged.items() if step in per}
        found = _local_candidate(step, per_node, current)
        if isinstance(found, Candidate):
            candidates.append(found)
        else:
            skipped[step] = found
    candidates += [Candidate(PERSISTENT, s) for s in sorted(set(persistent_steps))]
    candidates.sort(key=lambda c: (-c.step, c.tier != LOCAL))
    return RecoveryPlan(tuple(candidates), skipped)
