"""``shardckpt verify``: integrity, completeness, reassembly, golden replay, environment drift.

Runs in one process (default), as a local job of ``--nproc K`` ranks it starts itself, or on
every rank of a job the user launched (torchrun / Slurm: ``RANK`` and ``WORLD_SIZE`` are set).
In a job only rank 0 prints; every rank exits with the same code.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from typing import Any

from ..errors import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    ShardckptError,
    VerificationError,
)
from .argtypes import step_arg
from .governance_cmd import finish_verify
from .progress import wanted

_EPILOG = """\
phases: integrity (every chunk checksum, spread over the ranks), completeness (every tensor
covered exactly once), reassembly (--model builds the model, sharded with FSDP2 at K > 1, and
loads it strictly), replay (golden batches, bitwise unless tolerances are given; all ranks must
agree), environment (provenance against this run; fails only with --strict-env).
The verdict is also written to ROOT/step-NNNNNNNNNN/verification.json (see 'shardckpt ls').

Only a verification that ran records a verdict: one whose --model does not fit the checkpoint
(missing or unexpected keys, other shapes) exits 64 and records nothing.

exit codes: 0 all checks passed; 1 replay mismatch or --strict-env drift; 2 corrupt, missing
or incomplete checkpoint (or unknown step); 64 usage error, also a --model that does not fit
the checkpoint (no verdict recorded); 70 internal error.
"""


def add_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG
    p.add_argument("root", metavar="ROOT", help="checkpoint root: a path or fsspec URL")
    p.add_argument("--step", type=step_arg, default=None, metavar="N",
                   help="step to verify (default: latest)")
    p.add_argument("--model", metavar="MOD:FN", default=None,
                   help="factory of the model: MOD a module or a .py file, FN() returns the "
                   "nn.Module; enables reassembly and golden replay")
    p.add_argument("--nproc", type=int, default=None, metavar="K",
                   help="ranks to verify with (default 1; under torchrun: its world size)")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance (default: "
                   "the one recorded with the golden batches)")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (default: "
                   "the one recorded)")
    p.add_argument("--strict-env", action="store_true",
                   help="fail when the environment differs from the save's provenance")
    p.add_argument("--no-record", action="store_true",
                   help="do not write verification.json next to the checkpoint")
    p.add_argument("--public-key", action="append", default=[], metavar="PUB.pem",
                   help="also check the step's signature with this public key (repeatable: "
                   "any one may have signed) and every file's SHA-256; exit 2 if the "
                   "signature is missing or fails, or a file differs")


def _check_args(args: argparse.Namespace, world: int | None) -> int:
    """Validate what can be checked without the checkpoint; returns the number of ranks."""
    from ..verify.model import FactoryError, parse_spec
    from .common import UsageError

    for flag in ("atol", "rtol"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{flag} must be a finite number >= 0, got {value}")
    if args.step is not None and args.step < 0:
        raise UsageError(f"--step must be >= 0, got {args.step}")
    if args.nproc is not None and args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    if world is not None and args.nproc not in (None, world):
        raise UsageError(f"--nproc {args.nproc} differs from the job's world size {world} "
                         "(under torchrun, leave --nproc out)")
    if args.model is not None:
        try:
            parse_spec(args.model)
        except FactoryError as exc:
            raise UsageError(str(exc)) from None
    from .common import open_locations

    # UsageError: cannot open, or no such root; one line for an unreachable replica
    open_locations([args.root, *args.replica], warn="verify")
    return world or args.nproc or 1


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line again, for the ranks of a relaunched job. ``--nproc`` is left out: the
    ranks take their world size from torchrun (whose parser would take it for an abbreviation
    of its own ``--nproc-per-node``)."""
    out = [args.root]
    for flag in ("step", "model", "atol", "rtol"):
        value = getattr(args, flag)
        if value is not None:
            out += [f"--{flag}", repr(value) if isinstance(value, float) else str(value)]
    for url in args.replica:
        out += ["--replica", url]
    for key in args.public_key:
        out += ["--public-key", key]
    out += [f for f, on in (("--strict-env", args.strict_env), ("--no-record", args.no_record),
                            ("--json", args.json)) if on]
    return out


