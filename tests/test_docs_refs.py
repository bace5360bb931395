"""Every test or benchmark that the docs name as the proof of a promise exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_named_test_exists() -> None:
    missing = []
    for doc in sorted((REPO / "docs").glob("*.md")):
        text = doc.read_text()
        for path, name in sorted(set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)", text))):
            source = REPO / path
            if not source.exists() or not re.search(rf"^\s*(def|class) {name}\b",
                                                    source.read_text(), re.M):
                missing.append(f"{doc.name}: {path}::{name}")
        for path in sorted(set(re.findall(r"`((?:benchmarks|launch)/[\w/.-]+\.(?:py|sh))`",
                                          text))):
            if not (REPO / path).exists():
                missing.append(f"{doc.name}: {path}")
    assert not missing, missing
