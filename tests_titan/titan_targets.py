"""Rank bodies for tests_titan: what torchtitan's Trainer builds and does, with its real classes.

A tiny Hugging Face ``LlamaForCausalLM`` (so that an HF export can be loaded by
``transformers``), sharded with FSDP2 (``fully_shard``) on a CPU mesh when there are several
ranks; torchtitan's ``OptimizersContainer`` (AdamW), ``LRSchedulersContainer`` (warmup and
linear decay), ``ParallelAwareDataloader`` over a stateful token stream per data-parallel rank,
and a train state like the Trainer's. The loop makes the Trainer's calls in the Trainer's order
(``load`` at the start, ``maybe_wait_for_staging`` before the optimizer step, ``save`` after
it, ``close`` at the end), with either checkpoint backend.

Each scenario returns JSON: per-step losses of this rank and SHA-256 digests of the full
(unsharded) model and optimizer state, so that runs compare bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import IterableDataset
from torchtitan.components.checkpointer import CheckpointManager
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
from torchtitan.components.optimizer.optimizer import ParamGroupConfig
from torchtitan.protocols.state_dict_adapter import StateDictAdapter
from transformers import LlamaConfig, LlamaForCausalLM

from shardckpt.integrations.torchtitan import ShardckptCheckpointManager

VOCAB, SEQ, BATCH = 64, 8, 2
TOTAL = 10  # training.steps


def hf_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=2 * SEQ, tie_word_embeddings=False)


class Tokens(IterableDataset):
    """An endless token stream of one data-parallel rank; its position is its state."""

    def __init__(self, dp_rank: int) -> None:
        self.dp_rank, self.i = dp_rank, 0

    def __iter__(self) -> Any:
        while True:
            g = torch.Generator().manual_seed(1000 * self.i + self.dp_rank)
            self.i += 1
            ids = torch.randint(0, VOCAB, (SEQ + 1,), generator=g)
            yield ids[:-1], ids[1:]

    def state_dict(self) -> dict[str, Any]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.i = state["i"]


class Adapter(StateDictAdapter):
    """The model's names are Hugging Face's already: the identity, with torchtitan's reader."""

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return dict(state_dict)

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        return dict(hf_state_dict)


class TrainState:
    """The Trainer's own entry of ``states`` ("train_state")."""

    def __init__(self) -> None:
        self.step, self.ntokens_seen = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.ntokens_seen = state["step"], state["ntokens_seen"]


