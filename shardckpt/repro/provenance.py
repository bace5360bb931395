"""What produced a checkpoint: software, hardware, command line, code revision, config, data.

:func:`collect_provenance` returns a JSON-only dict for the manifest. It never contains a secret:
environment variables come from an allow-list, and the values of secret-looking names (see
:mod:`shardckpt.redact`) in the environment, the command line, ``config`` and ``data`` are
replaced by ``"<redacted>"``. Facts that cannot change while the process runs (versions,
devices, installed packages) are gathered once per process and reused.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..redact import REDACTED, is_secret_name, redact_argv, redact_tree, scrub_text
from .determinism import determinism_record
from .distributions import installed_distributions
from .gitstate import git_state

FORMAT = 1
SMI_TIMEOUT_S = 5.0
ENV_NAMES = frozenset({
    "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG", "SLURM_JOB_ID", "SLURM_NNODES",
    "SLURM_JOB_NUM_NODES", "SLURM_NTASKS", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT",
})
# MASTER_ADDR is left out on purpose: a network address says nothing about the results, and the
# hosts of the job are recorded by name.
ENV_PREFIXES = ("NCCL_", "TORCH_", "TORCHINDUCTOR_", "PYTORCH_", "CUDA_", "CUBLAS_", "CUDNN_",
                "SHARDCKPT_")


def allowed_environment() -> dict[str, str]:
    """Allow-listed environment variables; secret-looking ones hold ``"<redacted>"``."""
    out = {}
    for name in sorted(os.environ):
        if name in ENV_NAMES or name.startswith(ENV_PREFIXES):
            out[name] = REDACTED if is_secret_name(name) else scrub_text(os.environ[name])
    return out


def _env_int(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def host_record() -> dict[str, Any]:
    """This rank's small record, for the caller to gather from every rank.

    ``{"hostname", "pid", "rank", "local_rank", "cuda_visible_devices", "device"}``; ``rank`` and
    ``local_rank`` come from torchrun's ``RANK``/``LOCAL_RANK`` (None when unset), ``device`` is the
    name of the current CUDA device when CUDA is initialized, else None. Never initializes CUDA.
    """
    device = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.get_device_name(torch.cuda.current_device())
    return {"hostname": socket.gethostname(), "pid": os.getpid(), "rank": _env_int("RANK"),
            "local_rank": _env_int("LOCAL_RANK"),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": device}


@functools.lru_cache(maxsize=1)
def _smi_gpus() -> tuple[dict[str, Any], ...]:
    """The host's GPUs as ``nvidia-smi`` lists them (all of them, whatever CUDA_VISIBLE_DEVICES)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        done = subprocess.run([smi, "--query-gpu=index,name,memory.total,driver_version",
                               "--format=csv,noheader,nounits"],
                              capture_output=True, timeout=SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return ()
    if done.returncode != 0:
        return ()
    gpus = []
    for line in done.stdout.decode("utf-8", "replace").splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 4:
            gpus.append({"index": fields[0], "name": fields[1], "memory_mib": fields[2],
                         "driver": fields[3]})
    return tuple(gpus)


@functools.lru_cache(maxsize=1)
def _torch_devices() -> tuple[dict[str, Any], ...]:
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "total_memory": int(p.total_memory),
                    "capability": f"{p.major}.{p.minor}",
                    "multiprocessors": int(p.multi_processor_count)})
    return tuple(out)


def _accelerators() -> dict[str, Any]:
    """Devices as torch sees them once CUDA is initialized; before that, as nvidia-smi lists
    them, so that collecting provenance never initializes CUDA (on every rank, on device 0)."""
    gpus = _smi_gpus()
    driver = gpus[0]["driver"] if gpus else None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices, source = [dict(d) for d in _torch_devices()], "torch"
    else:
        devices = [{k: v for k, v in g.items() if k != "driver"} for g in gpus]
        source = "nvidia-smi" if gpus else None
    return {"devices": devices, "source": source, "driver": driver}


def _cudnn_version() -> int | None:
    try:
        return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except RuntimeError:
        return None


def _nccl_version() -> str | None:
    if not torch.cuda.is_available():
        return None
    try:
        v = torch.cuda.nccl.version()
    except (RuntimeError, AttributeError):
        return None
    return ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)


