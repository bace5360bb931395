"""Other checkpoint formats: Hugging Face safetensors folders and PyTorch DCP checkpoints.

Each converter runs in one process and imports its third-party package lazily, so shardckpt itself
never needs ``safetensors`` or ``transformers`` to save or load.
"""

from __future__ import annotations

import os
import stat


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
    names = os.listdir(out)
    for name in names:
        refuse_special(os.path.join(out, name), directories=True)
    return names


def refuse_special(path: str, directories: bool = False) -> None:
    """``ConversionError`` if ``path`` exists and is not a regular file (nor, where allowed, a
    folder): an export never replaces a link, a device, a pipe or a socket, even when forced
    (a rename over ``/dev/null`` or a symlink would destroy it, not write through it)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode) or (directories and stat.S_ISDIR(mode)):
        return
    kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
    raise ConversionError(f"{path}: is {kind} (a link, device, pipe or socket); an export only "
                          "ever replaces regular files, even with --force: give another path")
