"""Lazy snapshots (issue 17): ``save`` returns before parameters and optimizer state are copied,
optimizer steps wait for the copy, and a tensor changed before its copy fails the save."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_ranks
from lazy_targets import torn_on_one_rank
from torch import nn

import shardckpt
from shardckpt.engine import lazy
from shardckpt.engine.snapshot import StagingPool
from shardckpt.planning.statedict import Collected, TensorLeaf, collect


class Gate:
    """Holds every lazy CPU copy until ``open()``; logs which thread copied which key."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened = threading.Event()
        self.log: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        real = lazy.copy_cpu

        def gated(job: lazy.CopyJob) -> None:
            assert self.opened.wait(120), "the gate was never opened"
            real(job)
            with self._lock:
                self.log.append((job.key, threading.current_thread().name))

        monkeypatch.setattr(lazy, "copy_cpu", gated)

    def open(self) -> None:
        self.opened.set()


def build(seed: int = 0, bn: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(8, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Linear(16, 3)]
    model = nn.Sequential(*layers)
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    train_step(model, optim)  # the optimizer state exists
    return model, optim


def train_step(model: nn.Module, optim: Any) -> None:
    forward_backward(model)
    optim.step()
    optim.zero_grad()


def forward_backward(model: nn.Module) -> None:
    model(torch.randn(4, 8)).square().sum().backward()


def values(model: nn.Module, optim: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v.clone() for k, v in model.state_dict().items()}
    for i, st in enumerate(optim.state.values() if optim is not None else ()):
        out.update({f"optim/{i}/{k}": v.clone() for k, v in st.items()})
    return out


def loaded(mgr: shardckpt.CheckpointManager, step: int, bn: bool = False,
           optim_too: bool = True) -> dict[str, Any]:
    model, optim = build(seed=99, bn=bn)
    mgr.load({"model": model, "optim": optim} if optim_too else {"model": model}, step=step)
    return values(model, optim if optim_too else None)


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_save_returns_before_the_copy_and_commits_the_state_of_save(tmp_path: Path,
                                                                    monkeypatch) -> None:
    gate = Gate(monkeypatch)
    model, optim = build()
    expected = values(model, optim)
    with shardckpt.CheckpointManager(str(tmp_path), snapshot="lazy") as mgr:
        handle = mgr.save(1, {"model": model, "optim": optim})
        assert gate.log == [] and not handle.done()  # returned with nothing copied
        forward_backward(model)  # the next forward and backward overlap the copy
        gate.open()
        assert handle.wait().step == 1
        assert {k for k, _ in gate.log} >= {"model/0.weight", "optim/state/0.weight/exp_avg"}
        assert_equal(loaded(mgr, 1), expected)
        assert lazy.inflight() == []


class StepThrough:
    """Optimizer wrappers that do not derive from Optimizer but step an inner one."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner

    def step(self) -> None:
        self.inner.step()


@pytest.mark.parametrize("how", ["in_state", "wrapped", "not_in_state"])
def test_optimizer_step_waits_for_the_copy(tmp_path: Path, monkeypatch, how: str) -> None:
    gate = Gate(monkeypatch)
    model, optim = build()
    expected = values(model, optim)
    in_hook = threading.Event()
    real_before_step = lazy.LazySnapshot.before_step

    def before_step(self: lazy.LazySnapshot) -> None:
        in_hook.set()
        real_before_step(self)

    monkeypatch.setattr(lazy.LazySnapshot, "before_step", before_step)
    order: list[str] = []
    optim.register_step_post_hook(lambda *_: order.append("stepped"))
    stepper = StepThrough(optim) if how == "wrapped" else optim
    state = {"model": model} if how == "not_in_state" else {"model": model, "optim": optim}
    with shardckpt.CheckpointManager(str(tmp_path), snapshot="lazy") as mgr:
        handle = mgr.save(1, state)
        forward_backward(model)
        trainer = threading.Thread(target=stepper.step, name="trainer")
        trainer.start()
        assert in_hook.wait(120)  # the step is inside its pre-hook, the copies are held
        assert order == [] and gate.log == []
        gate.open()
        trainer.join(120)
        assert order == ["stepped"]
        handle.wait()  # no TornSnapshotError: the step changed nothing before its copy
        with_optim = how != "not_in_state"
        got = loaded(mgr, 1, optim_too=with_optim)
        assert_equal(got, {k: v for k, v in expected.items() if with_optim or
                           k.startswith("model/")})
    assert not torch.equal(model[0].weight, expected["model/0.weight"])  # the step did happen


def test_an_unrelated_optimizer_steps_without_waiting(tmp_path: Path, monkeypatch) -> None:
    gate = Gate(monkeypatch)
    model, optim = build()
    other, other_optim = build(seed=3)  # a second model trained alongside, not saved
    with shardckpt.CheckpointManager(str(tmp_path), snapshot="lazy") as mgr:
        handle = mgr.save(1, {"model": model, "optim": optim})
        train_step(other, other_optim)  # would hang here, were it made to wait
        assert gate.log == [] and not handle.done()
        gate.open()
        handle.wait()


class Held:
    """An executor whose work runs only when the test says so (a copy thread not scheduled)."""

    def __init__(self) -> None:
        self.work: list[Any] = []

    def submit(self, fn: Any) -> None:
        self.work.append(fn)

    def run(self) -> None:
        for fn in self.work:
            fn()

    def shutdown(self, wait: bool = True) -> None:
        pass


def test_a_step_copies_what_the_copy_thread_has_not_started(tmp_path: Path) -> None:
    """A copy thread that is late (or gone) never holds training up for longer than the copy:
    the step's hook takes every copy not yet started."""
    model, optim = build()
    expected = values(model, optim)
    pool = StagingPool(lazy=True)
    pool._copier = Held()  # type: ignore[assignment]
    snap = pool.snapshot(collect({"model": model, "optim": optim}))
    assert isinstance(snap, lazy.LazySnapshot) and snap in lazy.inflight()
    train_step(model, optim)
    assert snap.done() and lazy.inflight() == [] and snap.waited_s > 0
    staged = {leaf.key: leaf.data for leaf in snap.ready().leaves}
    assert torch.equal(staged["model/0.weight"], expected["model/0.weight"])
    assert torch.equal(staged["optim/state/0.weight/exp_avg"], expected["optim/0/exp_avg"])
    assert not torch.equal(model[0].weight, expected["model/0.weight"])


def test_buffers_that_forward_updates_are_copied_inside_save(tmp_path: Path,
                                                             monkeypatch) -> None:
    gate = Gate(monkeypatch)
    model, optim = build(bn=True)
    expected = values(model, optim)
    with shardckpt.CheckpointManager(str(tmp_path), snapshot="lazy") as mgr:
        handle = mgr.save(1, {"model": model, "optim": optim})
        forward_backward(model)  # BatchNorm updates its running stats in place
        assert not torch.equal(model[1].running_mean, expected["model/1.running_mean"])
        gate.open()
        handle.wait()
        assert "model/1.running_mean" not in {k for k, _ in gate.log}  # copied in save()
        assert_equal(loaded(mgr, 1, bn=True), expected)


def test_plain_and_inference_tensors_are_copied_inside_save(tmp_path: Path,
                                                            monkeypatch) -> None:
    gate = Gate(monkeypatch)
    model, optim = build()
    with torch.inference_mode():
        frozen = torch.arange(5.0)
    plain = torch.ones(3)
    with shardckpt.CheckpointManager(str(tmp_path), snapshot="lazy") as mgr:
        handle = mgr.save(1, {"model": model, "optim": optim, "plain": plain,
                              "frozen": frozen})
        plain.add_(1)  # no hook guards a plain tensor: it was copied before save() returned
        gate.open()
        handle.wait()
        got = {"plain": torch.zeros(3), "frozen": torch.zeros(5)}
        mgr.load(got, step=1)
    assert torch.equal(got["plain"], torch.ones(3)) and torch.equal(got["frozen"], frozen)


def _mutate(how: str, model: nn.Module, optim: torch.optim.Optimizer, ema: Any) -> str:
    """Change one guarded tensor in place; return the key the error must name."""
    if how == "no_grad":
        with torch.no_grad():
            model[0].weight.mul_(2)
        return "model/0.weight"
    if how == "detach":
        model[2].bias.detach().add_(1)
        return "model/2.bias"
    if how == "load_state_dict":
        model.load_state_dict(build(seed=5)[0].state_dict())
        return "model/0.weight"
    if how == "ema":
        ema.update_parameters(model)
        return "ema/module.0.weight"
    if how == "optimizer_state":
        next(iter(optim.state.values()))["exp_avg"].zero_()
        return "optim/state/0.weight/exp_avg"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["no_grad", "detach", "load_state_dict", "ema",
                                 "optimizer_state"])
