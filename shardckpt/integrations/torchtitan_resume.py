"""What a torchtitan job loads, decided the same on every rank (:mod:`.torchtitan` calls these).

Every rank lists the steps and reads the manifests through its own view of the storage, and the
load that follows is collective. A decision taken by each rank from its own reads (the steps, a
step's tags, whether a path is a folder) can differ between ranks (a listing that lags, a read
that fails once, a node-local path): one rank then raises a refusal while another goes on into
a collective that the first never joins, and reports a dead peer, a hang until the collective
timeout, or a group that could not be created ("Gloo connectFullMesh failed"), instead of the
same refusal (a user trial, session 9). So every decision before a collective load is one of:

* :func:`on_rank0`: rank 0 decides from its reads (what to load: :func:`plan_load`, the newest
  committed step before the first save) and gives the decision, or its error, to every rank;
* :func:`on_every_rank`: each rank answers from its own view (this node's local steps, whether
  an ``initial_load_path`` is there, whether ``checkpoint.folder`` holds DCP checkpoints), the
  answers are gathered, and an error anywhere is raised on every rank.

Either way every rank returns the same value or raises the same error (type and message), and
none is left waiting in a collective. Costs one small collective on the manager's private group
per decision; only rank 0 reads the manifests it needs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..engine.comm import Comm
from . import torchtitan_guard as guard
from .torchtitan_guard import TitanSaveError, partial_step_error
from .torchtitan_io import TitanLoadError, is_dcp_folder
from .torchtitan_options import TitanConfigError

MODEL = "model"
MODEL_ONLY = "model-only"  # the tag of a step holding the model only (seed, last save)
HF = "hf"  # the tag of a model-only step holding Hugging Face names (never loaded back)
# raised again as such (same type, same message) on every rank; any other error as a
# TitanLoadError naming the rank, its type and its message
_AS_IS: dict[str, type[Exception]] = {c.__name__: c for c in (
    TitanLoadError, TitanConfigError, TitanSaveError, FileNotFoundError, ValueError)}


def _as_json(exc: Exception, rank: int) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc), "rank": rank}


def _rebuild(err: Mapping[str, Any], what: str) -> Exception:
    cls = _AS_IS.get(err["type"])
    if cls is not None:
        return cls(err["message"])
    return TitanLoadError(f"{what}: rank {err['rank']}: {err['type']}: {err['message']}")


def on_rank0(comm: Comm, what: str, fn: Callable[[], Any]) -> Any:
    """Collective: ``fn()`` (a JSON value) run by rank 0 alone and given to every rank; where it
    raised, every rank raises the same error (rank 0 with the original as its cause)."""
    out: dict[str, Any] | None = None
    error: Exception | None = None
    if comm.rank == 0:
        try:
            out = {"value": fn()}
        except Exception as exc:
            error, out = exc, {"error": _as_json(exc, 0)}
    got = comm.broadcast_json(out, what)
    if "error" in got:
        raise _rebuild(got["error"], what) from error
    return got["value"]


def on_every_rank(comm: Comm, what: str, fn: Callable[[], Any]) -> list[Any]:
    """Collective: ``fn()`` (a JSON value) on every rank, from its own view, gathered in rank
    order; where it raised on some rank, every rank raises the lowest such rank's error."""
    error: Exception | None = None
    try:
        mine: dict[str, Any] = {"value": fn()}
    except Exception as exc:
        error, mine = exc, {"error": _as_json(exc, comm.rank)}
    got = comm.all_gather_json(mine, what)
    failed = [g["error"] for g in got if "error" in g]
    if failed:
        raise _rebuild(failed[0], what) from error
    return [g["value"] for g in got]


# ------------------------------------------------------------------------------ what to load
def newest_full(manager: Any, steps: Sequence[int]) -> int | None:
    """The newest of ``steps`` that is not model-only (a full step to continue training)."""
    for step in reversed(steps):
        if MODEL_ONLY not in manager.info(step).tags:
            return step
    return None


def saved_dtypes(manager: Any, step: int) -> dict[str, str]:
    """The dtype of each model tensor of ``step`` as saved (``export_dtype``), by model key."""
    prefix = MODEL + "/"
    return {k[len(prefix):]: e.meta.dtype for k, e in manager.manifest(step).tensors.items()
            if k.startswith(prefix)}


