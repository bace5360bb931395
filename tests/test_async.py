"""The asynchronous engine: snapshot isolation, memory budget, error surfacing, ordering."""

from __future__ import annotations

import threading

import pytest
import torch

import shardckpt
from shardckpt.engine.pipeline import PipelineConfig
from shardckpt.format.shard import Codec
from shardckpt.storage.location import LocalLocation


def make_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(1000, 257, generator=g), "b": torch.randint(0, 9, (4097,),
                                                                         generator=g),
            "nested": {"c": torch.randn(33, generator=g).to(torch.bfloat16), "n": 3}}


def clone(state: dict) -> dict:
    return {"a": state["a"].clone(), "b": state["b"].clone(),
            "nested": {"c": state["nested"]["c"].clone(), "n": state["nested"]["n"]}}


def zeros_like(state: dict) -> dict:
    return {"a": torch.zeros_like(state["a"]), "b": torch.zeros_like(state["b"]),
            "nested": {"c": torch.zeros_like(state["nested"]["c"]), "n": 0}}


def assert_same(x: dict, y: dict) -> None:
    for k in ("a", "b"):
        assert torch.equal(x[k], y[k])
    assert torch.equal(x["nested"]["c"], y["nested"]["c"])
    assert x["nested"]["n"] == y["nested"]["n"]


def test_training_may_mutate_right_after_save_returns(tmp_path) -> None:
    state = make_state()
    expected = clone(state)
    with shardckpt.CheckpointManager(str(tmp_path)) as mgr:
        handle = mgr.save(1, state)
        # mutate everything immediately, in place, as an optimizer step would
        state["a"].add_(1.0)
        state["b"].zero_()
        state["nested"]["c"].mul_(-2)
        state["nested"]["n"] = 99
        assert handle.wait().step == 1
        got = zeros_like(state)
        mgr.load(got, step=1)
    assert_same(got, expected)


def test_staging_buffers_are_reused_across_saves(tmp_path) -> None:
    state = make_state()
    expected1 = clone(state)
    with shardckpt.CheckpointManager(str(tmp_path)) as mgr:
        mgr.save(1, state).wait()
        first = {k: v.data_ptr() for k, v in mgr._staging._buffers.items()}
        state["a"].add_(1)
        mgr.save(2, state).wait()
        second = {k: v.data_ptr() for k, v in mgr._staging._buffers.items()}
        assert first == second and {"a", "b", "nested/c"} <= set(first)
        # what a user sees: each step holds its own values, not the buffer's latest contents
        got1, got2 = zeros_like(state), zeros_like(state)
        mgr.load(got1, step=1)
        mgr.load(got2, step=2)
    assert_same(got1, expected1)
    assert torch.equal(got2["a"], state["a"]) and not torch.equal(got1["a"], got2["a"])


@pytest.mark.parametrize("budget", ["1000", "64K"])
def test_budget_smaller_than_a_tensor_still_saves(tmp_path, monkeypatch, budget: str) -> None:
    monkeypatch.setenv("SHARDCKPT_MEMORY_BUDGET", budget)
    state = make_state()
    largest = state["a"].numel() * 4
    config = PipelineConfig.plan(Codec("zstd:1"), 16 << 20, int(budget.replace("K", "")) *
                                 (1024 if "K" in budget else 1), 2)
    assert config.chunk_size * (config.window + 1) * 2 <= largest  # the plan fits the budget
    with shardckpt.CheckpointManager(str(tmp_path), compression="zstd:1") as mgr:
        mgr.save(1, state).wait()
        got = zeros_like(state)
        mgr.load(got)
    assert_same(got, state)


