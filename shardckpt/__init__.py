"""shardckpt: sharded, checksummed, atomic checkpoints for PyTorch training."""

__version__ = "0.1.0"

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
from .golden import Golden
from .manager import CheckpointInfo, CheckpointManager, PruneReport, SaveHandle
from .observe import SaveEvent
from .policy import RetentionPolicy
from .repro import SamplerPosition, set_determinism

__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "CollectiveError",
    "CorruptCheckpointError",
    "Golden",
    "IncompleteCheckpointError",
    "LeaseError",
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
    "set_determinism",
]
