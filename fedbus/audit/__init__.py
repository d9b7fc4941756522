"""The audit trail: every participant's signed, hash-chained records of what it accepted,
rejected and decided (``records``: the format and its checks; ``trail``: one writer's
chain on the bus; ``queue``: writing in the background; ``reader``: replaying and
verifying a job's audit stream)."""

from fedbus.audit.records import (
    AUDIT_TYPE,
    GENESIS,
    AuditRecord,
    ChainVerifier,
    OpenedRecord,
    Problem,
    RecordError,
    SealedRecord,
    Verdict,
    open_record,
    record_hash,
    seal_record,
)
from fedbus.audit.trail import AuditTrail

__all__ = [
    "AUDIT_TYPE",
    "GENESIS",
    "AuditRecord",
    "AuditTrail",
    "ChainVerifier",
    "OpenedRecord",
    "Problem",
    "RecordError",
    "SealedRecord",
    "Verdict",
    "open_record",
    "record_hash",
    "seal_record",
]