def test_a_change_before_the_copy_fails_the_save_naming_the_key(tmp_path: Path, monkeypatch,
                                                                how: str) -> None:
    gate = Gate(monkeypatch)
    model, optim = build()
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    state = {"model": model, "optim": optim, "ema": ema}
    with shardckpt.CheckpointManager(str(tmp_path), snapshot="lazy") as mgr:
        handle = mgr.save(1, state)
        key = _mutate(how, model, optim, ema)
        gate.open()
        with pytest.raises(shardckpt.TornSnapshotError, match=key.replace(".", r"\.")):
            handle.wait()
        assert mgr.steps() == []  # nothing of the torn save is committed
        expected = values(model, optim)
        mgr.save(2, state).wait()  # the next save is whole again
        assert mgr.steps() == [2]
        assert_equal(loaded(mgr, 2), expected)


def test_eager_mode_copies_everything_inside_save(tmp_path: Path, monkeypatch) -> None:
    gate = Gate(monkeypatch)  # never opened: eager snapshots do not use the lazy copy
    model, optim = build()
    expected = values(model, optim)
    with shardckpt.CheckpointManager(str(tmp_path), snapshot="eager") as mgr:
        handle = mgr.save(1, {"model": model, "optim": optim})
        assert lazy.inflight() == []
        with torch.no_grad():
            model[0].weight.mul_(2)  # harmless: the copy is already made
        train_step(model, optim)
        handle.wait()
        assert_equal(loaded(mgr, 1), expected)
    assert gate.log == []


