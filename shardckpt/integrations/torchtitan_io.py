"""The parts of the torchtitan backend that move state in and out of other formats, and the data
loader's state without its pickle (:mod:`shardckpt.integrations.torchtitan` uses them).

* **A torchtitan DCP folder** as ``initial_load_path``: read with ``dcp.load`` on every rank
  straight into the live (sharded) state, so it reshards as DCP does. DCP's index is a pickle:
  refused unless the config says the folder is trusted (``trust_dcp_pickle``), and then every
  non-tensor item loads with ``weights_only=True`` (as shardckpt's DCP import does).
* **A Hugging Face folder** (``initial_load_in_hf``): through torchtitan's ``sd_adapter``
  (``to_hf``, its safetensors reader, ``from_hf``), as torchtitan's own backend does; no pickle.
* **The last save in HF format**: a model-only step, renamed by ``sd_adapter.to_hf``, exported
  with :func:`shardckpt.export` (``format="hf"``).
* **The data loader**: torchtitan's ``ParallelAwareDataloader`` pickles its
  ``StatefulDataLoader`` state into bytes under ``dp_rank_R``; stored here is the plain state
  those bytes wrap, under the same rank-specific key, with the data-parallel degree.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import ShardckptError
from ..interop import ConversionError
from ..interop.dcp import METADATA, _run_dcp

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class TitanLoadError(ShardckptError, ValueError):
    """A torchtitan checkpoint cannot be loaded as asked; the message names the path or key."""


# ------------------------------------------------------------------------------- data loader

def _stateful_loader_type() -> type | None:
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:  # pragma: no cover - torchtitan depends on torchdata
        return None
    return StatefulDataLoader


def rank_key(loader: Any) -> str:
    key = getattr(loader, "_rank_id", None)
    return key if isinstance(key, str) else f"dp_rank_{getattr(loader, 'dp_rank', 0)}"


def loader_state(loader: Any) -> dict[str, Any]:
    """This data-parallel rank's loader state with no pickle in it: ``{"dp_rank_R": state,
    "world_size": W}`` for a ``StatefulDataLoader`` (its own state, not torchtitan's bytes),
    the loader's ``state_dict()`` otherwise (which shardckpt refuses if it holds bytes)."""
    sdl = _stateful_loader_type()
    if sdl is not None and isinstance(loader, sdl):
        return {rank_key(loader): sdl.state_dict(loader),
                "world_size": getattr(loader, "dp_world_size", 1)}
    return loader.state_dict()


def load_loader_state(loader: Any, saved: dict[str, Any]) -> None:
    """Put back what :func:`loader_state` stored, for this rank; ``TitanLoadError`` when the
    data-parallel degree changed or the checkpoint has nothing for this rank."""
    sdl = _stateful_loader_type()
    if not (sdl is not None and isinstance(loader, sdl)):
        loader.load_state_dict(saved)
        return
    key, degree = rank_key(loader), getattr(loader, "dp_world_size", 1)
    if saved.get("world_size") != degree:
        raise TitanLoadError(f"dataloader: the checkpoint's data-parallel degree is "
                             f"{saved.get('world_size')}, this job's {degree}: the loader's "
                             "state cannot be resharded (exclude_from_loading=['dataloader'] "
                             "starts the data afresh)")
    if key not in saved:
        raise TitanLoadError(f"dataloader: the checkpoint holds no state for {key}")
    sdl.load_state_dict(loader, saved[key])


# ------------------------------------------------------------------------------- DCP folders

def is_dcp_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METADATA))


def _weights_only_planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        """DCP's load planner, except that non-tensor items load with ``weights_only=True``."""

        def load_bytes(self, read_item: Any, value: Any) -> None:
            fqn = read_item.dest_index.fqn
            try:
                obj = torch.load(value, weights_only=True, map_location="cpu")
            except Exception as exc:
                raise ConversionError(
                    f"DCP item {fqn!r} cannot be loaded with weights_only=True (it holds an "
                    f"object other than tensors and plain values): "
                    f"{' '.join(str(exc).split())[:300]}") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return WeightsOnlyPlanner()


def load_dcp_folder(path: str, states: dict[str, Any], *, trusted: bool) -> None:
    """Load the torchtitan DCP checkpoint in ``path`` into ``states`` (collective: every rank
    reads its own part). ``states`` is torchtitan's flattened layout: the model's keys at the
    top level, other entries (objects with ``state_dict``) under their names."""
    import torch.distributed.checkpoint as dcp

    from ..interop.dcp import PICKLE_REFUSAL

    if not trusted:
        raise TitanLoadError(PICKLE_REFUSAL.format(path=path).replace(
            "pass --trust-pickle (Python: trust_pickle=True)",
            "set checkpoint.trust_dcp_pickle=True"))
    if not is_dcp_folder(path):
        raise TitanLoadError(f"{path}: no {METADATA} file: not a DCP checkpoint folder")
    _run_dcp(lambda: dcp.load(states, checkpoint_id=path, planner=_weights_only_planner()))


# ------------------------------------------------------------------------------- Hugging Face

def load_hf_folder(path: str, model: Any, sd_adapter: Any, quantized: bool = False) -> None:
    """The model from the Hugging Face safetensors folder ``path``, through ``sd_adapter``."""
    import torch.distributed.checkpoint as dcp

    if sd_adapter is None:
        raise TitanLoadError(f"{path}: loading a Hugging Face checkpoint needs the model's "
                             "state dict adapter (sd_adapter), and this model has none")
    hf_sd = sd_adapter.to_hf(model.state_dict())
    reader = sd_adapter.get_hf_storage_reader(path, quantized)
    dcp.load(hf_sd, storage_reader=reader)
    model.load_state_dict(sd_adapter.from_hf(hf_sd))


def cast(sd: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Floating-point tensors of ``sd`` as ``dtype``; everything else as it is."""
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
            and v.dtype != dtype else v for k, v in sd.items()}


def as_saved(sd: dict[str, Any], saved: dict[str, str]) -> dict[str, Any]:
    """``sd`` with each tensor in the dtype ``saved`` names for its key (a model-only step
    written with ``export_dtype``), so that it loads in place; the others as they are."""
    out = {}
    for key, value in sd.items():
        dtype = getattr(torch, saved.get(key, ""), None)
        if isinstance(value, torch.Tensor) and isinstance(dtype, torch.dtype) and \
                value.dtype != dtype:
            value = value.to(dtype)
        out[key] = value
    return out


def export_hf(folder: str, step: int, out: str, dtype: torch.dtype, sd_adapter: Any) -> None:
    """Rank 0: the model-only ``step`` of the shardckpt root ``folder`` as a Hugging Face
    folder ``out`` (``config.json`` copied from the adapter's ``hf_assets_path`` when it has
    one). Replaces an earlier export of the same step only."""
    from ..exporter import export

    assets = getattr(sd_adapter, "hf_assets_path", None)
    config = assets if assets and os.path.isfile(os.path.join(assets, "config.json")) else None
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    export(folder, step=step, format="hf", out=out, only="model", dtype=dtype, config=config)
