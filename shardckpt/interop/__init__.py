"""Other checkpoint formats: Hugging Face safetensors folders and PyTorch DCP checkpoints.

Each converter runs in one process and imports its third-party package lazily, so shardckpt itself
never needs ``safetensors`` or ``transformers`` to save or load.
"""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint cannot be converted as asked: a bad option, an output in the way, or content
    the target format cannot hold. The message says which and what to do (CLI: exit 64)."""