def test_eager_is_the_default_and_lazy_is_opt_in(tmp_path: Path, monkeypatch) -> None:
    gate = Gate(monkeypatch)
    model, optim = build()
    with shardckpt.CheckpointManager(str(tmp_path / "a")) as mgr:  # issue 24: eager
        mgr.save(1, {"model": model, "optim": optim}).wait()
        assert gate.log == [] and lazy.inflight() == []  # copied inside save
    with shardckpt.CheckpointManager(str(tmp_path / "b"), snapshot="lazy") as mgr:
        handle = mgr.save(1, {"model": model, "optim": optim})
        assert gate.log == [] and len(lazy.inflight()) == 1  # returned before the copy
        gate.open()
        handle.wait()


def test_cancel_stops_the_copy_and_releases_optimizer_steps(monkeypatch) -> None:
    gate = Gate(monkeypatch)
    model, optim = build()
    snap = StagingPool(lazy=True).snapshot(collect({"model": model, "optim": optim}))
    assert isinstance(snap, lazy.LazySnapshot) and len(snap._jobs) > 2
    started = snap._started

    class OpensTheGate:  # cancel waits for the copy thread only after it has claimed every job
        def result(self) -> Any:
            gate.open()
            return started.result()

    snap._started = OpensTheGate()
    snap.cancel()
    assert len(gate.log) <= 1  # at most the copy already in progress when cancel came
    assert snap.done() and lazy.inflight() == []
    train_step(model, optim)  # no wait, no error: the snapshot is gone


