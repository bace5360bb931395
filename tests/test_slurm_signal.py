"""Issue 26 item 6: under ``launch/slurm/train.sbatch``, preemption (SIGTERM to every process of
the job, as ``scancel`` and the scheduler send it) is handled like the time-limit signal: the
demo's ranks save with a blocking save, the batch script requeues where Slurm allows it, and the
run ends with a clean exit code and no ``SignalException`` traceback.

Real processes: the batch script, a stand-in ``srun`` that runs its command on this machine, the
real torchrun (through ``launch/slurm/graceful-torchrun``) and two gloo ranks of
``launch/demo.py``; only ``scontrol`` is a stand-in that logs what it was asked.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import shardckpt

REPO = Path(__file__).resolve().parents[1]


def _tool(bindir: Path, name: str, body: str) -> None:
    path = bindir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("how", "requeue_rc"), [("SIGTERM to the whole job", 1),
                                                  ("SIGUSR1 to the batch script", 0)])
def test_signal_saves_requeues_and_exits_cleanly(tmp_path: Path, how: str,
                                                 requeue_rc: int) -> None:
    bindir, log, root = tmp_path / "bin", tmp_path / "slurm.log", tmp_path / "ckpt"
    bindir.mkdir()
    _tool(bindir, "srun", 'while [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; '
          'done\nexec "$@"')  # runs the step here, as one task
    _tool(bindir, "scontrol", f'echo "scontrol $*" >> {log}\n'
          '[ "$1 $2" = "show hostnames" ] && echo 127.0.0.1 && exit 0\n'
          f'[ "$1" = requeue ] && exit {requeue_rc}\nexit 0')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SHARDCKPT_", "PET_", "TORCHELASTIC_"))
           and k not in ("TORCHRUN", "DRY_RUN", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", SLURM_SUBMIT_DIR=str(REPO),
               SLURM_JOB_ID="91", SLURM_NNODES="1", SLURM_JOB_NODELIST="127.0.0.1",
               NPROC_PER_NODE="2", RDZV_PORT=str(_free_port()), OMP_NUM_THREADS="1",
               TORCHRUN_PYTHON=sys.executable, SAVE_SECONDS="5")
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            ["bash", str(REPO / "launch" / "slurm" / "train.sbatch"), "launch/demo.py",
             "--root", str(root), "--steps", "1000000", "--save-every", "1000000"],
            env=env, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        try:
            assert proc.stdout is not None
            seen = []
            for line in proc.stdout:  # training is under way once rank 0 reports a step
                seen.append(line)
                if line.startswith("step "):
                    break
            else:
                pytest.fail(f"no training step: {''.join(seen)}{err_path.read_text()}")
            if how.startswith("SIGTERM"):
                os.killpg(proc.pid, signal.SIGTERM)  # what slurmstepd does on scancel/preempt
            else:
                proc.send_signal(signal.SIGUSR1)  # --signal=B:USR1@120
            rest, _ = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    out, errors = "".join(seen) + rest, err_path.read_text()
    assert proc.returncode == 0, out + errors
    assert "Traceback" not in out + errors and "SignalException" not in out + errors
    saved = [ln for ln in out.splitlines() if "(preemption or time limit): saved step" in ln]
    assert len(saved) == 1, out
    step = int(saved[0].split("saved step ")[1].split(",")[0])
    steps = [int(ln.split()[1]) for ln in out.splitlines() if ln.startswith("step ")]
    assert step == steps[-1]  # the step it stopped at, saved
    assert shardckpt.CheckpointManager(str(root)).steps() == [step]
    assert "scontrol requeue 91" in log.read_text().splitlines()
    assert ("requeued job 91" in out) == (requeue_rc == 0)
    assert ("did not requeue job 91" in out) == (requeue_rc != 0)
    torchrun_lines = [ln for ln in errors.splitlines() if ln.startswith("graceful-torchrun:")]
    assert len(torchrun_lines) == 1 and "clean shutdown" in torchrun_lines[0], errors


def test_shutdown_timeout_from_the_measured_save_time(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DRY_RUN="1", SAVE_SECONDS="12.5")
    out = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "train.sbatch"), "x.py"],
                         env=env, capture_output=True, text=True, timeout=30, check=True).stdout
    assert "--shutdown-timeout=40" in out  # 2 * 12.5 + 15
    env["SAVE_SECONDS"] = "300"
    out = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "train.sbatch"), "x.py"],
                         env=env, capture_output=True, text=True, timeout=30, check=True).stdout
    assert "--shutdown-timeout=110" in out  # never past the 120 s warning
