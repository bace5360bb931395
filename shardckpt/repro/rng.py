"""Capture and restore this process's random number generators as checkpointable values.

A captured state is a dict made only of JSON scalars, dicts, lists and CPU tensors, so the
checkpoint tree stores it without pickle. Everything that differs between ranks is a tensor
(whose bytes the planner compares and stores per rank when they differ); the JSON part is the
same on every rank, so the tree never needs a per-rank node for it::

    {"format": 1,
     "python": {"version": 3, "internal": int64[625], "gauss_next": float64[0 or 1]},
     "numpy":  {"algorithm": "MT19937", "key": int64[624], "pos_has_gauss": int64[2],
                "cached_gaussian": float64[1]}          # absent if NumPy is missing or not MT19937
     "torch":  uint8[N],                                # torch.get_rng_state()
     "cuda":   [uint8[M], ...]}                         # one per device; [] if CUDA is not in use

Capturing never draws a number from any generator and never initializes CUDA.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import torch

FORMAT = 1
_MT_WORDS = 624


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _capture_python() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {"version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": torch.tensor([] if gauss_next is None else [gauss_next],
                                       dtype=torch.float64)}


def _capture_numpy() -> dict[str, Any] | None:
    np = _numpy()
    if np is None:
        return None
    state = np.random.get_state(legacy=True)
    if not isinstance(state, tuple) or state[0] != "MT19937":
        return None  # a non-legacy bit generator was installed; only MT19937 is supported
    algorithm, key, pos, has_gauss, cached = state
    return {"algorithm": str(algorithm),
            # through a list, not torch.from_numpy: torch's NumPy bridge may be missing or broken
            "key": torch.tensor([int(k) for k in key], dtype=torch.int64),
            "pos_has_gauss": torch.tensor([int(pos), int(has_gauss)], dtype=torch.int64),
            "cached_gaussian": torch.tensor([float(cached)], dtype=torch.float64)}


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (Python, NumPy's global, torch CPU, each CUDA device in use).

    Promises: no random number is consumed, CUDA is not initialized by this call, and the result
    holds only JSON scalars, dicts, lists and CPU tensors that share no memory with the live
    generators. Per-rank: call it on every rank; each rank's values are its own.
    """
    state: dict[str, Any] = {"format": FORMAT, "python": _capture_python()}
    numpy_state = _capture_numpy()
    if numpy_state is not None:  # without NumPy there is nothing to restore, nor to warn about
        state["numpy"] = numpy_state
    state["torch"] = torch.get_rng_state()
    state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()] if _cuda_in_use() else []
    return state


# ----------------------------------------------------------------------------- restore

def _tensor(value: Any, name: str, dtype: torch.dtype, length: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.dim() != 1:
        got = (f"{value.dtype} tensor of shape {list(value.shape)}"
               if isinstance(value, torch.Tensor) else type(value).__name__)
        raise ValueError(f"{name}: expected a 1-D {str(dtype).removeprefix('torch.')} tensor, "
                         f"got {got}")
    if length is not None and value.numel() != length:
        raise ValueError(f"{name}: expected {length} elements, got {value.numel()}")
    return value.detach().cpu()


def _mapping(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}: expected a dict, got {type(value).__name__}")
    return value


def _skipped(v: Mapping[str, Any], name: str, keys: tuple[str, ...]) -> bool:
    """True if a part is None: a per-rank tensor the loader skipped (world size changed)."""
    for key in keys:
        if key not in v:
            raise ValueError(f"{name}: missing {key!r}")
    return any(v[key] is None for key in keys)


def _plan_python(value: Any) -> Callable[[], None] | None:
    v = _mapping(value, "python")
    if _skipped(v, "python", ("version", "internal", "gauss_next")):
        return None
    version = v.get("version")
    if type(version) is not int:
        raise ValueError(f"python: version must be an int, got {version!r}")
    internal = _tensor(v.get("internal"), "python.internal", torch.int64, _MT_WORDS + 1).tolist()
    gauss = _tensor(v.get("gauss_next"), "python.gauss_next", torch.float64).tolist()
    if len(gauss) > 1:
        raise ValueError(f"python.gauss_next: expected 0 or 1 elements, got {len(gauss)}")
    state = (version, tuple(internal), gauss[0] if gauss else None)
    try:
        random.Random().setstate(state)  # validate on a scratch generator first
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"python: invalid random state: {exc}") from None
    return lambda: random.setstate(state)


