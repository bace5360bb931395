"""The Lightning and HF Trainer callbacks default to eager snapshots and accept ``on_error``
(issue 24)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest


def lightning_manager(root: Path, **kwargs: Any) -> Any:
    from shardckpt.integrations.lightning import ShardckptCallback

    cb = ShardckptCallback(str(root), **kwargs)
    cb.setup(None, None, "fit")  # type: ignore[arg-type]  # makes the manager
    return cb.manager


def transformers_manager(root: Path, **kwargs: Any) -> Any:
    from shardckpt.integrations.transformers import ShardckptCallback

    return ShardckptCallback(str(root), **kwargs)._require_manager()


@pytest.mark.parametrize("make", [lightning_manager, transformers_manager])
def test_callbacks_default_to_eager_and_raise(tmp_path: Path, make: Any) -> None:
    mgr = make(tmp_path)
    try:
        assert mgr._staging.lazy is False
        assert mgr._failures.on_error == "raise"
    finally:
        mgr.close()


@pytest.mark.parametrize("make", [lightning_manager, transformers_manager])
def test_callbacks_accept_on_error_and_lazy(tmp_path: Path, make: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lazy's contract
        mgr = make(tmp_path, on_error="warn", snapshot="lazy")
    try:
        assert mgr._staging.lazy is True
        assert mgr._failures.on_error == "warn"
        assert mgr.failed_saves == []
    finally:
        mgr.close()


@pytest.mark.parametrize("make", [lightning_manager, transformers_manager])
def test_callbacks_check_on_error_and_snapshot(tmp_path: Path, make: Any) -> None:
    with pytest.raises(ValueError, match="on_error"):
        make(tmp_path, on_error="ignore")
    with pytest.raises(ValueError, match="snapshot"):
        make(tmp_path, snapshot="later")