def test_a_save_refused_elsewhere_cancels_this_ranks_copy(tmp_path: Path, monkeypatch) -> None:
    """Rank 0's state is fine and its lazy copy has begun when the agreement says another rank's
    state is not: the copy is cancelled, so the next steps and saves are not held or torn."""
    gate = Gate(monkeypatch)
    model, optim = build()

    def refused(comm: Any, step: int, error: Any) -> None:
        assert len(lazy.inflight()) == 1  # this rank's copy has begun
        gate.open()
        raise shardckpt.CollectiveError("rank 1: boom", {1: "boom"})

    with shardckpt.CheckpointManager(str(tmp_path), snapshot="lazy") as mgr:
        monkeypatch.setattr(shardckpt.manager, "agree_on_state", refused)
        with pytest.raises(shardckpt.CollectiveError, match="boom"):
            mgr.save(1, {"model": model, "optim": optim})
        assert lazy.inflight() == []
        monkeypatch.undo()
        gate = Gate(monkeypatch)
        gate.open()
        with torch.no_grad():
            model[0].weight.mul_(2)  # would tear the refused save's copy, were it still armed
        train_step(model, optim)
        expected = values(model, optim)
        mgr.save(2, {"model": model, "optim": optim}).wait()
        assert mgr.steps() == [2]
        assert_equal(loaded(mgr, 2), expected)


def test_blocking_saves_of_cpu_tensors_write_from_the_live_tensors() -> None:
    model, optim = build()
    collected = collect({"model": model, "optim": optim})
    pool = StagingPool(lazy=False)
    assert pool.stage(collected, blocking=True) is collected  # no copy: nothing runs beside it
    staged = pool.stage(collected, blocking=False)
    assert staged is not collected and pool.nbytes > 0


def test_snapshot_mode_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="snapshot"):
        shardckpt.CheckpointManager(str(tmp_path), snapshot="later")


def test_two_ranks_fsdp_change_on_one_rank_fails_the_save_everywhere(tmp_path: Path) -> None:
    results = run_ranks(torn_on_one_rank, 2, str(tmp_path), timeout=240,
                        env={"OMP_NUM_THREADS": "1"})
    for rank, result in enumerate(results):
        assert result["error_type"] == "CollectiveError", result
        assert "rank(s) [1]" in result["error"] and "TornSnapshotError" in result["error"]
        assert "'model/0.weight'" in result["error"]
        assert result["steps"] == [2], rank  # the torn step 1 is not committed; step 2 is
        assert result["equal_after_load"], rank


