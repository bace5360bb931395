"""How a background save shares the machine with training.

While a background (asynchronous) save hashes and writes, training runs on the same cores; a
blocking save has the machine to itself, since training waits for it. So the threads of a
background save that do the heavy work (the lazy snapshot's copy thread, the encoders and the
file writers) run at nice ``SHARDCKPT_SAVE_NICE`` (default 10; Linux, where each thread has its
own nice value and the threads it starts inherit it). The scheduler then gives training's threads
a core first, and the save fills the moments training leaves one idle (waiting on a collective or
on data). At nice 10 a busy core still gives them about a tenth of its time, so a save finishes;
should the copy still be running when the next optimizer step comes, the step takes over the rest
itself (engine/lazy.py).

The save thread (planning, the collectives, the commit: little CPU, but it holds the GIL in
between) keeps its priority, so that a thread holding the GIL never waits long for a core.
Measurements: docs/benchmarks.md, "Training-loop overhead".
"""

from __future__ import annotations

from dataclasses import replace

from .. import knobs
from .save import SaveOptions


def background_options(opts: SaveOptions) -> SaveOptions:
    """``opts`` for a save that runs beside training: its encoder and writer threads at nice
    ``SHARDCKPT_SAVE_NICE``."""
    return replace(opts, nice=min(knobs.SAVE_NICE.get(), 19))