def keys_of(manager: Any, folder: str, step: int, steps: Sequence[int], loadable: list[str],
            states: Mapping[str, Any], explicit: bool) -> tuple[list[str], bool]:
    """What loading ``step`` restores: everything asked for (``loadable``: not in
    exclude_from_loading), or the model alone from a seed checkpoint (step 0). A model-only step
    (the last save of a finished run) that lacks state asked for is refused, as any HF-named
    step. Returns the keys, and whether the step is model-only (its RNG states not loaded)."""
    tags = manager.info(step).tags
    if step == 0 and HF not in tags:
        return [MODEL], True  # torchtitan's rule: step 0 is a seed checkpoint
    if MODEL_ONLY not in tags:
        return loadable, False
    missing = sorted(k for k in loadable if k != MODEL and states.get(k) is not None)
    if HF in tags or missing:
        raise partial_step_error(folder, step, HF in tags, missing, newest_full(manager, steps),
                                 explicit)
    return [MODEL], True


def plan_load(manager: Any, folder: str, step: int, loadable: Callable[[], list[str]],
              states: Mapping[str, Any]) -> dict[str, Any]:
    """Rank 0 (:func:`on_rank0`): what ``load(step)`` loads from the persistent tier.
    ``{"step": None}``: no checkpoint (torchtitan's rule: the options ``initial_*`` apply only
    then); else the step, the keys, whether it is model-only (with its saved dtypes) and
    whether exactly that step is loaded (``load_step``) or the newest loadable one."""
    steps = manager.steps()
    if step != -1 and step not in steps:
        raise FileNotFoundError(f"--checkpoint.load_step={step} not found: {folder} holds "
                                f"steps {steps}")
    load_step = step if step != -1 else (steps[-1] if steps else None)
    if load_step is None:
        return {"step": None}
    keys, model_only = keys_of(manager, folder, load_step, steps, loadable(), states,
                               explicit=step != -1)
    return {"step": load_step, "keys": keys, "pinned": step != -1,
            "saved": saved_dtypes(manager, load_step) if model_only else None}


def local_is_newer(manager: Any, config: Any) -> bool:
    """Collective: whether some node holds a local step newer than every persistent step
    (then ``manager.load`` restores across tiers: local steps, newest first, then the
    persistent ones). Never under ``trusted_keys``: local copies are not signed."""
    if config.local_path is None or config.trusted_keys:
        return False

    def newer() -> bool:
        local, persistent = manager.steps(tier="local"), manager.latest_step()
        return bool(local) and (persistent is None or local[-1] > persistent)

    return any(on_every_rank(manager._comm, "torchtitan: newer local steps", newer))


def initial_source(comm: Comm, path: str, in_hf: bool, trusted: bool) -> str:
    """Collective: what ``initial_load_path`` is, "hf", "dcp" or "root" (a shardckpt root), as
    every rank sees it; refused on every rank where some rank cannot use it (not a folder
    there, or not the same kind of folder as on rank 0)."""

    def kind() -> str:
        if not os.path.isdir(path):
            raise ValueError(f"checkpoint.initial_load_path is not a folder: {path}")
        dcp = not in_hf and is_dcp_folder(path)
        if trusted and (in_hf or dcp):
            raise TitanLoadError(f"checkpoint.initial_load_path {path}: a "
                                 f"{'Hugging Face' if in_hf else 'DCP'} folder cannot be "
                                 "signed, and checkpoint.trusted_keys is set: only signed "
                                 "shardckpt checkpoints load")
        if not in_hf and not dcp and guard.dcp_steps(path):
            raise guard.dcp_run_error(path, guard.dcp_steps(path))
        return "hf" if in_hf else "dcp" if dcp else "root"

    kinds = on_every_rank(comm, "torchtitan: initial_load_path", kind)
    odd = [r for r, k in enumerate(kinds) if k != kinds[0]]
    if odd:
        raise TitanLoadError(f"checkpoint.initial_load_path {path} is a {kinds[0]} folder on "
                             f"rank 0 but not on rank(s) {', '.join(map(str, odd))}: every "
                             "rank must see the same folder")
    return str(kinds[0])


def source_plan(source: Any, model_only: bool) -> dict[str, Any]:
    """Rank 0 (:func:`on_rank0`): the newest step of the shardckpt root ``source``
    (``initial_load_path``), and its saved dtypes when the model alone is loaded from a
    model-only step (maybe in ``export_dtype``)."""
    newest = source.latest_step()
    if model_only and newest is not None and MODEL_ONLY in source.info(newest).tags:
        return {"step": newest, "saved": saved_dtypes(source, newest)}
    return {"step": newest, "saved": None}


def refuse_dcp_folder(comm: Comm, folder: str) -> None:
    """Collective: ``checkpoint.folder`` holding torchtitan DCP checkpoints on some rank's view
    is refused on every rank (:func:`.torchtitan_guard.dcp_folder_error`, from the lowest such
    rank's view), rather than by that rank alone while the others go on."""
    seen = on_every_rank(comm, "torchtitan: checkpoint.folder", lambda: guard.dcp_steps(folder))
    found = next((steps for steps in seen if steps), None)
    if found:
        raise guard.dcp_folder_error(folder, [(int(n), str(p)) for n, p in found])