# ------------------------------------------------------------------ CUDA ordering, on the CPU
class CudaLog:
    """Stand-ins for CUDA streams, events and tensors that log what the engine asks of them, so
    that the order of the side-stream protocol is checked without a GPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[tuple[str, ...]] = []
        self.train = self.Stream(self, "train")
        log, train, events = self.log, self.train, [0]

        class Event:
            def __init__(self) -> None:
                events[0] += 1
                self.name = f"event{events[0]}"

            def record(self, stream: Any) -> None:
                log.append(("record", self.name, stream.name))

            def synchronize(self) -> None:
                log.append(("synchronize", self.name))

        @contextmanager
        def stream(s: Any) -> Any:
            log.append(("enter", s.name))
            yield
            log.append(("exit", s.name))

        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: train)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: self.Stream(self, "side"))

    class Stream:
        def __init__(self, owner: CudaLog, name: str) -> None:
            self.log, self.name = owner.log, name

        def wait_stream(self, other: Any) -> None:
            self.log.append(("wait_stream", self.name, other.name))

        def wait_event(self, event: Any) -> None:
            self.log.append(("wait_event", self.name, event.name))

    def tensor(self, key: str) -> Any:
        log = self.log

        class Storage:
            def data_ptr(self) -> int:
                return id(self)

        class CudaTensor:
            device = torch.device("cuda", 0)
            _version = 0
            shape = (2,)
            dtype = torch.float32

            def __init__(self, name: str) -> None:
                self.key, self._storage = name, Storage()

            def record_stream(self, s: Any) -> None:
                log.append(("record_stream", self.key, s.name))

            def untyped_storage(self) -> Any:
                return self._storage

            def clone(self) -> Any:
                log.append(("clone", self.key))
                return CudaTensor(f"{self.key}.clone")

        return CudaTensor(key)

    def buffer(self, key: str) -> Any:
        log = self.log

        class Buffer:
            def copy_(self, src: Any, non_blocking: bool = False) -> None:
                log.append(("copy", src.key, "async" if non_blocking else "sync"))

        return Buffer()

    def snapshot(self, *keys: str) -> tuple[lazy.LazySnapshot, list[Any]]:
        srcs = [self.tensor(k) for k in keys]
        fence = lazy.CudaFence({torch.device("cuda", 0): self.Stream(self, "side")})
        jobs = [lazy.CopyJob(s.key, s, self.buffer(s.key), s, 0) for s in srcs]
        return lazy.LazySnapshot(Collected([], []), jobs, fence=fence), srcs


def test_cuda_step_first_waits_on_the_gpu_not_the_host(monkeypatch) -> None:
    cuda = CudaLog(monkeypatch)
    snap, srcs = cuda.snapshot("a", "b")
    snap.before_step()  # the optimizer step: queues the copies, training's stream waits for them
    assert cuda.log == [
        ("wait_stream", "side", "train"),  # the copies come after the work queued before save()
        ("enter", "side"), ("copy", "a", "async"), ("record_stream", "a", "side"), ("exit", "side"),
        ("enter", "side"), ("copy", "b", "async"), ("record_stream", "b", "side"), ("exit", "side"),
        ("record", "event1", "side"),
        ("wait_event", "train", "event1"),  # on the GPU: the host never synchronized
    ]
    assert lazy.inflight() == []
    for s in srcs:
        s._version += 1  # the optimizer step, now ordered after the copies
    assert snap.ready() is snap.collected  # not torn
    assert cuda.log[-1] == ("synchronize", "event1")


def test_cuda_change_before_the_step_is_caught(monkeypatch) -> None:
    cuda = CudaLog(monkeypatch)
    snap, srcs = cuda.snapshot("a", "b")
    srcs[1]._version += 1  # queued before the copy was fenced: it may run before it
    snap.before_step()
    with pytest.raises(shardckpt.TornSnapshotError, match="'b'"):
        snap.ready()


def test_cuda_copies_done_first_need_no_wait_at_the_step(monkeypatch) -> None:
    cuda = CudaLog(monkeypatch)
    snap, srcs = cuda.snapshot("a")
    snap.ready()  # the save thread: queued, recorded, synchronized, checked
    assert ("synchronize", "event1") in cuda.log and lazy.inflight() == []
    n = len(cuda.log)
    srcs[0]._version += 1
    lazy._before_step(object(), (), {})  # nothing in flight: the step does not wait
    snap.before_step()
    assert len(cuda.log) == n


def test_cuda_pool_clones_unguarded_tensors_on_the_training_stream(monkeypatch) -> None:
    cuda = CudaLog(monkeypatch)
    pool = StagingPool(lazy=True)
    pool._copier = held = Held()  # type: ignore[assignment]
    monkeypatch.setattr(pool, "_buffer", lambda key, src: cuda.buffer(key))
    param, running = cuda.tensor("model/w"), cuda.tensor("model/running_mean")
    leaves = [TensorLeaf("model/w", param, "float32", (2,), (0,), False, None, param, 0, True),
              TensorLeaf("model/running_mean", running, "float32", (2,), (0,), False, None,
                         running, 0, False)]
    snap = pool.snapshot(Collected([], leaves))
    assert isinstance(snap, lazy.LazySnapshot)
    # the buffer is cloned on training's stream inside save(), before the side stream is fenced
    assert cuda.log == [("clone", "model/running_mean"), ("wait_stream", "side", "train")]
    held.run()  # the copy thread queues the copies
    snap.ready()
    assert ("copy", "model/w", "async") in cuda.log
    assert ("copy", "model/running_mean.clone", "async") in cuda.log
    running._version += 1  # the forward pass updating it: harmless, its clone is copied
    assert snap.done()


# ------------------------------------------------------------------ background threads
def _writers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, str]]:
    """Records (thread id, nice value, what) for every shard write and chunk encoding."""
    import os

    from shardckpt.engine import pipeline
    from shardckpt.storage import location

    seen: list[tuple[int, int, str]] = []
    real_write, real_encode = location._LocalSink.write, pipeline.encode_chunk

    def me(what: str) -> None:
        tid = threading.get_native_id()
        seen.append((tid, os.getpriority(os.PRIO_PROCESS, tid), what))

    def write(self: Any, data: Any) -> int:
        if self.path.endswith(".shard"):
            me("write")
        return real_write(self, data)

    def encode(codec: Any, raw: Any) -> Any:
        me("encode")
        return real_encode(codec, raw)

    monkeypatch.setattr(location._LocalSink, "write", write)
    monkeypatch.setattr(pipeline, "encode_chunk", encode)
    return seen


def test_background_saves_hash_and_write_at_low_priority(tmp_path: Path, monkeypatch) -> None:
    import os

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    monkeypatch.setenv("SHARDCKPT_FILES_PER_RANK", "2")
    monkeypatch.setenv("SHARDCKPT_CHUNK_SIZE", "4K")  # several chunks per file
    seen = _writers(monkeypatch)
    copier: list[int] = []
    real_copy = lazy.copy_cpu

    def copy(job: lazy.CopyJob) -> None:
        tid = threading.get_native_id()
        copier.append(os.getpriority(os.PRIO_PROCESS, tid))
        real_copy(job)

    monkeypatch.setattr(lazy, "copy_cpu", copy)
    model, optim = build()
    state = {"model": model, "optim": optim, "a": torch.randn(4096)}
    with shardckpt.CheckpointManager(str(tmp_path), snapshot="lazy") as mgr:
        mgr.save(1, state).wait()
        background = list(seen)
        seen.clear()
        mgr.save(2, state, blocking=True)
        blocking = list(seen)
    # background: the copy thread, the encoders and the writers run at nice 10
    assert {what for _, _, what in background} == {"write", "encode"}
    assert {nice for _, nice, _ in background} == {max(base, 10)}
    assert copier and set(copier) == {max(base, 10)}
    # blocking: training waits for it, so it keeps the caller's priority
    assert {what for _, _, what in blocking} == {"write", "encode"}
    assert {nice for _, nice, _ in blocking} == {base}


def test_thread_priority_is_never_raised() -> None:
    import os

    from shardckpt.engine.priority import lower_thread_priority

    result: list[Any] = []

    def body() -> None:
        tid = threading.get_native_id()
        first = lower_thread_priority(12)
        second = lower_thread_priority(5)  # lower than the current value: left alone
        result.extend([first, second, os.getpriority(os.PRIO_PROCESS, tid)])

    t = threading.Thread(target=body)
    t.start()
    t.join()
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert result == [max(base, 12)] * 3


def test_first_save_before_any_optimizer_step(tmp_path: Path) -> None:
    """Collecting an optimizer that has no state yet runs a zero step to create it (torch's
    state_dict helpers do): that is part of save(), not a change to report."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    with shardckpt.CheckpointManager(str(tmp_path), snapshot="lazy") as mgr:
        mgr.save(1, {"model": model, "optim": optim}).wait()
        expected = values(model, optim)
        assert_equal(loaded(mgr, 1), expected)
