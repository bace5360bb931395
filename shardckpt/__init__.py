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
    VerificationError,
)
from .exporter import ExportResult, consolidated_state_dict, export
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
    "ExportResult",
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
    "VerificationError",
    "__version__",
    "consolidated_state_dict",
    "export",
    "set_determinism",
]
