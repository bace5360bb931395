"""Run test code in several real processes: one per rank, or a whole ``torchrun`` job.

``run_ranks(fn, world_size, ...)`` starts ``world_size`` fresh processes (multiprocessing
"spawn"; within :func:`start_method` ``"forkserver"``, each rank a fork of a fresh interpreter
that has torch and shardckpt imported already, in a fraction of the time: what the suite uses,
see ``tests/conftest.py``), gives each the usual torchrun environment, optionally joins them
into a default process group, and calls ``fn(rank, world_size, *args, **kwargs)`` in each. It
returns the per-rank return values in rank order, or raises:

* ``RankFailures`` when a rank raised or its process died without reporting a result;
* ``RankTimeout`` when some ranks were still running at the deadline (and none failed).

Either way, every process it started (and everything those started) has been killed and reaped
before it returns or raises, also when the caller is interrupted.

Results come back as JSON through a pipe, never as a pickle, so ``fn`` must return a
JSON-serialisable value (tuples come back as lists, dict keys as strings). ``fn`` itself must be
importable by the children: a module-level function of a module on ``sys.path``, e.g. a helper
module in ``tests/`` (pytest puts ``tests/`` on ``sys.path`` because it has no ``__init__.py``;
spawned children start with the parent's ``sys.path``, and ``PYTHONPATH`` of each rank, and of
``run_torchrun`` jobs, also names the ``tests`` directory so that their own subprocesses can import
test helpers).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "FAILURE_GRACE_S",
    "TESTS_DIR",
    "RankFailures",
    "RankTimeout",
    "free_port",
    "run_ranks",
    "run_torchrun",
    "start_method",
]

TESTS_DIR = Path(__file__).resolve().parent

#: After the first rank fails, the other ranks get this many seconds to finish (typically they
#: fail too, e.g. when a peer of a collective disappears) before they are killed.
FAILURE_GRACE_S = 5.0
START_WAIT_S = 300.0  # the most a start-up may take where a timeout counts from it

#: What the fork server imports once, before it forks any rank.
PRELOAD = ("torch", "torch.distributed", "torch.distributed.tensor", "shardckpt",
           "shardckpt.manager")
_method = ["spawn"]


@contextlib.contextmanager
def start_method(method: str, preload: Sequence[str] = PRELOAD) -> Iterator[None]:
    """Within this context ``run_ranks`` starts ranks with ``method`` ("spawn" or
    "forkserver"). Each rank is a new process either way, with the environment of this process
    at the call (plus the rank's), its own session, process group and reaping; "forkserver"
    forks it from one server per test process, a fresh interpreter (not a fork of pytest) that
    imported ``preload`` when it started, so that a rank starts in a tenth of the time."""
    if method not in ("spawn", "forkserver"):
        raise ValueError(f"start method must be 'spawn' or 'forkserver', got {method!r}")
    if method == "forkserver":
        multiprocessing.get_context("forkserver").set_forkserver_preload(list(preload))
    real, _method[0] = _method[0], method
    try:
        yield
    finally:
        _method[0] = real


class RankFailures(AssertionError):
    """One or more ranks raised, or died without reporting a result.

    ``failures`` maps each failed rank to ``"ExcType: message"``; ``tracebacks`` maps the ranks
    that raised to their formatted tracebacks. Ranks killed because they were still running
    after another rank failed appear in ``failures`` as ``"Killed: ..."``.
    """

    def __init__(self, message: str, failures: dict[int, str], tracebacks: dict[int, str]):
        super().__init__(message)
        self.failures = failures
        self.tracebacks = tracebacks


class RankTimeout(AssertionError):
    """Some ranks (``unfinished``) did not finish before the deadline and were killed.

    ``finished`` lists the ranks whose processes had exited by then. For ``run_torchrun`` the
    job's ranks cannot be told apart: all of them are listed as unfinished, and ``stdout`` /
    ``stderr`` hold what the job printed before it was killed.
    """

    def __init__(
        self,
        message: str,
        unfinished: Sequence[int],
        finished: Sequence[int],
        stdout: str = "",
        stderr: str = "",
    ):
        super().__init__(message)
        self.unfinished = list(unfinished)
        self.finished = list(finished)
        self.stdout = stdout
        self.stderr = stderr


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it).

    The port is released before returning, so another process could grab it in between;
    that race is accepted in tests.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pythonpath(existing: str | None) -> str:
    """``existing`` PYTHONPATH with the tests directory in front (once)."""
    parts = [str(TESTS_DIR)] + [p for p in (existing or "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


def _rank_main(
    conn: Connection,
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    env: dict[str, str],
    init_pg: bool,
    backend: str,
    pg_timeout_s: float,
) -> None:
    """Body of one rank's process: set up, call ``fn``, send one JSON report through ``conn``."""
    # Own session and process group: the parent can then kill this rank and everything it starts
    # with one killpg, and a Ctrl-C at the terminal reaches only the parent.
    os.setsid()
    os.environ.clear()  # a forked rank starts with its server's environment: replace it all
    os.environ.update(env)
    try:
        import torch
        import torch.distributed as dist

        threads = os.environ.get("OMP_NUM_THREADS", "1")  # as torchrun: ranks share a few cores
        torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else 1)
        if init_pg:
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=pg_timeout_s),
            )
        result = fn(rank, world_size, *args, **kwargs)
        if init_pg:
            dist.destroy_process_group()
        try:
            payload = json.dumps({"ok": True, "result": result})
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"run_ranks: {fn.__qualname__} returned a value that is not JSON-serialisable "
                f"on rank {rank}: {exc}"
            ) from exc
    except BaseException as exc:
        payload = json.dumps(
            {
                "ok": False,
                "type": type(exc).__name__,
                "message": str(exc),
                "traceback": traceback.format_exc(),
            }
        )
    conn.send_bytes(payload.encode("utf-8"))
    conn.close()


