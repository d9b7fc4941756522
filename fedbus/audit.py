"""AuditTrail: hash-chained records of what a service accepted, rejected and decided.

Each record carries the BLAKE2b hash of the previous one, so a deleted or edited record
breaks the chain for anyone replaying the audit stream.
"""

from __future__ import annotations

import hashlib
import json
import time

import structlog

from fedbus.bus import publish_with_retry

log = structlog.get_logger(__name__)

GENESIS = "0" * 64


def record_hash(record: dict) -> str:
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(canonical.encode(), digest_size=32).hexdigest()


class AuditTrail:
    def __init__(self, js, subject: str, actor: str):
        self.js = js
        self.subject = subject
        self.actor = actor
        self.seq = 0
        self.prev = GENESIS

    def chain(self, event: str, **fields) -> dict:
        """Build the next record of the chain (pure; publish() sends it)."""
        self.seq += 1
        record = {"seq": self.seq, "actor": self.actor, "event": event, "ts_ms": time.time_ns() // 1_000_000,
                  "prev": self.prev, **fields}
        record["hash"] = record_hash(record)
        self.prev = record["hash"]
        return record

    async def publish(self, event: str, **fields) -> None:
        record = self.chain(event, **fields)
        try:
            await publish_with_retry(self.js, self.subject, json.dumps(record, default=str).encode(),
                                     msg_id=f"{self.actor}-{record['hash'][:32]}")
        except Exception as exc:  # auditing must never take the service down; the log keeps it
            log.error("audit.publish_failed", error=repr(exc), record=record)


def verify_chain(records: list[dict]) -> bool:
    prev = GENESIS
    for rec in records:
        body = {k: v for k, v in rec.items() if k != "hash"}
        if rec.get("prev") != prev or record_hash(body) != rec.get("hash"):
            return False
        prev = rec["hash"]
    return True
