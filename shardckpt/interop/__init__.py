"""Other checkpoint formats: Hugging Face safetensors folders and PyTorch DCP checkpoints.

Each converter runs in one process and imports its third-party package lazily, so shardckpt itself
never needs ``safetensors`` or ``transformers`` to save or load.
"""

from __future__ import annotations

import os


class ConversionError(ValueError):
    """A checkpoint cannot be converted as asked: a bad option, an output in the way, or content
    the target format cannot hold. The message says which and what to do (CLI: exit 64)."""


def existing_names(out: str) -> list[str] | None:
    """The names in folder ``out``; None if it does not exist yet (its parent must).
    ``ConversionError`` if ``out`` is a file or its parent is missing."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConversionError(f"{out}: exists and is not a folder")
    if not os.path.exists(out):
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise ConversionError(f"{out}: folder {parent} does not exist")
        return None
    return os.listdir(out)
