"""Where the data loader is within training, so a resumed run sees the batches it would have seen.

:class:`SamplerPosition` serves a plain ``torch.utils.data.DataLoader``: it remembers the epoch
and how many batches of it were consumed, calls ``set_epoch`` on the samplers, and on resume
re-reads and drops the consumed batches of the interrupted epoch. Put it in the checkpointed state
(it has ``state_dict``/``load_state_dict``). The resumed epoch yields exactly the batches the
uninterrupted run would have yielded when the batch order is a function of the epoch and of
generators it records:

- ``DistributedSampler(..., seed=S)`` (the order depends on seed and epoch only);
- ``RandomSampler``/``shuffle=True`` with ``generator=make_generator(S)``, and
  ``DataLoader(generator=...)`` (which fixes the workers' base seed): the states of these
  generators at the start of the epoch are saved and put back before the epoch is re-read.

A loader that draws from torch's global generator (``shuffle=True`` without a ``generator``)
resumes with a different order. Give the DataLoader a ``generator`` in any case: without one,
every ``iter(loader)`` draws the workers' base seed from torch's global generator, so the extra
``iter`` made on resume shifts the global random stream (dropout, ...) against the uninterrupted
run. Skipping costs the time to load the skipped batches.

torchdata's ``StatefulDataLoader`` needs none of this: its ``state_dict`` holds only dicts with
``str`` keys, ints, bools, ``None`` and uint8 generator tensors, which the checkpoint tree stores
as they are; put the loader itself in the state (see :func:`is_stateful_dataloader`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch


def _nonneg_int(sd: Mapping[str, Any], key: str) -> int:
    value = sd.get(key)
    if type(value) is not int or value < 0:
        raise ValueError(f"SamplerPosition.{key}: expected a non-negative int, got {value!r}")
    return value


def _generators(loader: Any) -> list[torch.Generator]:
    """The distinct torch generators a loader draws from, in a fixed order."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for holder in (loader, getattr(loader, "sampler", None), batch_sampler,
                   getattr(batch_sampler, "sampler", None)):
        gen = getattr(holder, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def _set_epoch(loader: Any, epoch: int) -> None:
    seen: list[Any] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (getattr(loader, "sampler", None), batch_sampler,
                getattr(batch_sampler, "sampler", None)):
        if obj is not None and hasattr(obj, "set_epoch") and all(obj is not s for s in seen):
            seen.append(obj)
            obj.set_epoch(epoch)


class SamplerPosition:
    """The position of training in a plain DataLoader: epoch, batches consumed, generator states.

    Use either :meth:`epoch_iterator` (which counts for you) or your own loop calling
    :meth:`begin_epoch` before ``iter(loader)``, :meth:`advance` once per batch and
    :meth:`next_epoch` at the epoch's end (skipping consumed batches yourself), not both::

        pos = SamplerPosition()
        state = {"model": model, "optim": optim, "data": pos}
        mgr.load(state)                       # if resuming
        while pos.epoch < epochs:
            for batch in pos.epoch_iterator(loader):
                ...                           # a save here counts this batch as consumed
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.batches_consumed = 0
        self._generator_states: list[torch.Tensor] = []
        self._pending_restore = False

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches_consumed", "generator_states"}`` (the last: uint8 tensors)."""
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed,
                "generator_states": [s.clone() for s in self._generator_states]}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Resume at ``sd``; the next :meth:`epoch_iterator` replays the epoch's start."""
        if not isinstance(sd, Mapping):
            raise ValueError(f"SamplerPosition: expected a dict, got {type(sd).__name__}")
        epoch, consumed = _nonneg_int(sd, "epoch"), _nonneg_int(sd, "batches_consumed")
        states = sd.get("generator_states", [])
        if not isinstance(states, (list, tuple)) or not all(
                isinstance(s, torch.Tensor) and s.dtype == torch.uint8 and s.dim() == 1
                for s in states):
            raise ValueError("SamplerPosition.generator_states: expected a list of 1-D uint8 "
                             "tensors")
        self.epoch, self.batches_consumed = epoch, consumed
        self._generator_states = [s.detach().cpu().clone() for s in states]
        self._pending_restore = True

    def advance(self, batches: int = 1) -> None:
        """Count ``batches`` more batches of this epoch as consumed (for hand-written loops)."""
        if type(batches) is not int or batches < 0:
            raise ValueError(f"batches must be a non-negative int, got {batches!r}")
        self.batches_consumed += batches

    def next_epoch(self, loader: Any = None) -> None:
        """Move to the start of the next epoch (for hand-written loops).

        With ``loader``, its generators' states are recorded as the next epoch's start, so a save
        made between two epochs resumes exactly too.
        """
        self.epoch += 1
        self.batches_consumed = 0
        self._generator_states = [g.get_state() for g in _generators(loader)] \
            if loader is not None else []
        self._pending_restore = False

    def begin_epoch(self, loader: Any) -> None:
        """Prepare ``loader`` for the current epoch: set its samplers' epoch, and its generators'
        states (put back on resume, recorded otherwise). Call right before ``iter(loader)``."""
        _set_epoch(loader, self.epoch)
        generators = _generators(loader)
        if self._pending_restore and (self._generator_states or self.batches_consumed):
            if len(generators) != len(self._generator_states):
                raise ValueError(f"SamplerPosition: the checkpoint recorded "
                                 f"{len(self._generator_states)} loader generator(s), this "
                                 f"loader has {len(generators)}; build it as the saving run did")
            for gen, st in zip(generators, self._generator_states):
                gen.set_state(st)
        else:
            self._generator_states = [g.get_state() for g in generators]
        self._pending_restore = False

    def epoch_iterator(self, loader: Iterable[Any]) -> Iterator[Any]:
        """The remaining batches of the current epoch; then advances to the next epoch.

        Calls :meth:`begin_epoch`, skips (re-reads) the ``batches_consumed`` batches already
        trained on, and counts each batch as consumed when it is handed out. Exhausting the
        iterator moves to the next epoch; abandoning it leaves the position where it stopped.
        """
        self.begin_epoch(loader)
        it = iter(loader)
        for _ in range(self.batches_consumed):
            try:
                next(it)
            except StopIteration:
                break
        for batch in it:
            self.batches_consumed += 1
            yield batch
        self.next_epoch(loader)


def is_stateful_dataloader(obj: Any) -> bool:
    """True if ``obj`` is torchdata's ``StatefulDataLoader`` (False when torchdata is absent)."""
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        return False
    return isinstance(obj, StatefulDataLoader)
