"""Safe by default (issue 24): the default snapshot mode commits the state at ``save()`` whatever
the script writes afterwards; lazy is an opt-in whose contract is enforced where it can be."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import shardckpt
from shardckpt.engine import lazy
from shardckpt.errors import TornSnapshotError


class HeldCopies:
    """Lazy CPU copies wait until ``release()`` (a no-op under eager, which copies in save)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.go = threading.Event()
        real = lazy.copy_cpu

        def held(job: lazy.CopyJob) -> None:
            assert self.go.wait(120), "the copies were never released"
            real(job)

        monkeypatch.setattr(lazy, "copy_cpu", held)

    def hold(self) -> None:
        self.go.clear()

    def release(self) -> None:
        self.go.set()


def snapshot_of(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, obj in state.items():
        if isinstance(obj, nn.Module):
            out.update({f"{name}/{k}": v.detach().clone() for k, v in obj.state_dict().items()})
        else:
            for i, st in enumerate(obj.state.values()):
                out.update({f"{name}/{i}/{k}": v.clone() for k, v in st.items()
                            if isinstance(v, torch.Tensor)})
    return out


def committed(mgr: shardckpt.CheckpointManager, step: int, make: Any) -> dict[str, torch.Tensor]:
    state = make(seed=1234)
    mgr.load(state, step=step, restore_rng=False)
    return snapshot_of(state)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k} differs from the state at save()"


# ------------------------------------------------------------------- diffusers-style EMA swap
def make_mlp(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(12)])  # 24 tensors
    return {"model": model, "optim": torch.optim.SGD(model.parameters(), lr=0.1)}


def train_step(state: dict[str, Any], x: torch.Tensor) -> None:
    state["model"](x).square().mean().backward()
    state["optim"].step()
    state["optim"].zero_grad()


def test_ema_swap_through_data_right_after_save_commits_the_state_of_save(
        tmp_path: Path, monkeypatch) -> None:
    held = HeldCopies(monkeypatch)
    state = make_mlp()
    model = state["model"]
    ema = [p.detach().clone() for p in model.parameters()]
    expected: dict[int, dict[str, torch.Tensor]] = {}
    with shardckpt.CheckpointManager(str(tmp_path)) as mgr:  # the default mode
        for step in (1, 2, 3):
            held.hold()
            train_step(state, torch.randn(4, 16))
            for e, p in zip(ema, model.parameters(), strict=True):
                e.mul_(0.9).add_(p.detach(), alpha=0.1)
            expected[step] = snapshot_of(state)
            handle = mgr.save(step, state)
            # EMAModel.store / copy_to: the EMA weights go in through .data for validation
            stored = [p.detach().clone() for p in model.parameters()]
            for e, p in zip(ema, model.parameters(), strict=True):
                p.data.copy_(e)
            held.release()  # a lazy copy would run during the validation pass
            with torch.no_grad():
                model(torch.randn(4, 16))
            handle.wait()
            for s, p in zip(stored, model.parameters(), strict=True):  # EMAModel.restore
                p.data.copy_(s)
        for step in (1, 2, 3):
            assert_same(committed(mgr, step, make_mlp), expected[step])


# ------------------------------------------------------------------- nn.Embedding(max_norm)
class Renormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 8, max_norm=1.0)  # renormalises its rows in forward
        self.head = nn.Linear(8, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(idx)).sum()


def make_embedding(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = Renormed()
    with torch.no_grad():
        model.emb.weight.mul_(5)  # rows above max_norm: every lookup rewrites them
    return {"model": model, "optim": torch.optim.AdamW(model.parameters(), lr=0.01)}


def run_embedding(root: Path, monkeypatch, **kwargs: Any) -> tuple[list[int], dict, Any]:
    held = HeldCopies(monkeypatch)
    state = make_embedding()
    expected: dict[int, dict[str, torch.Tensor]] = {}
    mgr = shardckpt.CheckpointManager(str(root), **kwargs)
    for step in range(1, 11):
        idx = torch.randint(0, 32, (16,))
        out = state["model"](idx)
        held.release()  # a lazy copy runs after the forward that renormalised the rows
        out.backward()
        state["optim"].step()
        state["optim"].zero_grad()
        if step % 2 == 0:
            held.hold()
            expected[step] = snapshot_of(state)
            mgr.save(step, state)
    held.release()
    mgr.wait()
    return mgr.steps(), expected, mgr


def test_embedding_with_max_norm_checkpoints_exactly_by_default(tmp_path: Path,
                                                                monkeypatch) -> None:
    steps, expected, mgr = run_embedding(tmp_path, monkeypatch)
    with mgr:
        assert steps == [2, 4, 6, 8, 10]
        for step in steps:
            assert_same(committed(mgr, step, make_embedding), expected[step])


def test_embedding_with_max_norm_under_lazy_warn_loses_at_most_one_save(tmp_path: Path,
                                                                        monkeypatch) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps, expected, mgr = run_embedding(tmp_path, monkeypatch, snapshot="lazy",
                                             on_error="warn")
    with mgr:
        assert len(steps) >= 4 and len(mgr.failed_saves) <= 1
        for step in steps:
            assert_same(committed(mgr, step, make_embedding), expected[step])


def test_embedding_with_max_norm_under_lazy_raise_commits_every_save(tmp_path: Path,
                                                                      monkeypatch) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps, expected, mgr = run_embedding(tmp_path, monkeypatch, snapshot="lazy")
    with mgr:  # copied inside save() from the start: nothing to tear, nothing raised
        assert steps == [2, 4, 6, 8, 10] and mgr.failed_saves == []
        for step in steps:
            assert_same(committed(mgr, step, make_embedding), expected[step])


def test_lazy_copies_weights_written_in_forward_inside_save() -> None:
    model = Renormed()
    assert lazy.written_in_forward({"m": model}) == {lazy.storage_ptr(model.emb.weight)}
    assert lazy.written_in_forward({"m": nn.Embedding(4, 2)}) == set()


# ------------------------------------------------------------------- the lazy contract
def test_lazy_warns_its_contract_once_per_process(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(lazy, "_contract_warned", False)
    with pytest.warns(UserWarning, match="nothing but an optimizer step"):
        shardckpt.CheckpointManager(str(tmp_path / "a"), snapshot="lazy").close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shardckpt.CheckpointManager(str(tmp_path / "b"), snapshot="lazy").close()
        shardckpt.CheckpointManager(str(tmp_path / "c")).close()


def test_lazy_torn_save_raises_and_the_key_is_then_copied_inside_save(tmp_path: Path,
                                                                      monkeypatch) -> None:
    held = HeldCopies(monkeypatch)
    state = make_mlp()
    weight = state["model"][0].weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mgr = shardckpt.CheckpointManager(str(tmp_path), snapshot="lazy")  # on_error="raise"
    with mgr:
        handle = mgr.save(1, state)
        with torch.no_grad():
            weight.mul_(2)  # outside an optimizer step, before the copy
        held.release()
        with pytest.raises(TornSnapshotError, match=r"0\.weight"), \
                pytest.warns(UserWarning, match=r"copied inside save\(\).*model/0\.weight"):
            handle.wait()
        assert mgr.steps() == []  # nothing wrong is committed
        held.hold()
        expected = snapshot_of(state)
        handle = mgr.save(2, state)
        with torch.no_grad():
            weight.mul_(2)  # the same write again: this key was copied inside save()
        held.release()
        handle.wait()
        assert mgr.steps() == [2]
        assert_same(committed(mgr, 2, make_mlp), expected)
