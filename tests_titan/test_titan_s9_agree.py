"""A user trial (session 8, left for session 9): with 2 ranks, an explicit load_step of a
model-only step made rank 0 raise the expected TitanLoadError while rank 1 reported "Gloo
connectFullMesh failed". Each rank decided from its own reads whether to refuse, so a rank
whose view of the folder differed went on into the collective load (or raised something else)
while the other had raised. Now rank 0 decides what to load and every rank gets the decision
(:mod:`shardckpt.integrations.torchtitan_resume`): every rank raises the same error, and none
is left waiting. The views are made to differ by faults injected on one rank
(titan_s9_targets.py); the collectives time out after 30 s, so that a rank left waiting fails
the test instead of hanging it."""

from __future__ import annotations

import threading
from typing import Any

import harness
import pytest
import titan_s9_targets as S
import titan_targets as T

from shardckpt.engine.comm import ThreadComm
from shardckpt.errors import StorageError
from shardckpt.integrations.torchtitan import TitanLoadError
from shardckpt.integrations.torchtitan_resume import on_every_rank, on_rank0

TIMEOUT = 240.0
ENV = {"SHARDCKPT_COLLECTIVE_TIMEOUT": "30"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    base = str(tmp_path_factory.mktemp("titan-agree"))
    return harness.run_ranks(S.agree_runs, 2, base, timeout=TIMEOUT, env=ENV)


def _same(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    got = [out[key] for out in runs]
    assert got[0] == got[1], f"{key}: the ranks disagree: {got}"
    return got[0]


@pytest.mark.parametrize("inject", ["none", "lagging", "stale", "failing"])
def test_an_explicit_load_step_of_a_model_only_step_is_refused_on_every_rank_alike(
        runs: list[dict[str, Any]], inject: str) -> None:
    """load_step=10, the model-only last step: the same TitanLoadError (type and message) on
    both ranks, whatever rank 1 lists or reads (its listing lags and lacks step 10, its copy of
    the manifest lacks the model-only tag, its read fails), and nothing is loaded."""
    got = _same(runs, f"explicit-{inject}")
    assert got["type"] == "TitanLoadError" and got["step"] == 0
    assert f"load_step={T.TOTAL} holds the model only" in got["msg"]
    assert "newest full step is 9" in got["msg"]


@pytest.mark.parametrize("inject", ["lagging", "stale"])
def test_the_automatic_resume_refuses_a_model_only_newest_step_on_every_rank_alike(
        runs: list[dict[str, Any]], inject: str) -> None:
    """No load_step: rank 1 would have resumed from step 9 (its listing lags) or loaded step
    10 as a full step (its copy lacks the tag) while rank 0 refused; both refuse alike."""
    got = _same(runs, f"auto-{inject}")
    assert got["type"] == "TitanLoadError" and got["step"] == 0
    assert f"the newest committed step, {T.TOTAL}" in got["msg"]


def test_an_error_while_rank_0_decides_is_raised_on_every_rank(
        runs: list[dict[str, Any]]) -> None:
    """Rank 0's read of the step fails: every rank raises it, naming rank 0 and the error,
    rather than rank 1 waiting for a decision that never comes."""
    got = _same(runs, "explicit-failing-rank0")
    assert got["type"] == "TitanLoadError" and got["step"] == 0
    assert got["msg"].startswith("torchtitan: what to load: rank 0: StorageError: ")
    assert "read failed: timed out" in got["msg"]


def test_a_save_below_newer_steps_is_refused_on_every_rank_alike(
        runs: list[dict[str, Any]]) -> None:
    """Resumed from step 6 by load_step, the save of step 9 meets committed steps up to 10;
    rank 1's listing lags (up to 6). Before, rank 0 refused while rank 1 went into the save's
    collectives; now the newest step is rank 0's, for both, and both refuse alike."""
    got = _same(runs, "older")
    assert got["type"] == "TitanSaveError" and got["step"] == 9
    assert "cannot save step 9" in got["msg"] and f"up to {T.TOTAL}" in got["msg"]


def test_a_local_tier_that_one_rank_cannot_list_fails_every_rank_alike(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """The automatic resume with a node-local tier: rank 1 cannot list its local steps (an
    I/O error). Before, rank 1 raised while rank 0 waited in the collective that decides
    whether a local step is newer; now both raise the same error, naming rank 1."""
    base = str(tmp_path_factory.mktemp("titan-agree-local"))
    got = harness.run_ranks(S.local_runs, 2, base, timeout=TIMEOUT, env=ENV)
    assert got[0] == got[1], got
    assert got[0]["type"] == "TitanLoadError"
    assert got[0]["msg"] == (f"torchtitan: newer local steps: rank 1: OSError: {base}/local/1: "
                             "Input/output error")


# ------------------------------------------------------------------ the two agreements alone

def _threads(fn: Any, world: int = 3) -> list[Any]:
    comms, out = ThreadComm.group(world, timeout_s=20.0), [None] * world

    def body(rank: int) -> None:
        try:
            out[rank] = ("ok", fn(comms[rank]))
        except Exception as exc:
            out[rank] = (type(exc).__name__, str(exc))

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return out


def test_on_rank0_gives_rank_0s_value_or_error_to_every_rank() -> None:
    assert _threads(lambda c: on_rank0(c, "w", lambda: c.rank + 7)) == [("ok", 7)] * 3

    def refuse(c: Any) -> Any:
        def decide() -> None:
            raise TitanLoadError("checkpoint.folder F: refused")
        return on_rank0(c, "what", decide)

    assert _threads(refuse) == [("TitanLoadError", "checkpoint.folder F: refused")] * 3

    def other(c: Any) -> Any:
        def decide() -> None:
            raise StorageError("F/step-1: read failed")
        return on_rank0(c, "what", decide)

    assert _threads(other) == [("TitanLoadError", "what: rank 0: StorageError: F/step-1: "
                                "read failed")] * 3


def test_on_every_rank_raises_the_lowest_failing_ranks_error_everywhere() -> None:
    assert _threads(lambda c: on_every_rank(c, "w", lambda: c.rank)) == [("ok", [0, 1, 2])] * 3

    def some_fail(c: Any) -> Any:
        def mine() -> int:
            if c.rank:
                raise ValueError(f"bad on rank {c.rank}")
            return 0
        return on_every_rank(c, "w", mine)

    assert _threads(some_fail) == [("ValueError", "bad on rank 1")] * 3


def test_a_dcp_folder_that_one_rank_sees_is_refused_on_every_rank_alike(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Rank 1 sees a DCP step in checkpoint.folder, rank 0 does not: before, rank 1 refused
    before the manager's group was made and rank 0 waited to make it with rank 1; now both
    make it, then both raise the same TitanConfigError, naming the DCP step rank 1 saw."""
    base = str(tmp_path_factory.mktemp("titan-agree-dcp"))
    got = harness.run_ranks(S.dcp_folder_runs, 2, base, timeout=120.0, env=ENV)
    assert got[0] == got[1], got
    assert got[0]["type"] == "TitanConfigError" and "holds torchtitan DCP checkpoints (step-3)" \
        in got[0]["msg"]
