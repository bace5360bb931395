"""``shardckpt verify``: prove a checkpoint is intact, complete, loadable and reproduces its
golden outputs. :func:`verify` runs the phases (collective over a comm); see :mod:`.runner`."""

from .phases import Check
from .record import RECORD_NAME, read_record, verified
from .runner import VerifyOptions, VerifyResult, verify

__all__ = ["RECORD_NAME", "Check", "VerifyOptions", "VerifyResult", "read_record", "verified",
           "verify"]
