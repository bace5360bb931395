"""What a result was measured on: the machine, its disk, its load and the code's commit."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psutil

#: The repository holding ``benchmarks/`` (where ``git_info`` asks git).
REPO = Path(__file__).resolve().parent.parent.parent


def git_info(repo: Path = REPO, package: str = "shardckpt") -> dict[str, Any]:
    """The short commit of ``repo`` and the uncommitted changes under ``package``.

    Keys: ``commit`` (None outside a checkout), ``package_dirty_files`` (``git status
    --porcelain`` lines), ``package_diff_sha1`` (12 hex digits of the diff against HEAD, None when
    clean) and ``note`` (one sentence saying which code the figures are for).
    """
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, cwd=repo, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line for line in run("git", "status", "--porcelain", "--", package).splitlines()
             if line]
    diff = run("git", "diff", "HEAD", "--", package)
    return {
        "commit": run("git", "rev-parse", "--short", "HEAD") or None,
        "package_dirty_files": dirty,
        "package_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None,
        "note": ("figures are for this commit plus the uncommitted package changes listed"
                 if dirty else "figures are for this commit, package tree clean"),
    }


def mount_of(path: str) -> dict[str, Any]:
    """The mount holding ``path`` (``mount_point``, ``fstype``, ``device``, ``options``, from
    ``/proc/mounts``; None values where unknown) and the free bytes there (``free_bytes``)."""
    real = os.path.realpath(path)
    best: dict[str, Any] = {"mount_point": None, "fstype": None, "device": None}
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype, opts = line.split()[:4]
                mnt = mnt.replace("\\040", " ")
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best["mount_point"] or ""):
                    best = {"mount_point": mnt, "fstype": fstype, "device": dev,
                            "options": opts}
    except OSError:
        pass
    usage = shutil.disk_usage(real)
    best["free_bytes"] = usage.free
    return best


def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo``, or None where that is not readable."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def load_average(ndigits: int | None = None) -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded to ``ndigits`` when given."""
    loads = list(os.getloadavg())
    return loads if ndigits is None else [round(x, ndigits) for x in loads]


def machine_info(dirpath: str, *, fsync: bool | None = None) -> dict[str, Any]:
    """A JSON-ready description of this host for a benchmark writing under ``dirpath``.

    Keys: ``hostname``, ``platform``, ``python``, ``cpu_count``, ``cpu_affinity`` (CPUs this
    process may use), ``cpu_model``, ``ram_bytes``, ``torch``, ``torch_threads_per_rank``,
    ``shardckpt``, ``cuda``, ``gpu``, ``disk_path``, ``disk`` (see ``mount_of``), ``fsync`` (only
    when given: whether the run syncs its files) and ``loadavg_at_start``. Imports torch.
    """
    import torch

    import shardckpt

    vm = psutil.virtual_memory()
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "ram_bytes": vm.total,
        "torch": torch.__version__,
        "torch_threads_per_rank": torch.get_num_threads(),
        "shardckpt": shardckpt.__version__,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "disk_path": os.path.realpath(dirpath),
        "disk": mount_of(dirpath),
    }
    if fsync is not None:
        info["fsync"] = fsync
    info["loadavg_at_start"] = load_average()
    return info
