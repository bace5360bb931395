"""What a save returns: :class:`SaveHandle` (wait for it) and :class:`CheckpointInfo` (what was
committed, read from a manifest)."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass

from .format import manifest as M
from .format.refs import summary


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    time: str
    metrics: Mapping[str, float]
    tags: tuple[str, ...]
    world_size: int
    nbytes: int  # of the step's own files: the bytes it wrote itself
    replicas: tuple[str, ...]
    bytes_referenced: int = 0  # incremental: stored bytes of earlier steps' files it uses
    depends_on: tuple[int, ...] = ()  # incremental: the earlier steps those files belong to
    # incremental, ``info()`` only: "step M: why" for each of those steps with no valid
    # manifest at any location (the step cannot load: see shardckpt.refcheck.untrusted_targets)
    dependency_problems: tuple[str, ...] = ()

    @classmethod
    def from_manifest(cls, m: M.Manifest, untrusted: Mapping[int, str] | None = None
                      ) -> CheckpointInfo:
        inc = summary(m.extra, m.step, m.nbytes)
        return cls(m.step, m.time, dict(m.metrics), m.tags, m.world_size, m.nbytes,
                   tuple(m.extra.get("locations", ())), inc["bytes_referenced"],
                   tuple(inc["depends_on"]),
                   tuple(f"step {s}: {why}" for s, why in sorted((untrusted or {}).items())))


class SaveHandle:
    """The outcome of one ``save``: ``wait()`` returns its :class:`CheckpointInfo` or raises."""

    def __init__(self, step: int, future: Future[CheckpointInfo | None]) -> None:
        self.step = step
        self._future = future
        self.error_reported = False

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        """Block until committed; re-raises the background error, if any. None on ranks > 0."""
        try:
            return self._future.result(timeout)
        except BaseException as exc:
            if not isinstance(exc, TimeoutError):
                self.error_reported = True
            raise
