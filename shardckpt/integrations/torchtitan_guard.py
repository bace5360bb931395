"""What the torchtitan backend refuses before it loads or saves, so that a job never resumes
silently from the wrong state (:mod:`shardckpt.integrations.torchtitan` calls these):

* **A model-only step as a resume point.** torchtitan's default ``last_save_model_only=True``
  makes the last save of a finished run hold the model only (``last_save_in_hf``: under
  Hugging Face names). Relaunching that run must not load it as if it were a full step (the
  train state would stay at 0, the optimizer, LR schedule and data loader unrestored):
  :func:`partial_step_error`, unless ``exclude_from_loading`` leaves only the model to load.
* **A folder of torchtitan DCP checkpoints** (``step-N`` folders with ``.metadata``) as
  ``checkpoint.folder``: shardckpt would see no checkpoint in it and start from scratch
  (:func:`dcp_steps`, :func:`dcp_folder_error`); as ``initial_load_path`` it must be one
  ``step-N`` folder, not the run's folder (:func:`dcp_run_error`).
* **A save at or below the newest committed step** (a job resumed from an older step, e.g. by
  ``load_step``): :func:`check_new_step`, a clear error instead of the storage's generic one
  about another writer.
"""

from __future__ import annotations

import os
import re

from ..errors import ShardckptError
from ..storage.base import step_dirname
from .torchtitan_io import TitanLoadError
from .torchtitan_options import TitanConfigError

_DCP_STEP = re.compile(r"step-(\d+)")
_DCP_FILES = (".metadata", "model.safetensors.index.json")  # what torchtitan's DCP backend counts


class TitanSaveError(ShardckptError, ValueError):
    """The torchtitan backend refuses a save (the message names the folder and the step)."""


def dcp_steps(folder: str) -> list[tuple[int, str]]:
    """The torchtitan DCP checkpoints directly under the local ``folder``, as torchtitan finds
    them: ``(N, path)`` of each ``step-N`` folder holding ``.metadata`` (or an HF index),
    ascending. Empty for a URL or a folder that does not exist."""
    if "://" in folder or not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = _DCP_STEP.fullmatch(name)
        path = os.path.join(folder, name)
        if match and any(os.path.isfile(os.path.join(path, f)) for f in _DCP_FILES):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _names(steps: list[tuple[int, str]]) -> str:
    names = [os.path.basename(p) for _, p in steps]
    return ", ".join(names if len(names) <= 8 else [*names[:3], "...", *names[-4:]])


def dcp_folder_error(folder: str, steps: list[tuple[int, str]]) -> TitanConfigError:
    """``checkpoint.folder`` holds torchtitan DCP checkpoints."""
    newest = steps[-1][1]
    return TitanConfigError(
        f"checkpoint.folder {folder} holds torchtitan DCP checkpoints ({_names(steps)}), "
        "which the shardckpt backend does not resume from (it would start from scratch and "
        "write its own steps next to them, which DCP's keep_latest_k could later delete): "
        "use a new checkpoint.folder, and to start from a DCP step, "
        f"initial_load_path={newest} with trust_dcp_pickle=True (initial_load_model_only="
        "False to restore the optimizer and train state too)")


def dcp_run_error(path: str, steps: list[tuple[int, str]]) -> TitanLoadError:
    """``initial_load_path`` is a DCP run's folder, not one of its ``step-N`` folders."""
    return TitanLoadError(
        f"checkpoint.initial_load_path {path} is a torchtitan DCP run folder, not one "
        f"checkpoint: initial_load_path must name one of its step folders ({_names(steps)}), "
        f"e.g. {steps[-1][1]}")


def partial_step_error(folder: str, step: int, hf: bool, missing: list[str],
                       newest_full: int | None, explicit: bool) -> TitanLoadError:
    """A resume (``load``) that would load the model-only ``step`` while asked to restore
    ``missing`` too (or any load of a step under Hugging Face names)."""
    what = "the model only, under Hugging Face names" if hf else "the model only"
    option = "last_save_in_hf" if hf else "last_save_model_only"
    asked = f"load_step={step}" if explicit else f"the newest committed step, {step}"
    lacks = f" (it lacks {', '.join(missing)})" if missing else ""
    source = (f"initial_load_path={os.path.join(folder, 'hf', f'step-{step}')} with "
              "initial_load_in_hf=True" if hf else
              f"initial_load_path={folder} (its newest step) with initial_load_model_only=True")
    full = (f"Its newest full step is {newest_full}: to continue training from it, "
            f"load_step={newest_full} in a copy of this folder without "
            f"{step_dirname(step)} (a save of step {step} would collide with it)"
            if newest_full is not None else "It holds no full step to continue training from")
    exclude = "" if hf else (f" (exclude_from_loading={missing!r} would load the model "
                             "alone, but the job would restart at step 1 in this folder and "
                             "its first save would collide with the steps it holds: "
                             "fine-tune in a new folder, as below)")
    return TitanLoadError(
        f"checkpoint.folder {folder}: {asked} holds {what}{lacks}; it was written by "
        f"{option} at the end of a run and cannot resume training{exclude}. {full}. "
        f"To fine-tune from it: a new checkpoint.folder with {source}. To make the last "
        "save resumable in future runs: last_save_model_only=False")


def check_new_step(folder: str, step: int, newest: int | None) -> None:
    """A save of ``step`` is refused when ``folder`` already holds a committed step at or
    above it: the job was resumed from an older step (``load_step``) into a folder that
    holds newer ones, and saving would collide with them (or retention would delete them)."""
    if newest is None or step > newest:
        return
    raise TitanSaveError(
        f"checkpoint.folder {folder}: cannot save step {step}: the folder already holds "
        f"committed steps up to {newest}, likely by an earlier run of this job, and this job "
        "resumed from an older step (checkpoint.load_step, the newest full step, or none: "
        "train_state in exclude_from_loading). Resume "
        f"from step {newest}, or continue the older step in a copy of the folder or a new "
        "checkpoint.folder (initial_load_path)")