def digest(values: dict[str, Any]) -> str:
    """SHA-256 over the full tensors (collective for DTensors) and plain values, by key."""
    h = hashlib.sha256()
    for key in sorted(values):
        v = values[key]
        if isinstance(v, DTensor):
            v = v.full_tensor()
        h.update(key.encode())
        if isinstance(v, torch.Tensor):
            h.update(str(v.dtype).encode())
            h.update(v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


@dataclass
class Job:
    rank: int
    world: int
    dump: str
    backend: str = "shardckpt"
    ckpt: dict[str, Any] = field(default_factory=dict)
    shard: bool = True  # FSDP2 over all ranks (False: a plain model, e.g. a seed checkpoint)
    freeze: bool = False  # the first decoder layer frozen: bytes an incremental save reuses

    def __post_init__(self) -> None:
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(hf_config())
        if self.freeze:
            self.model.model.layers[0].requires_grad_(False)
        if self.shard:
            mesh = init_device_mesh("cpu", (self.world,))
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
        self.optimizers = OptimizersContainer.Config(
            param_groups=[ParamGroupConfig(
                pattern=r".*", optimizer_name="AdamW",
                optimizer_kwargs={"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8,
                                  "weight_decay": 0.1})],
            implementation="for-loop").build(model_parts=[self.model])
        self.lr_schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(
            optimizers=self.optimizers, training_steps=TOTAL)
        self.dataset = Tokens(self.rank)
        self.dataloader = ParallelAwareDataloader(self.dataset, dp_rank=self.rank,
                                                  dp_world_size=self.world, batch_size=BATCH)
        self.train_state = TrainState()
        cls = ShardckptCheckpointManager if self.backend == "shardckpt" else CheckpointManager
        self.config = cls.Config(**{"enable": True, **self.ckpt})
        assets = os.path.join(self.dump, "assets")
        self.checkpointer = self.config.build(
            dataloader=self.dataloader, model_parts=[self.model], optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers, states={"train_state": self.train_state},
            sd_adapter=Adapter(None, assets if os.path.isdir(assets) else None),
            base_folder=self.dump)
        self.losses: dict[int, float] = {}

    def train(self, stop: int = TOTAL, kill_after: int | None = None,
              digest_at: int | None = None) -> dict[str, Any]:
        """The Trainer's ``train()``: load, then steps up to ``stop``; returns the results."""
        self.checkpointer.load(step=self.config.load_step)
        self.loaded_step = self.train_state.step
        marks: dict[str, Any] = {}
        batches = iter(self.dataloader)
        while self.train_state.step < stop:
            self.train_state.step += 1
            step = self.train_state.step
            self.optimizers.zero_grad()
            x, y = next(batches)
            logits = self.model(input_ids=x).logits
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            loss.backward()
            self.losses[step] = loss.item()
            self.train_state.ntokens_seen += y.numel()
            self.checkpointer.maybe_wait_for_staging()
            self.optimizers.step()
            self.lr_schedulers.step()
            self.checkpointer.save(step, last_step=step == TOTAL)
            if step == digest_at:
                marks = self.result()
            if step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # no close, no wait: a crash
        self.checkpointer.close()
        return {**self.result(), "at": marks}

    def result(self) -> dict[str, Any]:
        return {"losses": dict(self.losses), "model": self.model_digest(),
                "optim": digest(self.optimizers.state_dict()),
                "lr": self.lr_schedulers.schedulers[0].get_last_lr(),
                "step": self.train_state.step, "ntokens": self.train_state.ntokens_seen,
                "loaded_step": getattr(self, "loaded_step", None), "data": self.dataset.i}

    def model_digest(self) -> str:
        return digest(self.model.state_dict())


def root_of(dump: str) -> str:
    """Where the checkpoints of a job in ``dump`` go (its config.folder)."""
    return os.path.join(dump, "checkpoint")


# --------------------------------------------------------------------------- the scenarios
# Each is a ``harness.run_ranks`` target: ``fn(rank, world_size, base)``.

RESUMABLE = {"interval": 3, "keep_latest_k": 0, "last_save_model_only": False}
SHARD_RESUMABLE = {**RESUMABLE, "async_mode": "async"}  # shardckpt: killed mid-write maybe


def first_runs(rank: int, world: int, base: str) -> None:
    """The uninterrupted reference (checkpointing disabled), the DCP backend to step 8, then the
    shardckpt backend killed (SIGKILL, every rank) after step 8. The results so far go to
    ``base/first-RANK.json``, as the ranks never return."""
    out: dict[str, Any] = {"ref": Job(rank, world, f"{base}/ref", ckpt={"enable": False}).train()}
    out["ref_written"] = os.path.exists(root_of(f"{base}/ref"))
    out["dcp_first"] = Job(rank, world, f"{base}/dcp", "dcp", RESUMABLE).train(stop=8,
                                                                               digest_at=6)
    with open(f"{base}/first-{rank}.json", "w") as f:
        json.dump(out, f)
    dist.barrier()
    Job(rank, world, f"{base}/shard", ckpt=SHARD_RESUMABLE).train(kill_after=8)


def resumed_runs(rank: int, world: int, base: str) -> dict[str, Any]:
    """Both backends resume their run to the end; then step 6 of the DCP backend's folder is the
    ``initial_load_path`` of fresh shardckpt jobs (refused without ``trust_dcp_pickle``)."""
    from shardckpt.integrations.torchtitan_io import TitanLoadError

    out: dict[str, Any] = {"shard": Job(rank, world, f"{base}/shard",
                                        ckpt=SHARD_RESUMABLE).train(),
                           "dcp": Job(rank, world, f"{base}/dcp", "dcp", RESUMABLE).train()}
    path = os.path.join(root_of(f"{base}/dcp"), "step-6")
    refused = Job(rank, world, f"{base}/refused", ckpt={"initial_load_path": path})
    try:
        refused.checkpointer.load()
    except TitanLoadError as exc:
        out["refused"] = str(exc)
    refused.checkpointer.close()
    for name, model_only in (("from_dcp", True), ("from_dcp_full", False)):
        job = Job(rank, world, f"{base}/{name}", ckpt={
            "initial_load_path": path, "trust_dcp_pickle": True,
            "initial_load_model_only": model_only})
        out[name] = {"loaded": job.checkpointer.load(), **job.result()}
        job.checkpointer.close()
    return out


def seed_run(rank: int, world: int, base: str) -> dict[str, Any]:
    """``create_seed_checkpoint``: torchtitan's ``train.py`` saves step 0 as the last step, in
    one process, from an unsharded model."""
    job = Job(rank, world, f"{base}/seed", ckpt={"create_seed_checkpoint": True}, shard=False)
    job.checkpointer.save(curr_step=0, last_step=True)
    job.checkpointer.close()
    return job.result()


def field_runs(rank: int, world: int, base: str) -> dict[str, Any]:
    """One short job per base Config field (and shardckpt's own options)."""
    out: dict[str, Any] = {}
    out["keep"] = Job(rank, world, f"{base}/keep", ckpt={
        "interval": 2, "keep_latest_k": 2, "last_save_model_only": False,
        "replicas": [f"{base}/keep-replica"], "compression": "zstd", "snapshot": "lazy",
        "on_error": "warn", "async_mode": "async"}).train()
    out["first"] = Job(rank, world, f"{base}/first", ckpt={
        "interval": 4, "enable_first_step_checkpoint": True, "async_mode": "disabled"}).train(
            stop=5)
    out["load_only"] = Job(rank, world, f"{base}/first",
                           ckpt={"interval": 1, "load_only": True}).train(stop=7)
    out["load_step"] = Job(rank, world, f"{base}/first",
                           ckpt={"load_step": 1, "load_only": True}).train(stop=1)
    out["no_loader"] = Job(rank, world, f"{base}/first", ckpt={
        "exclude_from_loading": ["dataloader"], "load_only": True}).train(stop=4)
    out["no_optim"] = Job(rank, world, f"{base}/first", ckpt={
        "exclude_from_loading": ["optimizer", "lr_scheduler"], "load_only": True}).train(stop=4)
    fresh = Job(rank, world, f"{base}/fresh", ckpt={"enable": False})
    out["fresh"] = fresh.result()
    job = Job(rank, world, f"{base}/from_root", ckpt={"initial_load_path": root_of(f"{base}/keep")})
    out["from_root"] = {"loaded": job.checkpointer.load(), **job.result()}
    job.checkpointer.close()
    out["last"] = Job(rank, world, f"{base}/last",
                      ckpt={"interval": 5, "export_dtype": "bfloat16"}).train()
    out["seed"] = Job(rank, world, f"{base}/seed", ckpt={"load_only": True}).train(stop=0)
    if rank == 0:
        hf_config().save_pretrained(f"{base}/hf/assets")
    dist.barrier()
    out["hf"] = Job(rank, world, f"{base}/hf", ckpt={"interval": 5,
                                                     "last_save_in_hf": True}).train()
    hf_dir = os.path.join(root_of(f"{base}/hf"), "hf", f"step-{TOTAL}")
    job = Job(rank, world, f"{base}/from_hf", ckpt={
        "initial_load_path": hf_dir, "initial_load_in_hf": True})
    out["from_hf"] = {"loaded": job.checkpointer.load(), **job.result()}
    job.checkpointer.close()
    return out


# ------------------------------------------- the backend's shardckpt options (session 8)

INCREMENTAL = {"interval": 3, "keep_latest_k": 0, "incremental": True, "full_every": 0,
               "async_mode": "async"}


def local_tier(base: str, rank: int) -> dict[str, Any]:
    """Persistent every 5 steps, node-local every 2; each rank its own node (local_node), so
    that each rank's files have a copy on the other node. Blocking saves: an async local save
    due while the previous one still runs is skipped, which would make the steps vary."""
    return {"interval": 5, "keep_latest_k": 0, "local_path": f"{base}/local/{{node}}",
            "local_every": 2, "local_keep": 2, "local_node": str(rank),
            "async_mode": "disabled"}


def option_runs(rank: int, world: int, base: str) -> dict[str, Any]:
    """The uninterrupted reference (first layer frozen); an incremental job stopped after
    step 7 (saves at 3 and 6) and resumed; a job with a node-local tier stopped after step 7
    (persistent step 5, local steps 4 and 6) and resumed, from local step 6."""
    out: dict[str, Any] = {"ref": Job(rank, world, f"{base}/ref", ckpt={"enable": False},
                                      freeze=True).train()}
    for name, ckpt in (("inc", INCREMENTAL), ("local", local_tier(base, rank))):
        out[f"{name}_first"] = Job(rank, world, f"{base}/{name}", ckpt=ckpt,
                                   freeze=True).train(stop=7)
        job = Job(rank, world, f"{base}/{name}", ckpt=ckpt, freeze=True)
        if name == "local":
            out["local_steps"] = job.checkpointer.manager.steps(tier="local")
            out["persistent_steps"] = job.checkpointer.manager.steps()
        out[name] = job.train()
    return out


# ------------------------------------------- a user trial of the backend (session 8, issue 29)

FINISHED = {"interval": 3, "keep_latest_k": 0, "export_dtype": "bfloat16"}  # last: model-only
NOT_MODEL = ["dataloader", "lr_scheduler", "optimizer", "train_state"]


def _refusal(job_or_build: Any, load: bool = True) -> dict[str, Any] | None:
    """The ShardckptError of building a job (a callable) or of its load (a Job), or None."""
    from shardckpt.errors import ShardckptError

    job = None
    try:
        job = job_or_build() if callable(job_or_build) else job_or_build
        if load:
            job.checkpointer.load(step=job.config.load_step)
    except ShardckptError as exc:
        return {"type": type(exc).__name__, "msg": str(exc),
                "step": None if job is None else job.train_state.step}
    finally:
        if job is not None:
            job.checkpointer.close()
    return None


def trial_runs(rank: int, world: int, base: str) -> dict[str, Any]:
    """A finished run (last step 10 model-only, bfloat16) relaunched, resumed at it by
    load_step, loaded model-only on purpose, fine-tuned from; resumed from an older step into
    the same folder; a finished run with last_save_in_hf relaunched; a DCP run's folder as
    checkpoint.folder and as initial_load_path."""
    from shardckpt.integrations.torchtitan_guard import TitanSaveError

    out: dict[str, Any] = {}
    fin = Job(rank, world, f"{base}/fin", ckpt=FINISHED)
    out["fin"] = fin.train()
    out["fin_bf16"] = digest({k: v.to(torch.bfloat16).to(torch.float32)
                              for k, v in fin.model.state_dict().items()})
    out["relaunch"] = _refusal(Job(rank, world, f"{base}/fin", ckpt=FINISHED))
    out["explicit"] = _refusal(Job(rank, world, f"{base}/fin",
                                   ckpt={**FINISHED, "load_step": TOTAL}))
    job = Job(rank, world, f"{base}/fin", ckpt={**FINISHED, "load_step": TOTAL,
                                                "exclude_from_loading": NOT_MODEL})
    out["excluded"] = {"loaded": job.checkpointer.load(step=TOTAL), **job.result()}
    job.checkpointer.close()
    job = Job(rank, world, f"{base}/tune", ckpt={"initial_load_path": root_of(f"{base}/fin")})
    out["tune"] = {"loaded": job.checkpointer.load(), **job.result()}
    job.checkpointer.close()
    job = Job(rank, world, f"{base}/fin", ckpt={**FINISHED, "load_step": 6})
    try:
        job.train()
    except TitanSaveError as exc:
        out["older"] = {"msg": str(exc), "step": job.train_state.step}
    job.checkpointer.close()
    if rank == 0:
        hf_config().save_pretrained(f"{base}/hf/assets")
    dist.barrier()
    hf = {"interval": 5, "keep_latest_k": 0, "last_save_in_hf": True}
    Job(rank, world, f"{base}/hf", ckpt=hf).train()
    out["hf"] = _refusal(Job(rank, world, f"{base}/hf", ckpt=hf))
    Job(rank, world, f"{base}/dcp", "dcp", RESUMABLE).train(stop=3)
    out["dcp_folder"] = _refusal(lambda: Job(rank, world, f"{base}/dcp"), load=False)
    out["dcp_root"] = _refusal(Job(rank, world, f"{base}/dcp_root", ckpt={
        "initial_load_path": root_of(f"{base}/dcp"), "trust_dcp_pickle": True}))
    return out
