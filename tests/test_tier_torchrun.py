"""The node-local tier in a simulated multi-node job (issue 28): two ``torchrun`` agents on
127.0.0.1 (``--nnodes 2 --node-rank i``, static rendezvous), 2 workers each; the node id comes
from torchrun's GROUP_RANK. A job saves; node 1's path is deleted (a replaced machine); a new
job restores the newest local step, node 1's ranks receiving their files from node 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
from harness import TESTS_DIR, free_port

SCRIPT = TESTS_DIR / "tier_torchrun_script.py"


def run_nodes(mode: str, root: Path, nnodes: int = 2, nproc: int = 2,
              timeout: float = 150.0, script: Path = SCRIPT) -> list[dict]:
    """Start ``nnodes`` agents of ``script`` (static rendezvous on a free port of 127.0.0.1),
    wait for all; kill every process they started, whatever happens (each agent's process
    group, then every descendant by its pid: workers run in sessions of their own)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHARDCKPT_COLLECTIVE_TIMEOUT": "60",
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    port = free_port()
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
         "--node-rank", str(i), "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
         "--master-port", str(port), "--local-addr", "127.0.0.1", "--max-restarts", "0",
         str(script), mode, str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True) for i in range(nnodes)]
    outputs: list[str] = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=timeout)[0])
    finally:
        for agent in agents:
            procs = []
            try:
                procs = psutil.Process(agent.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
            for p in [*procs]:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            if agent.poll() is None:
                try:
                    os.killpg(agent.pid, signal.SIGKILL)  # its own session: pgid == pid
                except ProcessLookupError:
                    pass
            agent.wait()
    assert all(a.returncode == 0 for a in agents), "\n".join(outputs)[-6000:]
    results = [json.loads((root / f"result-{r}.json").read_text())
               for r in range(nnodes * nproc)]
    for r in range(nnodes * nproc):
        (root / f"result-{r}.json").unlink()
    return results


def test_two_torchrun_agents_save_lose_a_node_and_recover(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    saved = run_nodes("save", root)
    assert [r["node"] for r in saved] == ["0", "0", "1", "1"]  # GROUP_RANK
    for node in ("0", "1"):
        assert sorted(p.name for p in (root / node).glob("step-*")) == [
            "step-0000000001", "step-0000000002", "step-0000000003"]
    shutil.rmtree(root / "1")
    out = run_nodes("recover", root)
    assert [(r["tier"], r["step"], r["exact"]) for r in out] == [("local", 3, True)] * 4
    assert [r["bytes_received"] > 0 for r in out] == [False, False, True, True]