def cmd_verify(args: argparse.Namespace) -> int:
    from ..verify import runner
    from .common import UsageError
    from .local_cmd import node_verify

    if (code := node_verify(args)) is not None:  # a node's local path (issue 28)
        return code
    job = runner.dist_env()
    world = job[1] if job is not None and job[1] > 1 else None
    nproc = _check_args(args, world)
    if world is None and nproc > 1:
        code, why = runner.relaunch(_argv(args), nproc)
        if why:
            print(f"shardckpt verify: {why}", file=sys.stderr)
        return code
    opts = runner.VerifyOptions(args.root, tuple(args.replica), args.step, args.model,
                                args.atol, args.rtol, args.strict_env, not args.no_record,
                                progress=wanted(args))
    if world is None:
        from ..verify.model import FactoryError

        try:
            result = runner.verify(opts)
        except FactoryError as exc:
            raise UsageError(str(exc)) from None
        return _report(finish_verify(args, result.to_json()), args.json)
    return _on_rank(args, opts)


def _on_rank(args: argparse.Namespace, opts: Any) -> int:
    """One rank of a job: errors become exit codes here, so that only rank 0 prints and, in a
    relaunched job, rank 0 can hand its code to the parent through the status file."""
    import torch.distributed as dist

    from ..verify import runner

    owned = runner.init_distributed()
    rank = dist.get_rank()
    try:
        comm = runner.make_verify_comm()
        result = runner.verify(opts, comm)
        code = _report(finish_verify(args, result.to_json()), args.json) if rank == 0 \
            else result.exit_code
    except Exception as exc:  # every rank maps it the same way; only rank 0 says it
        code, line = classify(exc)
        if rank == 0 or code == 70:
            if code == 70:
                traceback.print_exc()
            print(f"shardckpt verify: {'' if rank == 0 else f'rank {rank}: '}{line}",
                  file=sys.stderr)
    finally:
        if owned:
            dist.destroy_process_group()
    status = os.environ.get(runner.STATUS_ENV)
    if status:
        if rank == 0:
            with open(status, "w") as f:
                f.write(f"{code}\n")
        return 0  # the parent exits with rank 0's code; torchrun need not see failures
    return code


def classify(exc: BaseException) -> tuple[int, str]:
    """The exit code and one-line message for an error (as ``shardckpt.cli.main`` maps them)."""
    from ..verify.model import FactoryError
    from .common import UsageError

    if isinstance(exc, (UsageError, FactoryError)):
        return 64, str(exc)
    if isinstance(exc, VerificationError):
        return 1, f"verification failed: {exc}"
    if isinstance(exc, (CorruptCheckpointError, IncompleteCheckpointError, FileNotFoundError)):
        return 2, str(exc)
    if isinstance(exc, ShardckptError):
        return 70, f"{type(exc).__name__}: {exc}"
    return 70, f"internal error: {type(exc).__name__}: {exc}"


def _report(doc: dict[str, Any], as_json: bool) -> int:
    """Print the verdict (JSON or a table) on stdout, a one-line reason on stderr if failed."""
    from .common import emit

    if as_json:
        emit(doc)
    else:
        print(render(doc))
    if not doc["ok"]:
        failed = next(c for c in doc["checks"] if not c["ok"])
        print(f"shardckpt verify: step {doc['step']}: {failed['name']} failed: "
              f"{failed['detail']}"[:2000].replace("\n", " "), file=sys.stderr)
    elif doc.get("record_error"):
        print(f"shardckpt verify: could not write the verification record: "
              f"{doc['record_error']}", file=sys.stderr)
    return int(doc["exit_code"])


def render(doc: dict[str, Any]) -> str:
    lines = [f"step {doc['step']} of {doc['root']}: saved at world size "
             f"{doc['saved_world_size']}, verified on {doc['nproc']} "
             f"rank{'s' * (doc['nproc'] > 1)}", "", f"{'CHECK':<14}{'RESULT':<9}DETAIL"]
    for c in doc["checks"]:
        state = "skipped" if c["skipped"] else "ok" if c["ok"] else "FAILED"
        lines.append(f"{c['name']:<14}{state:<9}{c['detail']}")
        for b in c.get("batches", []):
            where = b.get("first_offending") or {}
            at = f"  first at {where.get('path')} (rank {where.get('rank')})" if where else ""
            lines.append(f"  batch {b['batch']:<6}{'ok' if b['ok'] else 'FAILED':<9}max abs "
                         f"{_num(b['max_abs'])}  max rel {_num(b['max_rel'])}{at}")
    verdict = "OK" if doc["ok"] else f"FAILED (exit {doc['exit_code']})"
    lines += ["", f"verdict: {verdict}"]
    return "\n".join(lines)


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)