def test_pipeline_holds_at_most_the_window(monkeypatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from shardckpt.engine import pipeline as P

    live = []
    peak = [0]
    lock = threading.Lock()
    real = P.encode_chunk

    def counting(codec, raw):
        out = real(codec, raw)
        with lock:
            live.append(1)
            peak[0] = max(peak[0], len(live))
        return out

    monkeypatch.setattr(P, "encode_chunk", counting)
    config = PipelineConfig(Codec("zstd:1"), 1024, 3)
    data = memoryview(torch.randn(64 * 256).numpy()).cast("B")
    chunks = [data[i:i + 1024] for i in range(0, len(data), 1024)]
    with ThreadPoolExecutor(4) as pool:
        for _ in P.EncodePipeline(config, pool).encode(chunks):
            with lock:
                live.pop()
    assert peak[0] <= config.window + 1


def _failing_sink(self, relpath):
    raise OSError(28, "No space left on device (injected)")


def test_background_failure_surfaces_on_wait_and_next_save(tmp_path, monkeypatch) -> None:
    state = make_state()
    mgr = shardckpt.CheckpointManager(str(tmp_path))
    mgr.save(1, state).wait()
    monkeypatch.setattr(LocalLocation, "open_sink", _failing_sink)
    handle = mgr.save(2, state)  # returns: the failure happens in the background
    with pytest.raises(shardckpt.ShardckptError, match="No space left"):
        handle.wait()
    # ...and a failure not yet seen by anyone surfaces from the next save()
    mgr.save(3, state)
    with pytest.raises(shardckpt.ShardckptError, match="No space left"):
        mgr.save(4, state)  # raised once save 4 has started (issue 26)...
    with pytest.raises(shardckpt.ShardckptError, match="No space left"):
        mgr.wait()  # ...which fails too, on the same full disk
    monkeypatch.undo()
    mgr.save(5, state).wait()  # the next save works again
    assert mgr.steps() == [1, 5]
    with pytest.raises(shardckpt.ShardckptError, match="No space left"):
        failing = shardckpt.CheckpointManager(str(tmp_path / "other"))
        monkeypatch.setattr(LocalLocation, "open_sink", _failing_sink)
        failing.save(1, state)
        failing.wait()  # mgr.wait() raises it too
    mgr.close()


def set_step(state: dict, step: int) -> None:
    """Write step ``step``'s values into ``state`` in place, as training does between saves."""
    want = make_state(step)
    for k in ("a", "b"):
        state[k].copy_(want[k])
    state["nested"]["c"].copy_(want["nested"]["c"])
    state["nested"]["n"] = step


def test_consecutive_saves_commit_in_order(tmp_path) -> None:
    """Back-to-back async saves of a state changed in place between them: every tensor of every
    step is read back. A staging buffer shared by two saves in flight (save N+1 copying into
    what save N is still writing) gives step N some of step N+1's bytes."""
    state = make_state(1)
    order = []
    with shardckpt.CheckpointManager(str(tmp_path)) as mgr:
        handles = []
        for step in range(1, 6):
            set_step(state, step)
            handles.append(mgr.save(step, state))
        set_step(state, 99)  # training goes on while the last save is in flight
        for h in handles:
            info = h.wait()
            order.append((info.step, info.time))
        assert mgr.steps() == [1, 2, 3, 4, 5]
        times = [t for _, t in order]
        assert times == sorted(times)
        for step in range(1, 6):
            got = zeros_like(state)
            assert mgr.load(got, step=step) == step
            want = make_state(step)
            want["nested"]["n"] = step
            assert_same(got, want)


def test_close_waits_and_releases(tmp_path) -> None:
    state = make_state()
    mgr = shardckpt.CheckpointManager(str(tmp_path))
    handle = mgr.save(1, state)
    state["a"].add_(1.0)  # training goes on: the save must not see this
    mgr.close()
    assert handle.done() and mgr._staging.nbytes == 0
    with shardckpt.CheckpointManager(str(tmp_path)) as again:
        assert again.steps() == [1]
        got = zeros_like(state)
        assert again.load(got) == 1
    assert_same(got, make_state())
    with pytest.raises(shardckpt.ShardckptError, match="closed"):
        mgr.save(2, state)
