"""The audit trail of a checkpoint root: ``ROOT/audit/``, one immutable record per event."""

from .hooks import (
    SaveAuditor,
    record_export,
    record_import,
    record_prune,
    record_repair,
    record_restore,
    record_verify,
)
from .trail import AUDIT_DIR, EVENTS, AuditWarning, append, read_trail, write_failures

__all__ = ["AUDIT_DIR", "EVENTS", "AuditWarning", "SaveAuditor", "append", "read_trail",
           "record_export", "record_import", "record_prune", "record_repair", "record_restore",
           "record_verify", "write_failures"]
