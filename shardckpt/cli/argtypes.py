"""argparse types shared by the commands (kept apart from ``main`` to avoid an import cycle)."""

from __future__ import annotations

import argparse


def step_arg(text: str) -> int:
    """argparse type of ``--step``: a non-negative integer that names a step directory."""
    from ..format.manifest import MAX_STEP

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid step {text!r}: not an integer") from None
    if not 0 <= value <= MAX_STEP:
        raise argparse.ArgumentTypeError(f"invalid step {text!r}: must be in [0, {MAX_STEP}]")
    return value
