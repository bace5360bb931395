"""``shardckpt.integrations.lightning`` with the real ``lightning`` package, on CPU.

Each resume test trains a reference run without interruption, then the same training stopped
after a step (the last checkpoint before it is what survives), then a fresh ``fit`` with the same
configuration, and compares the resumed run with the reference bitwise: losses, weights,
optimizer and scheduler state, loop progress, another callback's state. The runnable example
``docs/examples/lightning_resume.py`` runs as a user runs it, on 1 device and on 2 (DDP).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import shardckpt
from shardckpt.integrations.lightning import ShardckptCallback

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "docs" / "examples" / "lightning_resume.py"
STEPS = 8  # 24 samples in batches of 4: 6 steps per epoch


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 1))
        self.losses: dict[int, float] = {}

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses[self.global_step + 1] = loss.item()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optim = torch.optim.AdamW(self.parameters(), lr=0.02)
        sched = torch.optim.lr_scheduler.StepLR(optim, step_size=3, gamma=0.7)
        return {"optimizer": optim, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Data(L.LightningDataModule):
    """A datamodule with state of its own: how many loaders it has built."""

    def __init__(self, stateful_loader: bool) -> None:
        super().__init__()
        self.stateful_loader = stateful_loader
        self.built = 0

    def train_dataloader(self) -> DataLoader:
        self.built += 1
        g = torch.Generator().manual_seed(3)
        x = torch.randn(24, 6, generator=g)
        data = TensorDataset(x, x.sum(dim=1, keepdim=True))
        if self.stateful_loader:  # resumes mid-epoch at the next batch
            return StatefulDataLoader(data, batch_size=4, shuffle=True)
        # a plain loader's sampler draws each epoch's order from torch's global RNG
        return DataLoader(data, batch_size=4, shuffle=True)

    def state_dict(self) -> dict[str, Any]:
        return {"built": self.built}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.built = state["built"]


class BatchCounter(L.Callback):
    """Another callback with state (a count and a tensor) that the checkpoint must carry."""

    def __init__(self) -> None:
        self.batches = 0
        self.total = torch.zeros(())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batches += 1
        self.total += outputs["loss"].detach()

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "total": self.total.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches, self.total = state["batches"], state["total"].clone()


class StopAfter(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def fit(tmp: Path, callbacks: list[L.Callback], stateful_loader: bool = True,
        ckpt_path: str | None = None) -> tuple[Net, L.Trainer]:
    L.seed_everything(0, verbose=False)
    model = Net()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp),
                        # a ShardckptCallback is a Checkpoint: no ModelCheckpoint is added then
                        enable_checkpointing=any(isinstance(c, ShardckptCallback)
                                                 for c in callbacks),
                        callbacks=callbacks)
    trainer.fit(model, datamodule=Data(stateful_loader), ckpt_path=ckpt_path)
    return model, trainer


def optimizer_tensors(trainer: L.Trainer) -> list[torch.Tensor]:
    state = trainer.optimizers[0].state_dict()["state"]
    return [v for k in sorted(state) for v in state[k].values() if isinstance(v, torch.Tensor)]


def assert_same_run(resumed: tuple[Net, L.Trainer], reference: tuple[Net, L.Trainer],
                    first_step: int) -> None:
    (model, trainer), (ref_model, ref_trainer) = resumed, reference
    assert sorted(model.losses) == list(range(first_step, STEPS + 1))
    assert {s: model.losses[s] for s in model.losses} == \
        {s: ref_model.losses[s] for s in model.losses}  # floats compared exactly
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(optimizer_tensors(trainer), optimizer_tensors(ref_trainer), strict=True):
        assert torch.equal(a, b)
    sched, ref_sched = (t.lr_scheduler_configs[0].scheduler for t in (trainer, ref_trainer))
    assert sched.state_dict() == ref_sched.state_dict()
    assert (trainer.global_step, trainer.current_epoch) == \
        (ref_trainer.global_step, ref_trainer.current_epoch)


def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path: Path) -> None:
    root, replica = str(tmp_path / "ckpt"), str(tmp_path / "replica")
    ref_counter = BatchCounter()
    reference = fit(tmp_path, [ref_counter])
    kwargs = {"every_n_train_steps": 2, "replicas": [replica], "metrics": ["train_loss"],
              "retention": shardckpt.RetentionPolicy(keep_last=2)}
    fit(tmp_path, [StopAfter(5), BatchCounter(), ShardckptCallback(root, **kwargs)])

    counter, ckpt = BatchCounter(), ShardckptCallback(root, **kwargs)
    resumed = fit(tmp_path, [counter, ckpt])
    assert ckpt.resumed_step == 4  # step 5 was lost with the stopped run
    assert_same_run(resumed, reference, first_step=5)
    assert counter.batches == ref_counter.batches == STEPS
    assert torch.equal(counter.total, ref_counter.total)
    assert resumed[1].datamodule.built == 2  # 1 restored, and the resumed fit built one more
    for location in (root, replica):  # retention applied at both locations; metric recorded
        with shardckpt.CheckpointManager(location) as mgr:
            assert mgr.steps() == [6, 8]
            assert mgr.info(8).metrics["train_loss"] == resumed[0].losses[8]
            assert mgr.info(8).world_size == 1


def test_resume_at_epoch_end_restores_rng_before_the_next_epoch(tmp_path: Path) -> None:
    """The checkpoint ends epoch 0; the plain loader draws epoch 1's order from the global RNG
    when Lightning starts its iterator, which must happen with the checkpoint's RNG."""
    root = str(tmp_path / "ckpt")
    reference = fit(tmp_path, [], stateful_loader=False)
    fit(tmp_path, [StopAfter(7), ShardckptCallback(root, every_n_train_steps=6)],
        stateful_loader=False)
    ckpt = ShardckptCallback(root, every_n_train_steps=6)
    resumed = fit(tmp_path, [ckpt], stateful_loader=False)
    assert ckpt.resumed_step == 6
    assert_same_run(resumed, reference, first_step=7)
    with shardckpt.CheckpointManager(root) as mgr:  # save_last: the final step is kept too
        assert mgr.steps() == [6, 8]


class CrashAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step + 1 == self.step:
            raise RuntimeError(f"simulated crash in step {self.step}")


def test_fit_that_crashes_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    reference = fit(tmp_path, [])
    crashed = ShardckptCallback(root, every_n_train_steps=2)
    with pytest.raises(RuntimeError, match="simulated crash in step 6"):
        fit(tmp_path, [CrashAt(6), crashed])
    assert crashed.manager is None  # closed on the exception: step 4's save has committed
    ckpt = ShardckptCallback(root, every_n_train_steps=2)
    resumed = fit(tmp_path, [ckpt])
    assert ckpt.resumed_step == 4
    assert_same_run(resumed, reference, first_step=5)


class NoScheduler(Net):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.02)


def test_finished_run_is_not_trained_again_and_ckpt_path_conflicts(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    model, trainer = fit(tmp_path, [ShardckptCallback(root, every_n_train_steps=4)])
    assert sorted(model.losses) == list(range(1, STEPS + 1))
    lightning_ckpt = str(tmp_path / "lightning.ckpt")
    trainer.save_checkpoint(lightning_ckpt)

    again = ShardckptCallback(root, every_n_train_steps=4)
    model, _ = fit(tmp_path, [again])
    assert again.resumed_step == STEPS and model.losses == {}  # max_steps already reached

    L.seed_everything(0, verbose=False)
    changed = L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ShardckptCallback(root, every_n_train_steps=4)])
    with pytest.raises(ValueError, match="holds 1 LR schedulers, this LightningModule "
                                         "configures 0"):
        changed.fit(NoScheduler(), datamodule=Data(True))

    with pytest.raises(ValueError, match="resume from one of them"):
        fit(tmp_path, [ShardckptCallback(root, every_n_train_steps=4)], ckpt_path=lightning_ckpt)
    # resume=False: Lightning's own checkpoint is restored and no shardckpt load happens
    quiet = ShardckptCallback(root, resume=False)
    model, _ = fit(tmp_path, [quiet], ckpt_path=lightning_ckpt)
    assert quiet.resumed_step is None and model.losses == {}


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="every_n_train_steps"):
        ShardckptCallback("unused", every_n_train_steps=0)
    with pytest.raises(TypeError, match="every_n_train_steps"):
        ShardckptCallback("unused", save_every=10)


def test_importing_shardckpt_imports_no_framework() -> None:
    code = ("import sys, shardckpt, shardckpt.integrations, shardckpt.cli.main\n"
            "loaded = [m for m in ('lightning', 'pytorch_lightning', 'transformers') "
            "if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("devices", [1, 2])
def test_example(tmp_path: Path, devices: int) -> None:
    """docs/examples/lightning_resume.py as a user runs it; with 2 devices, DDP over 2 CPU
    processes launched by Lightning."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path), "--devices", str(devices)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in range(devices):
        assert f"rank {rank}: resumed from step 6, steps 7-12: losses equal, weights equal" \
            in proc.stdout
    assert "checkpoints kept: [9, 12]" in proc.stdout
    assert "OK: the resumed run matches the uninterrupted one bitwise" in proc.stdout
