"""Shared pieces of the in-process CLI tests of incremental saves (pytest-only: rank children
import :mod:`incremental_helpers`, never this, so that they need not import pytest)."""

from __future__ import annotations

import pytest

from shardckpt.cli.main import main


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Autouse in every test module that imports it: 64 KiB chunks, no fsync."""
    monkeypatch.setenv("SHARDCKPT_FSYNC", "0")
    monkeypatch.setenv("SHARDCKPT_CHUNK_SIZE", str(64 << 10))


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the ``shardckpt`` CLI in-process: (exit code, stdout, stderr) of this call only."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err
