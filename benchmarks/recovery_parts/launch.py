"""Simulated nodes and the S3 server of ``benchmarks/recovery.py``. Torch-free.

A :class:`Job` is two ``torchrun --nnodes 2 --node-rank i`` agents on 127.0.0.1 with static
rendezvous, each started in a session of its own (its process group is its pid). torchrun
starts every worker in a session of its own too, so a node is killed by its agent's process
group and each of its workers' (their pid files say which); ``psutil`` finds any straggler.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

REGION = "us-east-1"
# Loopback-only credentials for moto: fixed values, so botocore never asks a metadata service.
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
          "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}
S3_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
            "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    """The environment of the agents, workers and moto. moto is one Python process on the
    same loaded cores: a probe may wait for it longer than the 3 s default before shardckpt
    gives the endpoint up (``SHARDCKPT_CONNECT_TIMEOUT``, kept if set)."""
    env = {k: v for k, v in os.environ.items() if k not in S3_UNSET}
    env.setdefault("SHARDCKPT_CONNECT_TIMEOUT", "30")
    return {**env, **S3_ENV, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Moto:
    """``moto_server`` on 127.0.0.1 (a process group of its own), started by the constructor;
    ``wait_ready()`` waits for it to answer; ``bucket()`` makes a bucket."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).with_name("moto_server")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
        self._log = open(log, "wb")  # closed in stop()
        self.proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=worker_env(),
                                     start_new_session=True)
        self.log = log

    def wait_ready(self, timeout: float = 60.0) -> Moto:
        """Wait until the server answers (raise if it exits or ``timeout`` runs out)."""
        log = self.log
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode} (see {log})")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1):
                    return self
            time.sleep(0.1)  # polling a server that starts up; nothing else to wait on
        self.stop()
        raise RuntimeError(f"moto_server did not answer within {timeout} s (see {log})")

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec options of the s3:// locations (no credentials: those come from the env)."""
        return {"s3://": {"endpoint_url": self.url, "client_kwargs": {"region_name": REGION}}}

    def bucket(self, name: str) -> str:
        import boto3

        env = S3_ENV
        boto3.client("s3", endpoint_url=self.url, region_name=REGION,
                     aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class Job:
    """Two torchrun agents (``nnodes`` in general) running ``script --worker CONFIG``."""

    def __init__(self, script: str, config: Path, run: Path, launch: str, nnodes: int = 2,
                 nproc: int = 2) -> None:
        self.run, self.launch = run, launch
        port = free_port()
        self.logs = [run / "logs" / f"{launch}-node{i}.log" for i in range(nnodes)]
        self.logs[0].parent.mkdir(parents=True, exist_ok=True)
        env = worker_env()
        self.t_launch = time.time()
        self.agents: list[subprocess.Popen[bytes]] = []
        for i in range(nnodes):
            with open(self.logs[i], "wb") as log:
                self.agents.append(subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
                     "--node-rank", str(i), "--nproc-per-node", str(nproc),
                     "--rdzv-backend", "static", "--master-addr", "127.0.0.1",
                     "--master-port", str(port), "--local-addr", "127.0.0.1",
                     "--max-restarts", "0", "--monitor-interval", "0.1",
                     script, "--worker", str(config)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    start_new_session=True))
        self.nproc = nproc

    def workers(self, node: int) -> list[dict[str, Any]]:
        """The pid files of ``node``'s workers written so far."""
        where = self.run / "pids" / self.launch
        return [json.loads(p.read_text()) for p in sorted(where.glob(f"node{node}-rank*.json"))]

    def log_tail(self, n: int = 4000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}"
                         for p in self.logs if p.exists())

    def failed(self) -> str | None:
        """A message if an agent has exited with an error."""
        for i, a in enumerate(self.agents):
            if a.poll() not in (None, 0):
                return f"node {i}'s agent exited with {a.returncode}:\n{self.log_tail()}"
        return None

    def kill_node(self, node: int) -> list[int]:
        """SIGKILL ``node``'s agent and workers: their process groups, the agent's first (so it
        cannot react). Returns the pids killed (the agent's, then the workers')."""
        agent = self.agents[node]
        workers = self.workers(node)
        _killpg(agent.pid)
        for w in workers:
            _killpg(w["pgid"])
        return [agent.pid, *(w["pid"] for w in workers)]

    def stop_node(self, node: int, grace: float = 15.0) -> None:
        """Stop ``node`` as a scheduler ends a job: SIGTERM to its agent (torchrun passes it to
        its workers), then SIGKILL to whatever is left after ``grace`` seconds."""
        agent = self.agents[node]
        with contextlib.suppress(ProcessLookupError):
            agent.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            agent.wait(timeout=grace)
        self.kill_node(node)

    def wait(self, timeout: float) -> None:
        """Wait for every agent to end; raise (with the logs) if one fails or time runs out."""
        deadline = time.monotonic() + timeout
        for i, a in enumerate(self.agents):
            try:
                a.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{self.launch}: node {i} still running after {timeout} s"
                                   f"\n{self.log_tail()}") from None
        message = self.failed()
        if message:
            raise RuntimeError(f"{self.launch}: {message}")

    def gone(self, pids: list[int], timeout: float = 30.0) -> None:
        """Wait until ``pids`` have exited (a zombie counts as exited: its parent reaps it, or
        init does once the parent is gone); raise if one is still running after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            alive = []
            for pid in pids:
                with contextlib.suppress(psutil.NoSuchProcess):
                    if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                        alive.append(pid)
            if not alive:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.launch}: still running after SIGKILL: {alive}")
            time.sleep(0.02)  # polling processes that are not this one's children

    def cleanup(self) -> None:
        """Kill whatever this job started and is still running (any state, any error)."""
        for node, agent in enumerate(self.agents):
            children: list[psutil.Process] = []
            with contextlib.suppress(psutil.NoSuchProcess):
                children = psutil.Process(agent.pid).children(recursive=True)
            if agent.poll() is None:
                _killpg(agent.pid)
            for w in self.workers(node):
                with contextlib.suppress(psutil.NoSuchProcess):
                    if psutil.Process(w["pid"]).is_running():
                        _killpg(w["pgid"])
            for c in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    c.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(timeout=30)
