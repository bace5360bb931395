"""Rank functions for the Hugging Face and DCP interop tests (imported by spawned children)."""

from __future__ import annotations

from typing import Any

import dist_targets as T
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

import shardckpt


def tiny_llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                       max_position_embeddings=64, tie_word_embeddings=False)


def tiny_llama(seed: int = 0) -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config())


def llama_fsdp_save(rank: int, world: int, root: str, ref_path: str, cfg_dir: str
                    ) -> dict[str, Any]:
    """A tiny Llama sharded with FSDP2, one AdamW step on this rank's data, saved at step 1.
    Rank 0 writes the full model state (the reference) and the model's config.json."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(rank))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optim.step()
    optim.zero_grad()
    with shardckpt.CheckpointManager(root) as mgr:
        mgr.save(1, {"model": model, "optim": optim, "step": 1}).wait()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, ref_path)
        model.config.save_pretrained(cfg_dir)
        model.generation_config.save_pretrained(cfg_dir)
    sharded = [k for k, v in model.state_dict().items() if hasattr(v, "placements")]
    return {"sharded": len(sharded)}


def dcp_fsdp_save(rank: int, world: int, dcp_dir: str, ref_path: str) -> dict[str, Any]:
    """What torchtitan writes: an FSDP2 model and its optimizer through ``get_state_dict``, plus
    plain training state, saved with ``dcp.save`` by every rank. Rank 0 keeps the full state as
    the reference; every rank reports the loss of the next step."""
    model, optim, sched = T.build(sharded=True)
    for step in range(2):
        T.train_step(model, optim, sched, step, rank)
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd, "train_state": {"step": 2, "tokens": [48, 96]}},
             checkpoint_id=dcp_dir)
    ref = T.full_state(model, optim)  # collective
    if rank == 0:
        save_file(ref, ref_path)
    return {"next_loss": T.train_step(model, optim, sched, 2, rank).hex()}


def fsdp_resume(rank: int, world: int, root: str, ref_path: str) -> dict[str, Any]:
    """Load the imported checkpoint into a fresh FSDP2 model and optimizer with shardckpt."""
    model, optim, sched = T.build(sharded=True, seed=123)
    state: dict[str, Any] = {"model": model, "optim": optim, "train_state": {}}
    with shardckpt.CheckpointManager(root) as mgr:
        step = mgr.load(state)
    got = T.full_state(model, optim)
    problems = T.compare(load_file(ref_path), got) if rank == 0 else []
    return {"step": step, "train_state": state["train_state"], "problems": problems,
            "next_loss": T.train_step(model, optim, sched, 2, rank).hex()}


def fsdp_load_dcp_export(rank: int, world: int, dcp_dir: str, ref_path: str) -> dict[str, Any]:
    """``dcp.load`` shardckpt's DCP export into a fresh FSDP2 model and optimizer."""
    model, optim, _ = T.build(sharded=True, seed=123)
    msd, osd = get_state_dict(model, optim)
    state: dict[str, Any] = {"model": msd, "optim": osd,
                             "train_state": {"step": None, "tokens": None}}
    dcp.load(state, checkpoint_id=dcp_dir)
    set_state_dict(model, optim, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    got = T.full_state(model, optim)
    problems = T.compare(load_file(ref_path), got) if rank == 0 else []
    return {"problems": problems, "train_state": state["train_state"]}
