"""torchrun that ends quietly on the signals it forwards to the ranks.

Plain torchrun, told to forward a signal (``--signals-to-handle``: SIGTERM from ``scancel`` or a
preemption, SIGUSR1 before the time limit), forwards it to every rank, waits up to
``--shutdown-timeout`` for them, then dies with a ``SignalException`` traceback and exit code 1
even when every rank saved and exited 0. This wrapper runs the same torchrun (same flags, same
behaviour) with three changes on that path only:

- a second signal while the ranks shut down (Slurm signals every process of the job, and srun
  forwards the same signal again) does not cut the wait short;
- torchrun's own shutdown chatter is silenced, and one line says what happened;
- the exit code is 0 when every rank exited 0 (they saved, as asked), else 128 + the signal.

Run as ``python graceful_torchrun.py TORCHRUN ARGS...`` (``graceful-torchrun`` does that).
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

from torch.distributed.elastic.multiprocessing import api
from torch.distributed.elastic.multiprocessing.api import PContext, SignalException
from torch.distributed.run import main

_first: list[signal.Signals] = []
_exit_codes: list[int | None] = []
_raise = api._terminate_process_handler


def _on_signal(signum: int, frame: Any) -> None:
    if _first:  # the shutdown the first signal started goes on
        return
    _first.append(signal.Signals(signum))
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    _raise(signum, frame)  # torchrun's own: SignalException, caught by its agent


_close = PContext.close


def _close_and_note(self: PContext, *args: Any, **kwargs: Any) -> None:
    _close(self, *args, **kwargs)
    if _first:
        handlers = getattr(self, "subprocess_handlers", None) or {}
        _exit_codes[:] = [h.proc.poll() for h in handlers.values()]


api._terminate_process_handler = _on_signal  # looked up when torchrun installs its handlers
PContext.close = _close_and_note  # type: ignore[method-assign]


def run() -> int:
    try:
        main()
    except SignalException as exc:
        sig = signal.Signals(exc.sigval)
        codes = list(_exit_codes)
        clean = bool(codes) and all(c == 0 for c in codes)
        print(f"graceful-torchrun: {sig.name} forwarded to the ranks; they exited with "
              f"{', '.join('still running' if c is None else str(c) for c in codes) or '?'}"
              f" ({'clean shutdown' if clean else 'not all of them cleanly'})",
              file=sys.stderr, flush=True)
        return 0 if clean else 128 + int(sig)
    return 0


if __name__ == "__main__":
    sys.exit(run())