@functools.lru_cache(maxsize=1)
def _static() -> dict[str, Any]:
    """Facts fixed for the life of the process (computed once; devices are cached apart)."""
    libc, libc_version = platform.libc_ver()
    return {
        "python": {"version": sys.version, "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": {"system": platform.system(), "release": platform.release(),
                     "machine": platform.machine(), "platform": platform.platform(),
                     "libc": f"{libc} {libc_version}".strip() or None},
        "torch": {"version": torch.__version__, "git_version": torch.version.git_version,
                  "cuda": torch.version.cuda, "hip": torch.version.hip,
                  "cudnn": _cudnn_version(), "nccl": _nccl_version()},
    }


def describe_mesh(mesh: Any) -> dict[str, Any] | None:
    """``{"shape", "dim_names", "device_type", "ranks"}`` of a ``DeviceMesh``.

    Also accepts a plain shape (a list or tuple of ints) or a mapping (validated and redacted like
    ``config``). ``TypeError`` for anything else.
    """
    if mesh is None:
        return None
    if isinstance(mesh, Mapping):
        return redact_tree(mesh, "mesh")
    if isinstance(mesh, (list, tuple)) and all(type(n) is int for n in mesh):
        return {"shape": list(mesh), "dim_names": None, "device_type": None, "ranks": None}
    ranks = getattr(mesh, "mesh", None)
    if isinstance(ranks, torch.Tensor):
        names = getattr(mesh, "mesh_dim_names", None)
        return {"shape": list(ranks.shape), "dim_names": list(names) if names else None,
                "device_type": str(getattr(mesh, "device_type", None)), "ranks": ranks.tolist()}
    raise TypeError(f"mesh: expected a DeviceMesh, a shape or a dict, got {type(mesh).__name__}")


def _code_dir() -> tuple[Path, str]:
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is not None and script.is_file():
        return script.resolve().parent, "script"
    return Path.cwd(), "cwd"


def _determinism() -> dict[str, Any]:
    return {"set_determinism": determinism_record(),
            "effective": {
                "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
                "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
                "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
                "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                "torch_num_threads": torch.get_num_threads()}}


def collect_provenance(*, world_size: int, mesh: Any = None,
                       config: Mapping[str, Any] | None = None,
                       data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """This process's provenance record, JSON-only and free of secrets (see the module docstring).

    Keys: ``format``, ``python``, ``platform``, ``torch`` (version, git_version, cuda, hip, cudnn,
    nccl; None where absent), ``accelerators`` (``devices``, their ``source``: ``"torch"`` once
    CUDA is initialized, else ``"nvidia-smi"``, and the ``driver``), ``host``
    (:func:`host_record` of this rank), ``world_size``, ``mesh`` (:func:`describe_mesh`),
    ``determinism`` (the :func:`~.determinism.set_determinism` record and the flags in effect),
    ``command`` (redacted ``argv``), ``code`` (:func:`~.gitstate.git_state` of the training
    script's directory, else of the current one; None outside git), ``config`` and ``data`` (the
    caller's, copied with secret-looking keys' values redacted), ``packages``
    (:func:`~.distributions.installed_distributions`) and ``env`` (:func:`allowed_environment`).

    Local to the calling rank: no collective. ``TypeError`` when ``config``, ``data`` or ``mesh``
    holds a value that is not JSON (naming its path), ``ValueError`` for a bad ``world_size``.
    Typical cost: a few hundred ms on the first call of a process (packages, devices), tens of ms
    after (git).
    """
    if type(world_size) is not int or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    config_json = None if config is None else redact_tree(_mapping(config, "config"), "config")
    data_json = None if data is None else redact_tree(_mapping(data, "data"), "data")
    mesh_json = describe_mesh(mesh)
    code_dir, source = _code_dir()
    code = git_state(code_dir)
    if code is not None:
        code["source"] = source
    static = _static()
    return {
        "format": FORMAT,
        **{k: _copy(v) for k, v in static.items()},
        "accelerators": _accelerators(),
        "host": host_record(),
        "world_size": world_size,
        "mesh": mesh_json,
        "determinism": _determinism(),
        "command": {"argv": redact_argv(list(sys.argv))},
        "code": code,
        "config": config_json,
        "data": data_json,
        "packages": installed_distributions(),
        "env": allowed_environment(),
    }


def _mapping(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name}: expected a dict, got {type(value).__name__}")
    return value


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
