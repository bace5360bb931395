"""One rank's side of the node-local tier: its own process group, its node's location, and the
local save (own files, peer copies, then the node's ``manifest.json`` and ``holdings.json``).

Construction is collective over the tier's process group (every rank, in the same order as
every other manager construction): it creates the tier's private gloo group, all-gathers each
rank's node id into the :class:`~shardckpt.tier.placement.NodeMap`, and checks the placement.

A local save of step ``s`` (:meth:`LocalTierStore.save`), every rank of the tier's group:

1. each node's local rank 0 clears a leftover directory of step ``s`` on its node (a killed
   save's, or a step saved again after a resume from an older one);
2. the ordinary save protocol (:func:`shardckpt.engine.save.save_step`) runs against this
   rank's node location: every rank writes its own files under its node's path, durably;
   rank 0 builds the manifest of the whole step. Small replicated tensors (RNG streams) are
   written by every rank (:mod:`shardckpt.planning.localcopies`): a rank's own files hold all
   it reads back;
3. every rank gets the manifest and sends its files to one rank of each peer node
   (:mod:`shardckpt.engine.peer`, checked on arrival), and every rank reports what it received;
4. each node's local rank 0 writes the manifest, then ``holdings.json`` (the ranks whose files
   the node holds whole), both after the files are durable: the node's copy is then complete;
5. local retention: each node's local rank 0 keeps its newest ``keep`` complete steps; then
   every rank learns the outcome (after retention: what ``steps()`` lists is settled).

Any rank's failure in steps 1-4 fails the save on every rank (the previous local steps are
untouched). A peer copy that fails is left out of that node's holdings, with a warning: the step
then has fewer copies of that rank's files.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .. import knobs
from ..catalog import read_manifest
from ..engine.comm import make_comm
from ..engine.failures import describe, gather_failures, raise_failures
from ..engine.peer import Transfer, run_transfers
from ..engine.save import SaveOptions, SaveRequest, save_step
from ..errors import ShardckptError
from ..extras import RNG_KEY
from ..format import manifest as M
from ..format.shard import Codec
from ..planning.localcopies import SelfSufficientPlanCache
from ..storage import open_location, step_dirname
from .choice import NodeReport, StepReport
from .config import LocalTier
from .holdings import HOLDINGS_NAME, HeldFile, Holdings, check_holdings, read_holdings
from .placement import NodeMap, node_id, placement_warnings
from .retention import plan_local_retention

PEER_CHUNK = 4 << 20


class LocalTierStore:
    """The node-local tier of one rank (see the module). Collective construction."""

    def __init__(self, config: LocalTier, process_group: Any = None, *,
                 compression: str | None = None, file_mode: int | None = None) -> None:
        if not isinstance(config, LocalTier):
            raise TypeError("local must be a shardckpt.LocalTier")
        self.config = config
        self.comm = make_comm(process_group, knobs.COLLECTIVE_TIMEOUT_S.get())
        self.node = node_id(config.node)
        nodes = self.comm.all_gather_json(self.node, "local tier: gather node ids")
        self.node_map = NodeMap(tuple(nodes))
        for msg in placement_warnings(self.node_map, config.copies):
            if self.comm.rank == 0:
                warnings.warn(msg, stacklevel=3)
        self.location = open_location(config.path_for(self.node), file_mode=file_mode)
        self.is_leader = self.node_map.leader(self.node) == self.comm.rank
        self._codec = Codec(compression)
        # small replicated tensors (RNG streams) on every rank: its files suffice to restore it
        self._plan_cache = SelfSufficientPlanCache(always=(RNG_KEY,))
        self.last_save_profile: dict[str, float] = {}

    @property
    def rank(self) -> int:
        return self.comm.rank

    # ---------------------------------------------------------------------------------- save
    def save(self, step: int, state: dict[str, Any], *, metrics: Mapping[str, float] | None = None,
             tags: tuple[str, ...] = (), extra: Mapping[str, Any] | None = None,
             collected: Any = None) -> M.Manifest:
        """Collective: write ``step`` to the local tier (see the module). Returns the manifest.
        ``collected``: the state already flattened and snapshotted (or the error doing so
        raised), as :func:`~shardckpt.engine.save.save_step` takes it."""
        t0 = time.perf_counter()
        step_dir = step_dirname(step)
        error: BaseException | None = None
        if self.is_leader:
            try:
                self.location.remove_tree(step_dir)
            except Exception as exc:
                error = exc
        self._agree(step, "clearing the step directory", error)
        req = SaveRequest(step, dict(metrics or {}), tuple(tags),
                          {**(extra or {}), "tier": "local"})
        result = save_step(self.comm, [self.location], state, req,
                           replace(SaveOptions.from_knobs(self._codec), shared_location=False),
                           collected, 1, self._plan_cache)
        t1 = time.perf_counter()
        text = result.manifest and M.serialize(result.manifest).decode()
        text = self.comm.broadcast_json(text, "local save: share the manifest")
        manifest = M.parse(text.encode(), f"step {step} manifest from rank 0")
        names = {r: tuple(sorted(n for n, f in manifest.files.items() if f.rank == r))
                 for r in range(self.comm.world_size)}
        transfers = [Transfer(s, d, names[s]) for s, d in self.node_map.pushes(
            self.config.copies) if names[s]]
        report = run_transfers(getattr(self.comm, "group", None), self.rank, transfers, step_dir,
                               self.location, self.location, PEER_CHUNK)
        received = self.comm.all_gather_json(sorted(report.received), "local save: copies")
        for msg in report.errors:
            warnings.warn(f"local step {step}: a peer copy failed: {msg}", stacklevel=2)
        t2 = time.perf_counter()
        error = None
        if self.is_leader:
            try:
                self._commit_node(manifest, text.encode(), names, received)
            except Exception as exc:
                error = exc
            else:  # before the agreement: once save() returns, every rank sees the result
                self._retain(step)
        self._agree(step, "committing the node copies", error)
        self.last_save_profile = {"save": t1 - t0, "peer_copy": t2 - t1,
                                  "commit_nodes": time.perf_counter() - t2,
                                  "bytes_sent": float(report.bytes_sent),
                                  "bytes_received": float(report.bytes_received)}
        return manifest

    def _agree(self, step: int, what: str, error: BaseException | None) -> None:
        failures = gather_failures(self.comm, error, f"local save: {what}")
        if failures:
            raise_failures(f"local save of step {step} failed while {what}", failures, error,
                           self.comm.world_size)

    def _commit_node(self, manifest: M.Manifest, data: bytes,
                     names: Mapping[int, tuple[str, ...]], received: list[list[str]]) -> None:
        """This node's leader: the manifest, then the holdings, once the files are durable."""
        step_dir = step_dirname(manifest.step)
        held: dict[int, dict[str, HeldFile]] = {}
        for rank in self.node_map.held_by(self.node, self.config.copies):
            if self.node_map.nodes[rank] != self.node:  # a peer copy: did it arrive whole?
                got = set(received[self.node_map.receiver(rank, self.node)])
                if not set(names[rank]) <= got:
                    continue
            held[rank] = {n: HeldFile(manifest.files[n].nbytes, manifest.files[n].header_xxh3)
                          for n in names[rank]}
        loc = self.location
        loc.fsync_dir(step_dir)
        if loc.size(f"{step_dir}/{M.MANIFEST_NAME}") is None:  # rank 0 committed its own
            loc.write_atomic(f"{step_dir}/{M.MANIFEST_NAME}", data)
        holdings = Holdings(manifest.step, self.node, self.config.copies, self.node_map, held)
        loc.write_atomic(f"{step_dir}/{HOLDINGS_NAME}", holdings.to_bytes())
        loc.fsync_dir("")

    def _retain(self, current: int) -> None:
        """This node's leader: local retention; a failure warns, the save stands."""
        try:
            dirs = self.location.list_step_dirs()
            complete = [s for s, d in dirs.items()
                        if self.location.size(f"{d}/{HOLDINGS_NAME}") is not None]
            for step in plan_local_retention(complete, set(dirs) - set(complete),
                                             self.config.keep, busy=(current,)):
                # the holdings go first: a half-deleted step is never taken for complete
                self.location.remove(f"{dirs[step]}/{HOLDINGS_NAME}")
                self.location.remove_tree(dirs[step])
        except ShardckptError as exc:
            warnings.warn(f"local tier {self.location.display}: retention failed: "
                          f"{describe(exc)}", stacklevel=3)

    def drop_newer(self, step: int) -> None:
        """This node's leader, after a restore of ``step``: delete the local steps after it
        (``holdings.json`` first). A failure warns: the next saves replace them anyway."""
        try:
            for newer, step_dir in sorted(self.location.list_step_dirs().items()):
                if newer > step:
                    self.location.remove(f"{step_dir}/{HOLDINGS_NAME}")
                    self.location.remove_tree(step_dir)
        except ShardckptError as exc:
            warnings.warn(f"local tier {self.location.display}: could not delete the steps "
                          f"after {step}: {describe(exc)}", stacklevel=3)

    # --------------------------------------------------------------------------------- query
    def steps(self) -> list[int]:
        """This node's complete local steps, ascending (holdings and manifest both valid)."""
        return sorted(s.step for s in self.report().steps)

    def report(self) -> NodeReport:
        """What this node holds: for each local step, the ranks whose files check out here
        (sizes and headers against ``holdings.json``, which must agree with the manifest)."""
        steps: list[StepReport] = []
        unusable: dict[int, str] = {}
        for step, step_dir in sorted(self.location.list_step_dirs().items()):
            try:
                holdings = read_holdings(self.location, step_dir)
                manifest = read_manifest(self.location, step)
            except FileNotFoundError:
                unusable[step] = f"{self.location.display}/{step_dir}: incomplete"
                continue
            except ShardckptError as exc:
                unusable[step] = str(exc)
                continue
            problems: dict[int, str] = {}
            for rank, files in holdings.ranks.items():
                listed = {n: HeldFile(f.nbytes, f.header_xxh3)
                          for n, f in manifest.files.items() if f.rank == rank}
                if listed != dict(files):
                    problems[rank] = (f"{self.location.display}/{step_dir}/{HOLDINGS_NAME}: "
                                      f"rank {rank}'s files differ from the manifest's")
            for rank, why in check_holdings(self.location, holdings).items():
                if why is not None:
                    problems.setdefault(rank, why)
            valid = frozenset(holdings.ranks) - set(problems)
            steps.append(StepReport(step, holdings.node_map, valid, problems))
        return NodeReport(self.node, tuple(steps), unusable)
