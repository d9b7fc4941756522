"""The audit record: the JSON body of an ``audit.record`` envelope (see ``fedbus.audit``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

AUDIT_TYPE = "audit.record"
MAX_COUNT = 2**53 - 1


class AuditRecord(BaseModel):
    """One record of a writer's audit chain. The event's own fields (round, run, reason,
    count, ...) sit next to these."""

    model_config = ConfigDict(extra="allow", frozen=True)
    seq: int = Field(ge=1, le=MAX_COUNT, description="position in the writer's chain, from 1")
    prev: str = Field(pattern=r"^[0-9a-f]{64}$",
                      description="hash of the writer's previous record (BLAKE2b-256 of its wire bytes), hex; "
                                  "64 zeros for the first")
    event: str = Field(min_length=1, max_length=64, description="e.g. job.started, round.closed, rejections")
    writer: str = Field(min_length=1, max_length=128, description="the participant whose chain this is")
    ts_ms: int = Field(ge=0, le=MAX_COUNT, description="writer's clock, ms since the Unix epoch")
