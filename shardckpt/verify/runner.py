"""Orchestration of ``shardckpt verify``: phases in order, on one rank or on every rank of a job.

:func:`verify` is collective when given a multi-rank comm: every rank calls it with the same
options and gets the same :class:`VerifyResult`; only rank 0 writes the verification record.
:func:`relaunch` starts a local ``torchrun`` job of ``K`` ranks running the same command and
returns rank 0's exit code (rank 0 writes it to the file named by :data:`STATUS_ENV`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from .. import knobs
from ..catalog import find_manifest, survey
from ..consolidate import read_value
from ..engine.comm import LocalComm, make_comm
from ..errors import IncompleteCheckpointError, ShardckptError, StorageError
from ..golden import GOLDEN_KEY
from ..storage import open_location
from ..storage.probe import reachable_all
from . import phases
from .model import FactoryError, load_factory, reassemble
from .progress import Progress
from .record import write_record
from .replay import merge, replay

STATUS_ENV = "SHARDCKPT_VERIFY_STATUS"


@dataclass(frozen=True)
class VerifyOptions:
    root: str
    replicas: tuple[str, ...] = ()
    step: int | None = None
    model: str | None = None
    atol: float | None = None
    rtol: float | None = None
    strict_env: bool = False
    record: bool = True
    progress: bool = False


@dataclass
class VerifyResult:
    step: int
    checks: list[phases.Check]
    nproc: int
    saved_world_size: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def exit_code(self) -> int:
        """0 when every check passed, else the most severe failing check's code (2 over 1)."""
        return max((c.code for c in self.checks if not c.ok), default=0)

    def to_json(self) -> dict[str, Any]:
        replay_check = next((c for c in self.checks if c.name == "replay"), None)
        return {"step": self.step, "ok": self.ok, "checks": [c.to_json() for c in self.checks],
                "exit_code": self.exit_code, "nproc": self.nproc,
                "saved_world_size": self.saved_world_size,
                "first_offending": replay_check.data.get("first_offending")
                if replay_check else None, **self.extra}


