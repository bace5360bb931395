"""``load(..., verify_golden=True)`` (issue 28): the golden batches saved with a step are replayed
through the restored model; a step whose outputs differ is skipped (every rank together) for the
next candidate, from the local tier or the persistent one. The replay leaves the module's train
mode and every RNG stream as the restore left them. One process here; the collective agreement
is the same code as every other fallback (``gather_failures``)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

import shardckpt
import shardckpt.extras as extras
from shardckpt.tier.goldencheck import GoldenMismatchError


class Noisy(nn.Module):
    """A linear layer whose forward draws from the global RNG (without changing its output):
    a replay that did not restore the RNG streams would shift the training that follows."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + 0.0 * torch.rand(1)


GOLDEN = shardckpt.Golden([torch.arange(8.0).reshape(2, 4)])


def wrong_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next saves record golden outputs the model does not give (what a restore that
    loaded the wrong bytes, or a changed model, would show)."""
    real = extras.record_golden

    def shifted(golden: Any, state: Any) -> dict[str, Any]:
        rec = real(golden, state)
        return {**rec, "outputs": [o + 1.0 for o in rec["outputs"]]}

    monkeypatch.setattr(extras, "record_golden", shifted)


def save_steps(mgr: shardckpt.CheckpointManager, model: nn.Module,
               monkeypatch: pytest.MonkeyPatch) -> dict[int, Any]:
    """Step 1 with true golden outputs, step 2 with wrong ones; each step's weights and the
    global RNG state at its save."""
    seen = {}
    for step in (1, 2):
        with torch.no_grad():
            model.lin.weight.fill_(float(step))
        if step == 2:
            wrong_outputs(monkeypatch)
        seen[step] = (model.lin.weight.clone(), torch.get_rng_state())
        mgr.save(step, {"model": model}, golden=GOLDEN)
    monkeypatch.undo()
    return seen


def test_a_local_step_whose_golden_outputs_differ_falls_back(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    with pytest.warns(UserWarning, match="single node"):
        mgr = shardckpt.CheckpointManager(
            str(tmp_path / "p"), save_every=100, async_save=False,
            local=shardckpt.LocalTier(str(tmp_path / "{node}"), every=1, copies=1, keep=2,
                                      node="solo"))
    model = Noisy()
    with mgr:
        seen = save_steps(mgr, model, monkeypatch)
        assert mgr.load({"model": model}) == 2  # unverified: the newest
        model.train()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert mgr.load({"model": model}, verify_golden=True) == 1
        assert mgr.last_load_profile["tier"] == "local"
    (warning,) = [str(w.message) for w in caught if str(w.message).startswith("restored")]
    assert warning.startswith("restored local step 1; newer candidates were skipped: local "
                              "step 2: ")
    assert "golden batch 0 of 1 differs" in warning
    assert torch.equal(model.lin.weight.detach(), seen[1][0])
    assert model.training  # the replay ran in eval mode and put train mode back
    assert torch.equal(torch.get_rng_state(), seen[1][1])  # as saved: the replay drew nothing


def test_persistent_steps_are_replayed_too(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model = Noisy()
    with shardckpt.CheckpointManager(str(tmp_path), async_save=False) as mgr:
        seen = save_steps(mgr, model, monkeypatch)
        with pytest.warns(UserWarning, match="restored persistent step 1; newer steps failed "
                                             "their load or golden replay: persistent step 2"):
            assert mgr.load({"model": model}, verify_golden=True) == 1
        assert torch.equal(model.lin.weight.detach(), seen[1][0])
        with pytest.raises(GoldenMismatchError, match="persistent step 2 failed its golden"):
            mgr.load({"model": model}, step=2, verify_golden=True)
        mgr.save(3, {"model": model})
        with pytest.raises(GoldenMismatchError, match="saved without golden batches"):
            mgr.load({"model": model}, step=3, verify_golden=True)
        assert mgr.load({"model": model}, step=1, verify_golden=True) == 1
        assert mgr.load({"model": model}) == 3  # without verification: as before
        assert "__shardckpt_golden__" not in mgr.last_load_profile


def test_an_fsdp_job_replays_collectively_and_falls_back_together(tmp_path: Path) -> None:
    import tier_targets as T
    from harness import run_ranks

    with T.forked_ranks():
        out = run_ranks(T.golden_fallback, 2, str(tmp_path), timeout=120,
                        env={"OMP_NUM_THREADS": "1", "SHARDCKPT_COLLECTIVE_TIMEOUT": "30"})
    assert [(r["step"], r["tier"], r["exact"]) for r in out] == [(1, "local", True)] * 2
    (warning,) = [w for w in out[0]["warnings"] if w.startswith("restored")]
    assert "local step 2" in warning and "golden batch 0 of 1 differs" in warning
