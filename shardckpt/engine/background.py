"""How a background save shares the machine with training.

While a background (asynchronous) save writes, training runs on the same cores; a blocking save
has the machine to itself, since training waits for it. So a background save:

* hashes and writes on ``SHARDCKPT_BACKGROUND_THREADS`` writer threads (default 1, hashing
  inline), where a blocking save uses ``SHARDCKPT_IO_THREADS`` writers and
  ``SHARDCKPT_ENCODE_THREADS`` encoders: extra threads only compete with training for cores;
* runs those threads at nice ``SHARDCKPT_SAVE_NICE`` (default 10; Linux, where each thread has
  its own nice value): the scheduler then gives training's threads a core first, and the hashing
  and writing fill the moments training leaves one idle (waiting on a collective, on data). At
  nice 10 a busy core still gives them about a tenth of its time, so a save still finishes.

The save thread itself (the lazy copy, planning, the collectives, the commit) keeps its priority:
the copy must be done before the next optimizer step, and a thread holding the GIL should not
wait long for a core. Measurements: docs/benchmarks.md, "Training-loop overhead".
"""

from __future__ import annotations

from dataclasses import replace

from .. import knobs
from .save import SaveOptions


def background_options(opts: SaveOptions) -> SaveOptions:
    """``opts`` for a save that runs beside training."""
    threads = knobs.BACKGROUND_THREADS.get()
    return replace(opts, io_threads=threads, nice=min(knobs.SAVE_NICE.get(), 19),
                   encode_threads=0 if threads == 1 else min(opts.encode_threads, threads))
