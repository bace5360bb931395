"""``shardckpt.integrations.transformers`` with the real ``transformers.Trainer``, on CPU.

A tiny ``LlamaForCausalLM`` from a config (nothing downloaded), a synthetic dataset, ``report_to``
empty. Resume tests compare a resumed run with an uninterrupted one bitwise. The mid-epoch case
is the runnable example ``docs/examples/transformers_trainer_resume.py``, run here as a user runs
it: alone, and as a 2-rank DDP job under ``torchrun``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_torchrun
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import ExportableState

import shardckpt
from shardckpt.integrations.transformers import ShardckptCallback

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "docs" / "examples" / "transformers_trainer_resume.py"
STEPS = 9  # 24 samples in batches of 4: 6 steps per epoch


class RecordingTrainer(Trainer):
    losses: dict[int, float]

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.losses[self.state.global_step + 1] = loss.item()
        return loss


class Tally(TrainerCallback, ExportableState):
    """A stateful callback (like EarlyStoppingCallback): counts the steps it has seen."""

    def __init__(self, start: int = 0) -> None:
        self.start, self.seen = start, 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seen += 1

    def state(self) -> dict[str, Any]:
        return {"args": {"start": self.start}, "attributes": {"seen": self.seen}}


class StopAfter(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= self.step:
            control.should_training_stop = True


def make_trainer(out: Path, callbacks: list[TrainerCallback], save_steps: int = 6,
                 **args: Any) -> RecordingTrainer:
    set_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=16, attention_dropout=0.2)
    ids = torch.randint(0, 48, (24, 12), generator=torch.Generator().manual_seed(0))
    args = {"save_strategy": "steps", "save_steps": save_steps, **args}
    training_args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=3e-3,
        lr_scheduler_type="cosine", warmup_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, **args)
    trainer = RecordingTrainer(model=LlamaForCausalLM(config), args=training_args,
                               train_dataset=[{"input_ids": r, "labels": r} for r in ids],
                               callbacks=callbacks)
    trainer.losses = {}
    return trainer


def test_resume_at_epoch_end_matches_uninterrupted_run(tmp_path: Path) -> None:
    """Step 6 ends the first epoch: the RNG goes back before the next epoch's data iterator."""
    root = str(tmp_path / "ckpt")
    reference = make_trainer(tmp_path / "ref", [], save_strategy="no")
    reference.train()

    first_ckpt = ShardckptCallback(root)
    first = make_trainer(tmp_path / "out", [StopAfter(7), Tally(), first_ckpt],
                         restore_callback_states_from_checkpoint=True)
    assert first_ckpt.prepare_resume(first) is None  # called on every run, a no-op on the first
    first.train()
    ckpt = ShardckptCallback(root, retention=shardckpt.RetentionPolicy(keep_last=1))
    resumed = make_trainer(tmp_path / "out", [Tally(), ckpt],
                           restore_callback_states_from_checkpoint=True)
    resume_dir = ckpt.prepare_resume(resumed)
    resumed.train(resume_from_checkpoint=resume_dir)

    assert ckpt.resumed_step == 6
    assert resume_dir == str(tmp_path / "out" / "shardckpt-resume")
    assert sorted(os.listdir(resume_dir)) == ["config.json", "generation_config.json",
                                              "model.safetensors", "trainer_state.json"]
    assert sorted(resumed.losses) == list(range(7, STEPS + 1))
    assert resumed.losses == {s: reference.losses[s] for s in resumed.losses}
    for a, b in zip(resumed.model.state_dict().values(), reference.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert resumed.lr_scheduler.state_dict() == reference.lr_scheduler.state_dict()
    assert resumed.state.global_step == STEPS and resumed.state.epoch == reference.state.epoch
    # the stateful callback's count as of step 6 was saved, and the Trainer restored it
    tally = next(cb for cb in resumed.callback_handler.callbacks if isinstance(cb, Tally))
    assert tally.seen == STEPS
    # the Trainer wrote no checkpoint-N directory of its own; retention kept the newest
    assert sorted(os.listdir(tmp_path / "out")) == ["shardckpt-resume"]
    with shardckpt.CheckpointManager(root) as mgr:
        assert mgr.steps() == [STEPS]


def test_trainer_checkpoints_kept_on_request_and_metrics_recorded(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    ckpt = ShardckptCallback(root, metrics=["loss", "grad_norm"], keep_trainer_checkpoints=True)
    trainer = make_trainer(tmp_path / "out", [ckpt], save_steps=4, logging_steps=1)
    assert ckpt.prepare_resume(trainer) is None  # nothing to resume from yet
    trainer.train()
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-4", "checkpoint-8",
                                                    "checkpoint-9"]
    with shardckpt.CheckpointManager(root) as mgr:
        assert mgr.steps() == [4, 8, 9]
        metrics = mgr.info(8).metrics
    # saved at the end of step 8, before that step is logged: the latest logged values
    step7 = next(e for e in trainer.state.log_history if e.get("step") == 7)
    assert metrics == {"loss": step7["loss"], "grad_norm": step7["grad_norm"]}


def test_training_into_a_used_root_without_resuming_is_refused(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    make_trainer(tmp_path / "out", [StopAfter(6), ShardckptCallback(root)]).train()
    fresh = make_trainer(tmp_path / "out", [ShardckptCallback(root)])
    with pytest.raises(ValueError, match="prepare_resume"):
        fresh.train()
    elsewhere = str(tmp_path / "resume-here")
    assert ShardckptCallback(root, resume_dir=elsewhere).prepare_resume(fresh) == elsewhere
    assert "trainer_state.json" in os.listdir(elsewhere)


def test_deepspeed_and_fsdp_trainers_are_refused(tmp_path: Path) -> None:
    """A real tiny Trainer: the flags read are the ones the Trainer has (plain here), and set as
    accelerate sets them under DeepSpeed or FSDP (neither runs on a CPU-only box)."""
    root = str(tmp_path / "ckpt")
    trainer = make_trainer(tmp_path / "out", [])
    assert trainer.is_deepspeed_enabled is False and trainer.is_fsdp_enabled is False
    assert ShardckptCallback(root).prepare_resume(trainer) is None
    for flag in ("is_deepspeed_enabled", "is_fsdp_enabled"):
        trainer = make_trainer(tmp_path / "out", [])
        setattr(trainer, flag, True)
        with pytest.raises(NotImplementedError, match="DeepSpeed and FSDP"):
            ShardckptCallback(root).prepare_resume(trainer)


def test_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="save_steps"):
        ShardckptCallback("unused", save_every=3)


def test_example_resumes_mid_epoch_bitwise(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0: resumed from step 3, steps 4-10: losses equal, weights equal" in proc.stdout
    assert "checkpoints kept: [9, 10]" in proc.stdout
    assert "OK: the resumed run matches the uninterrupted one bitwise" in proc.stdout


def test_example_under_torchrun_two_processes(tmp_path: Path) -> None:
    """The same example as a DDP job: 2 ranks on gloo, each rank's run compared bitwise."""
    proc = run_torchrun(EXAMPLE, 2, [str(tmp_path)], timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: resumed from step 3, steps 4-10: losses equal, weights equal" \
            in proc.stdout
    assert "OK: the resumed run matches the uninterrupted one bitwise" in proc.stdout
