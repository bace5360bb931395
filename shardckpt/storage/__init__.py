"""Storage: bytes to and from fsspec locations. Never imports torch."""

from .location import Location, Sink, open_location, redact, step_dirname

__all__ = ["Location", "Sink", "open_location", "redact", "step_dirname"]