def _kill_tree(pid: int) -> None:
    """SIGKILL process ``pid`` (not yet reaped by us), its process group and its descendants."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    try:
        if os.getpgid(pid) == pid:  # the rank got as far as os.setsid()
            os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in descendants:  # also those that left the group (e.g. start_new_session)
        try:
            proc.kill()
        except psutil.Error:
            pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    env: Mapping[str, str] | None = None,
    init_pg: bool = True,
    timeout_from: Callable[[], bool] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` in ``world_size`` fresh processes.

    Each rank gets MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, PYTHONPATH (tests dir first) and then ``env``. With ``init_pg`` it calls
    ``init_process_group(backend, ...)`` before ``fn`` and ``destroy_process_group()`` after it;
    the process-group timeout is ``2 * timeout``, so a hung collective shows up as
    ``RankTimeout`` (which names the stuck ranks) rather than as an error on one rank. Pass
    ``init_pg=False`` and initialise inside ``fn`` to test process-group timeouts themselves.

    Returns the ranks' return values (decoded from JSON) in rank order. Raises ``RankFailures``
    if any rank raised or died without a report (ranks still running ``FAILURE_GRACE_S`` seconds
    after the first failure are killed and listed too), else ``RankTimeout`` if some rank had
    not finished ``timeout`` seconds after the start. No process started here outlives the call.

    ``timeout_from``: the ``timeout`` counts from the first moment this returns true (checked
    every 50 ms; the ranks have up to ``START_WAIT_S`` to get there), not from the start: a test
    of what a timeout does need not race the ranks' start-up on a loaded machine.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = multiprocessing.get_context(_method[0])
    port = free_port()
    procs: list[Any] = []
    readers: dict[Connection, int] = {}
    sentinels: dict[int, int] = {}
    reports: dict[int, dict[str, Any]] = {}
    exited: set[int] = set()
    exitcodes: dict[int, int | None] = {}
    first_failure: tuple[float, int] | None = None
    start = time.monotonic()
    deadline = start + (timeout if timeout_from is None else max(timeout, START_WAIT_S))
    waiting_for_start = timeout_from is not None

    def take_report(reader: Connection, rank: int) -> None:
        """Read rank's report if there is one (EOF: there is none); stop watching its pipe."""
        try:
            reports[rank] = json.loads(reader.recv_bytes().decode("utf-8"))
        except (EOFError, OSError):
            pass
        del readers[reader]
        reader.close()

    try:
        for rank in range(world_size):
            rank_env = {
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world_size),
                "PYTHONPATH": _pythonpath(os.environ.get("PYTHONPATH")),
                **{str(k): str(v) for k, v in (env or {}).items()},
            }
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_rank_main,
                args=(
                    writer,
                    fn,
                    rank,
                    world_size,
                    args,
                    kwargs,
                    rank_env,
                    init_pg,
                    backend,
                    2 * timeout + (START_WAIT_S if timeout_from is not None else 0),
                ),
                name=f"rank{rank}",
            )
            procs.append(proc)
            readers[reader] = rank
            proc.start()
            writer.close()
            sentinels[proc.sentinel] = rank

        while len(exited) < world_size:
            if waiting_for_start and timeout_from is not None and timeout_from():
                waiting_for_start = False
                deadline = time.monotonic() + timeout
            limit = (
                deadline
                if first_failure is None
                else min(deadline, first_failure[0] + FAILURE_GRACE_S)
            )
            remaining = limit - time.monotonic()
            if remaining <= 0:
                break
            if waiting_for_start:
                remaining = min(remaining, 0.05)
            for obj in wait([*readers, *sentinels], timeout=remaining):
                if isinstance(obj, Connection):
                    if obj in readers:
                        take_report(obj, readers[obj])
                    continue
                rank = sentinels.pop(obj)
                exited.add(rank)
                for reader, r in list(readers.items()):
                    if r == rank:  # the process is gone: its report is complete or absent
                        take_report(reader, rank)
            if first_failure is None:
                failed = [
                    r
                    for r in range(world_size)
                    if (r in reports and not reports[r]["ok"]) or (r in exited and r not in reports)
                ]
                if failed:
                    first_failure = (time.monotonic(), failed[0])
    finally:
        # Kill before reaping anything, so no pid or process group can have been reused.
        for proc in procs:
            if proc.pid is not None:
                _kill_tree(proc.pid)
        for rank, proc in enumerate(procs):
            if proc.pid is not None:
                proc.join()
                exitcodes[rank] = proc.exitcode
            proc.close()
        for reader in readers:
            reader.close()

    elapsed = time.monotonic() - start
    unfinished = [r for r in range(world_size) if r not in exited]
    failures: dict[int, str] = {}
    tracebacks: dict[int, str] = {}
    for rank in range(world_size):
        report = reports.get(rank)
        if report is not None and not report["ok"]:
            failures[rank] = f"{report['type']}: {report['message']}"
            tracebacks[rank] = report["traceback"]
        elif report is None and rank in exited:
            failures[rank] = (
                f"ProcessDied: {_describe_exit(exitcodes.get(rank))} without reporting a result"
            )
        elif rank in unfinished and first_failure is not None:
            failures[rank] = (
                f"Killed: still running {elapsed - (first_failure[0] - start):.1f} s after "
                f"rank {first_failure[1]} failed"
            )

    if failures:
        lines = [f"{len(failures)} of {world_size} ranks failed:"]
        lines += [f"rank {r}: {failures[r]}" for r in sorted(failures)]
        for r in sorted(tracebacks):
            lines += ["", f"----- rank {r} traceback -----", tracebacks[r].rstrip()]
        raise RankFailures("\n".join(lines), failures, tracebacks)
    if unfinished:
        finished = [r for r in range(world_size) if r in exited]
        reported = [r for r in unfinished if r in reports]
        note = f" (ranks {reported} reported a result but did not exit)" if reported else ""
        raise RankTimeout(
            f"ranks {unfinished} did not finish within {timeout} s and were killed{note}; "
            f"finished ranks: {finished}",
            unfinished,
            finished,
        )
    return [reports[r]["result"] for r in range(world_size)]


