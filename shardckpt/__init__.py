"""shardckpt: sharded, checksummed, atomic checkpoints for PyTorch training.

The names below are exported lazily: ``import shardckpt`` loads only the errors and the
version, and a torch-backed name (``CheckpointManager``, ``export``, ...) imports its module,
and torch, the first time it is used. So the command line, ``shardckpt.catalog`` and the layers
below the engine stay cheap to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    CollectiveError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    LeaseError,
    PruneLockedError,
    ShardckptError,
    StorageError,
    TornSnapshotError,
    VerificationError,
)
from .version import __version__

# name -> the module (relative to this package) that defines it
_LAZY = {
    "CheckpointInfo": "handles",
    "CheckpointManager": "manager",
    "SaveHandle": "handles",
    "PruneReport": "prune",
    "ExportResult": "interop.source",
    "consolidated_state_dict": "exporter",
    "export": "exporter",
    "Golden": "golden",
    "LocalTier": "tier.config",
    "SaveEvent": "observe",
    "RetentionPolicy": "policy",
    "SamplerPosition": "repro",
    "set_determinism": "repro",
}

if TYPE_CHECKING:  # for type checkers and IDEs; never run
    from .exporter import consolidated_state_dict, export
    from .golden import Golden
    from .handles import CheckpointInfo, SaveHandle
    from .interop.source import ExportResult
    from .manager import CheckpointManager
    from .observe import SaveEvent
    from .policy import RetentionPolicy
    from .prune import PruneReport
    from .repro import SamplerPosition, set_determinism
    from .tier.config import LocalTier


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shardckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "CollectiveError",
    "CorruptCheckpointError",
    "ExportResult",
    "Golden",
    "IncompleteCheckpointError",
    "LeaseError",
    "LocalTier",
    "PruneLockedError",
    "PruneReport",
    "RetentionPolicy",
    "SamplerPosition",
    "SaveEvent",
    "SaveHandle",
    "ShardckptError",
    "StorageError",
    "TornSnapshotError",
    "VerificationError",
    "__version__",
    "consolidated_state_dict",
    "export",
    "set_determinism",
]
