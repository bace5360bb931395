"""One call that makes a run as deterministic as PyTorch allows, and a record of what it did.

:func:`set_determinism` follows PyTorch's reproducibility notes: seed every generator, require
deterministic kernels, pin cuBLAS's workspace, turn off cuDNN autotuning. What it set is kept
(per process) and returned by :func:`determinism_record`, which provenance stores with each
checkpoint. DataLoader workers get their Python and NumPy generators seeded by
:func:`seed_worker`; shuffling order comes from a generator made by :func:`make_generator`.
"""

from __future__ import annotations

import copy
import os
import random
import warnings
from typing import Any

import torch

_MAX_SEED = 1 << 32  # NumPy's legacy seeding accepts [0, 2**32)
CUBLAS_CONFIG = ":4096:8"
_DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")  # the two values cuBLAS documents as deterministic
_record: dict[str, Any] | None = None


def _check_seed(seed: Any) -> int:
    if type(seed) is not int or not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    return seed


def set_determinism(seed: int, *, warn_only: bool = False) -> dict[str, Any]:
    """Seed Python, NumPy, torch (CPU and every CUDA device) with ``seed``; require determinism.

    Also calls ``torch.use_deterministic_algorithms(True, warn_only=warn_only)``, sets
    ``CUBLAS_WORKSPACE_CONFIG`` to ``:4096:8`` (an existing ``:16:8``, also deterministic, is
    kept), and sets ``cudnn.benchmark = False`` and ``cudnn.deterministic = True``. CUDA is not
    initialized by this call (its seeding is deferred by torch until it is). Call it on every rank,
    before building the model and the data loaders; pass a rank-dependent seed if ranks should
    draw different numbers (e.g. for dropout under tensor parallelism, usually not).

    Returns a JSON-serialisable dict of exactly what was set, also kept for
    :func:`determinism_record`. ``ValueError`` for a seed outside ``[0, 2**32)``.
    """
    global _record
    seed = _check_seed(seed)
    random.seed(seed)
    numpy_seeded = False
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(seed)
        numpy_seeded = True
    torch.manual_seed(seed)  # seeds the CPU generator and, lazily, every CUDA device
    cuda_seeded = torch.cuda.is_available()
    if cuda_seeded:
        torch.cuda.manual_seed_all(seed)
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if cublas not in _DETERMINISTIC_CUBLAS:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            warnings.warn("set_determinism: CUDA is already initialized; CUBLAS_WORKSPACE_CONFIG "
                          "may not reach cuBLAS handles created before this call, so call "
                          "set_determinism before any CUDA work", stacklevel=2)
        cublas = CUBLAS_CONFIG
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    _record = {
        "seed": seed,
        "seeded": {"python": True, "numpy": numpy_seeded, "torch": True, "cuda": cuda_seeded},
        "deterministic_algorithms": True,
        "warn_only": bool(warn_only),
        "env": {"CUBLAS_WORKSPACE_CONFIG": cublas},
        "cudnn": {"benchmark": False, "deterministic": True},
    }
    return copy.deepcopy(_record)


def determinism_record() -> dict[str, Any] | None:
    """What the last :func:`set_determinism` of this process set (a copy), or None."""
    return copy.deepcopy(_record)


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=seed_worker)``: seed a worker's Python and NumPy generators.

    torch seeds each worker's torch generator with ``base_seed + worker_id``; this derives the
    other two from it, so every worker draws differently and the same on every run (given a
    loader ``generator`` from :func:`make_generator`, which fixes ``base_seed``).
    """
    del worker_id  # already part of torch.initial_seed() in the worker
    worker_seed = torch.initial_seed() % _MAX_SEED
    random.seed(worker_seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(worker_seed)


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``, for ``DataLoader``/sampler ``generator=``."""
    generator = torch.Generator()
    generator.manual_seed(_check_seed(seed))
    return generator