def _kill_and_drain(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Kill ``proc``'s whole tree (torchrun puts each worker in its own session) and reap it.

    Returns the rest of its output; if a pipe is still held open by a process that escaped
    the tree, output reading gives up after a few seconds instead of blocking forever.
    """
    if proc.poll() is None:  # not reaped yet, so its pid and process group are still its own
        _kill_tree(proc.pid)
    try:
        return proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        proc.wait()
        return "", ""


def _wait_until_started(proc: subprocess.Popen[str], started: Callable[[], bool]) -> None:
    """Return once ``started()`` is true, the job has ended, or ``START_WAIT_S`` went by."""
    give_up = time.monotonic() + START_WAIT_S
    while not started() and time.monotonic() < give_up:
        try:  # a child's exit ends the wait at once; retried communicate() loses no output
            proc.wait(timeout=0.05)
            return
        except subprocess.TimeoutExpired:
            pass


def run_torchrun(
    script_path: str | os.PathLike[str],
    nproc: int,
    args: Sequence[str] = (),
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
    timeout_from: Callable[[], bool] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m torch.distributed.run ... --nproc-per-node nproc script_path *args``.

    The job is single-node with a c10d rendezvous on 127.0.0.1 and a free port, so no external
    address is used. ``env`` is added to this process's environment (PYTHONPATH gets the tests
    dir in front). Returns the CompletedProcess with text stdout/stderr whatever the exit code
    (check ``returncode`` yourself). If the job has not finished after ``timeout`` seconds, or
    the caller is interrupted, its whole process group is SIGKILLed; on timeout ``RankTimeout``
    is raised carrying the output so far. ``timeout_from`` as for :func:`run_ranks`.
    """
    full_env = {**os.environ, **{str(k): str(v) for k, v in (env or {}).items()}}
    full_env["PYTHONPATH"] = _pythonpath(full_env.get("PYTHONPATH"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv-id",
        uuid.uuid4().hex,
        "--local-addr",
        "127.0.0.1",
        "--max-restarts",
        "0",
        os.fspath(script_path),
        *map(str, args),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        start_new_session=True,
    )
    finished = False
    try:
        try:
            if timeout_from is not None:
                _wait_until_started(proc, timeout_from)
            stdout, stderr = proc.communicate(timeout=timeout)
            finished = True
        except subprocess.TimeoutExpired:
            stdout, stderr = _kill_and_drain(proc)
            finished = True
            raise RankTimeout(
                f"torchrun job {os.fspath(script_path)} (nproc={nproc}) did not finish within "
                f"{timeout} s and was killed\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
                unfinished=range(nproc),
                finished=(),
                stdout=stdout,
                stderr=stderr,
            ) from None
    finally:
        if not finished:  # interrupted: nothing of the job may survive us
            _kill_and_drain(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