# ------------------------------------------------------------------------------ distributed
def dist_env() -> tuple[int, int] | None:
    """(rank, world size) of a torchrun or Slurm launch (Slurm needs MASTER_ADDR/PORT), else
    None. Sets RANK/WORLD_SIZE/LOCAL_RANK from Slurm's variables when only those are there."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if all(k in env for k in ("SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR", "MASTER_PORT")):
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    return None


def init_distributed() -> bool:
    """Join the job's default process group (nccl with CUDA, else gloo) unless already in one.
    Returns True when this call created it (the caller destroys it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    timeout = timedelta(seconds=knobs.COLLECTIVE_TIMEOUT_S.get())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return True


def make_verify_comm() -> Any:
    return make_comm(None, knobs.COLLECTIVE_TIMEOUT_S.get())


def agree(comm: Any, fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn`` on every rank; if it raised on any rank, raise on all (the first failing rank's
    error, as a FactoryError or ShardckptError), so that no rank walks into a collective alone."""
    try:
        value, error = fn(), None
    except Exception as exc:
        value, error = None, exc
    if comm.world_size > 1:
        outcome = None if error is None else [type(error).__name__, str(error)]
        failures = [(r, o) for r, o in enumerate(comm.all_gather_json(outcome, what)) if o]
        if failures and error is None:
            rank, (kind, message) = failures[0]
            cls = {"FactoryError": FactoryError, "IncompleteCheckpointError":
                   IncompleteCheckpointError}.get(kind, ShardckptError)
            error = cls(f"{message} (on rank {rank})")
    if error is not None:
        raise error
    return value


def _pick_step(locations: Sequence[Any], step: int | None, comm: Any) -> int:
    if step is None:  # the newest with a manifest: a corrupt newest one fails verification
        step = survey(locations, probe=False).latest_manifest()
        if comm.world_size > 1:  # a save may commit meanwhile: rank 0 decides
            step = comm.broadcast_json(step, "verify: agree on step")
        if step is None:
            raise IncompleteCheckpointError(f"{locations[0].display}: no committed checkpoint "
                                            "to verify")
    return step


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _golden_spec(manifest: Any) -> dict[str, Any] | None:
    spec = manifest.extra.get("golden")
    return spec if isinstance(spec, dict) and isinstance(spec.get("module"), str) else None


def verify(opts: VerifyOptions, comm: Any = None) -> VerifyResult:
    """Run every phase; collective over ``comm`` (default: a single process)."""
    comm = comm or LocalComm()
    locations = reachable_all([open_location(u) for u in (opts.root, *opts.replicas)])
    factory = load_factory(opts.model) if opts.model else None  # usage errors before any I/O
    step = _pick_step(locations, opts.step, comm)
    manifest, _ = find_manifest(locations, step)
    progress = Progress(opts.progress and comm.rank == 0)
    checks: list[phases.Check] = []
    names = len(manifest.files)
    share = len(range(comm.rank, names, comm.world_size))
    try:
        tick = progress.start("integrity", share)
        checks.append(phases.integrity(locations, step, manifest, comm, tick))
        checks.append(phases.completeness(locations, step, manifest))
        checks += _model_phases(opts, locations, step, manifest, factory, comm, progress,
                                sound=all(c.ok for c in checks))
    finally:
        progress.clear()
    hosts = comm.all_gather_json(socket.gethostname(), "verify: hosts")
    checks.append(phases.environment(
        manifest, phases.current_environment(hosts, comm.world_size), opts.strict_env))
    result = VerifyResult(step, checks, comm.world_size, manifest.world_size,
                          {"root": locations[0].display, "save_id": manifest.save_id,
                           "model": opts.model})
    if opts.record and comm.rank == 0:
        doc = result.to_json()
        try:
            result.extra["record"] = write_record(locations[0], manifest, doc, opts.model)
        except (StorageError, OSError, ValueError) as exc:
            result.extra["record_error"] = f"{type(exc).__name__}: {exc}"
    return result


def _read_golden(locations: Sequence[Any], step: int, batches: Any) -> dict[str, Any]:
    try:
        golden = read_value(locations, step, GOLDEN_KEY)
    except KeyError:
        raise IncompleteCheckpointError(f"step {step}: the manifest has a golden spec but the "
                                        f"state has no {GOLDEN_KEY!r}") from None
    if not isinstance(golden, dict) or not isinstance(golden.get("inputs"), list) or \
            not isinstance(golden.get("outputs"), list) or \
            len(golden["inputs"]) != len(golden["outputs"]):
        raise IncompleteCheckpointError(f"step {step}: malformed {GOLDEN_KEY!r} (needs lists "
                                        "'inputs' and 'outputs' of the same length)")
    if type(batches) is int and batches != len(golden["inputs"]):
        raise IncompleteCheckpointError(f"step {step}: the golden spec lists {batches} batches, "
                                        f"the checkpoint holds {len(golden['inputs'])}")
    return golden


def _model_phases(opts: VerifyOptions, locations: Sequence[Any], step: int, manifest: Any,
                  factory: Any, comm: Any, progress: Progress,
                  sound: bool) -> list[phases.Check]:
    spec = _golden_spec(manifest)
    if factory is None:
        why = "no --model MOD:FN given"
        return [phases.skipped("reassembly", why), phases.skipped("replay", why)]
    if not sound:
        why = "the checkpoint failed integrity/completeness"
        return [phases.skipped("reassembly", why), phases.skipped("replay", why)]
    module = spec["module"] if spec else "model"
    top = manifest.tree[1] if isinstance(manifest.tree, list) and len(manifest.tree) == 2 \
        and isinstance(manifest.tree[1], dict) else {}
    if module not in top and spec is None:
        why = "no golden batches recorded and no top-level 'model' to load the model from"
        return [phases.skipped("reassembly", why), phases.skipped("replay", why)]
    if module not in top:
        return [phases.Check("reassembly", False, f"the checkpoint has no top-level "
                             f"{module!r} to load the model from", code=phases.EXIT_INTEGRITY),
                phases.skipped("replay", f"no {module!r} in the checkpoint")]
    device = _device()
    progress.start("reassembly", 1)
    check, model = reassemble(factory, opts.model or "", module, opts.root, opts.replicas,
                              step, comm.world_size, device,
                              lambda fn, what: agree(comm, fn, what))
    if model is None:
        return [check, phases.skipped("replay", "the model could not be loaded")]
    if spec is None:
        return [check, phases.skipped("replay", "the checkpoint records no golden batches "
                                      "(save it with golden=shardckpt.Golden(...))")]
    golden = agree(comm, lambda: _read_golden(locations, step, spec.get("batches")),
                   "verify: read golden")
    atol = float(spec.get("atol", 0.0)) if opts.atol is None else opts.atol
    rtol = float(spec.get("rtol", 0.0)) if opts.rtol is None else opts.rtol
    inputs, outputs = golden["inputs"], golden["outputs"]
    tick = progress.start("replay", len(inputs))
    mine = agree(comm, lambda: replay(model, inputs, outputs, atol, rtol, device, tick),
                 "verify: replay outcome")
    everyone = comm.all_gather_json(mine, "verify: replay") if comm.world_size > 1 else [mine]
    result = merge(everyone, atol, rtol)
    result.data["device"] = str(device)
    return [check, result]


# ------------------------------------------------------------------------------ relaunch
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relaunch(argv: Sequence[str], nproc: int) -> tuple[int, str]:
    """Run ``python -m shardckpt verify *argv`` as a local ``nproc``-rank torchrun job with
    inherited stdout/stderr. Returns (rank 0's exit code, "") or (70, why) when the job ended
    without rank 0 reporting one."""
    with tempfile.TemporaryDirectory(prefix="shardckpt-verify-") as tmp:
        status = os.path.join(tmp, "status")
        env = {**os.environ, STATUS_ENV: status}
        env.setdefault("OMP_NUM_THREADS", "1")  # what torchrun would set (and warn about)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", uuid.uuid4().hex,
               "--local-addr", "127.0.0.1", "--max-restarts", "0",
               "-m", "shardckpt", "verify", *argv]
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        try:
            rc = proc.wait()
        except BaseException:
            proc.terminate()  # torchrun stops its workers on SIGTERM
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        try:
            with open(status) as f:
                return int(f.read().strip()), ""
        except (OSError, ValueError):
            return 70, f"the {nproc}-rank verification job exited with code {rc} before " \
                       "rank 0 reported a result"