def _plan_numpy(value: Any) -> Callable[[], None] | None:
    v = _mapping(value, "numpy")
    if _skipped(v, "numpy", ("algorithm", "key", "pos_has_gauss", "cached_gaussian")):
        return None
    if v.get("algorithm") != "MT19937":
        raise ValueError(f"numpy: unsupported algorithm {v.get('algorithm')!r}")
    key = _tensor(v.get("key"), "numpy.key", torch.int64, _MT_WORDS)
    pos_has = _tensor(v.get("pos_has_gauss"), "numpy.pos_has_gauss", torch.int64, 2).tolist()
    cached = _tensor(v.get("cached_gaussian"), "numpy.cached_gaussian", torch.float64, 1).item()
    np = _numpy()
    if np is None:
        return None
    if bool((key < 0).any()) or bool((key >= 1 << 32).any()):
        raise ValueError("numpy.key: words must lie in [0, 2**32)")
    if not 0 <= pos_has[0] <= _MT_WORDS or pos_has[1] not in (0, 1):
        raise ValueError(f"numpy.pos_has_gauss: expected [0..{_MT_WORDS}, 0 or 1], got {pos_has}")
    state = ("MT19937", np.array(key.tolist(), dtype=np.uint32), pos_has[0], pos_has[1], cached)
    try:
        np.random.RandomState().set_state(state)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"numpy: invalid random state: {exc}") from None
    return lambda: np.random.set_state(state)


def _plan_torch(value: Any) -> Callable[[], None]:
    state = _tensor(value, "torch", torch.uint8, torch.get_rng_state().numel()).clone()
    try:
        torch.Generator().set_state(state)
    except RuntimeError as exc:
        raise ValueError(f"torch: invalid random state: {exc}") from None
    return lambda: torch.set_rng_state(state)


def _plan_cuda(value: Any, missing: list[str]) -> list[Callable[[], None]]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"cuda: expected a list of tensors, got {type(value).__name__}")
    states = [_tensor(s, f"cuda:{i}", torch.uint8).clone() if s is not None else None
              for i, s in enumerate(value)]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    plans: list[Callable[[], None]] = []
    for i, state in enumerate(states):
        if state is None or i >= count:
            missing.append(f"cuda:{i}")
            continue
        if _cuda_in_use():
            expected = torch.cuda.get_rng_state(i).numel()
            if state.numel() != expected:
                raise ValueError(f"cuda:{i}: expected {expected} elements, got {state.numel()}")
        # Lazy when CUDA is not initialized yet: applied at initialization, not forcing it.
        plans.append(lambda s=state, d=i: torch.cuda.set_rng_state(s, d))
    return plans


def restore_rng_state(value: Mapping[str, Any]) -> list[str]:
    """Restore the generators present in ``value`` (from :func:`capture_rng_state`).

    Returns the names of saved generators that were not restored, for the caller to warn about:
    ``"numpy"`` when NumPy is not importable here, ``"cuda:I"`` for devices this process does not
    have, and any generator whose value (or a part of it) is ``None`` (a per-rank tensor the
    loader skipped, e.g. after a world-size change) or whose name is unknown. Everything is
    validated before anything is changed: malformed input raises ``ValueError`` naming the
    generator and leaves every generator untouched.
    """
    value = _mapping(value, "rng state")
    if value.get("format") != FORMAT:
        raise ValueError(f"rng state: unsupported format {value.get('format')!r} "
                         f"(expected {FORMAT})")
    missing: list[str] = []
    plans: list[Callable[[], None]] = []
    for name, item in value.items():
        if name == "format":
            continue
        if name == "cuda":
            plans += _plan_cuda(item if item is not None else [], missing)
            continue
        planner = {"python": _plan_python, "numpy": _plan_numpy, "torch": _plan_torch}.get(name)
        if planner is None or item is None:
            missing.append(str(name))
            continue
        plan = planner(item)
        if plan is None:
            missing.append(str(name))
        else:
            plans.append(plan)
    for plan in plans:
        plan()
    return missing
