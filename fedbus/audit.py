"""AuditTrail: hash-chained records of what a service accepted, rejected and decided.

Each record carries the BLAKE2b hash of the previous one, so a deleted or edited record
breaks the chain for anyone replaying the audit stream. The chain advances only once
JetStream acknowledged a record: a publish that fails leaves the head where it was, so
the next record links to the last one that is really in the stream. A coordinator that
starts again (a resume, or a new run of the same job id) continues the chain from the
last record on its subject, so one chain covers the whole job.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import structlog

from fedbus.bus import publish_with_retry

log = structlog.get_logger(__name__)

GENESIS = "0" * 64
RECENT_SCAN = 256  # records looked back through by ``recent`` (bounded: a flood is audited in aggregate)


def record_hash(record: dict) -> str:
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(canonical.encode(), digest_size=32).hexdigest()


class AuditTrail:
    def __init__(self, js, subject: str, actor: str, *, stream: str | None = None):
        self.js = js
        self.subject = subject
        self.stream = stream
        self.actor = actor
        self.seq = 0
        self.prev = GENESIS
        self.failed = 0
        # One record in flight at a time: two publishers building on the same head would fork the chain.
        self._lock = asyncio.Lock()

    async def resume(self) -> None:
        """Continue after the last record on the subject (if any, and if its hash holds)."""
        if self.stream is None:
            return
        try:
            last = await self.js.get_last_msg(self.stream, self.subject)
            record = json.loads(last.data)
        except Exception as exc:  # an empty subject: start the chain
            log.debug("audit.no_previous_record", error=repr(exc))
            return
        body = {k: v for k, v in record.items() if k != "hash"}
        if record_hash(body) != record.get("hash"):
            log.error("audit.previous_record_corrupt", seq=record.get("seq"))
            return
        self.seq, self.prev = int(record["seq"]), record["hash"]

    async def recent(self, event: str, limit: int = RECENT_SCAN, **match) -> dict | None:
        """The newest of the last ``limit`` records on the stream that is ``event`` with
        these field values, or None. A resumed service asks before it records something a
        dead predecessor may already have recorded just before it was killed."""
        if self.stream is None:
            return None
        try:
            last_seq = (await self.js.stream_info(self.stream)).state.last_seq
        except Exception as exc:
            log.warning("audit.scan_failed", error=repr(exc))
            return None
        for seq in range(last_seq, max(0, last_seq - limit), -1):
            try:
                msg = await self.js.get_msg(self.stream, seq=seq)
                record = json.loads(msg.data)
            except Exception:  # deleted, or not a record: keep looking
                continue
            if record.get("event") == event and all(record.get(k) == v for k, v in match.items()):
                return record
        return None

    def chain(self, event: str, **fields) -> dict:
        """The next record of the chain (pure: the head moves only in ``advance``)."""
        record = {"seq": self.seq + 1, "actor": self.actor, "event": event, "ts_ms": time.time_ns() // 1_000_000,
                  "prev": self.prev, **fields}
        record["hash"] = record_hash(record)
        return record

    def advance(self, record: dict) -> None:
        self.seq, self.prev = record["seq"], record["hash"]

    async def publish(self, event: str, **fields) -> bool:
        async with self._lock:
            return await self._publish(event, fields)

    async def _publish(self, event: str, fields: dict) -> bool:
        record = self.chain(event, **fields)
        try:
            await publish_with_retry(self.js, self.subject, json.dumps(record, default=str).encode(),
                                     msg_id=f"{self.actor}-{record['hash'][:32]}")
        except Exception as exc:  # auditing must never take the service down; the log keeps it
            self.failed += 1
            log.error("audit.publish_failed", error=repr(exc), audit_event=event, seq=record["seq"])
            return False
        self.advance(record)
        return True


def verify_chain(records: list[dict]) -> bool:
    prev = GENESIS
    for rec in records:
        body = {k: v for k, v in rec.items() if k != "hash"}
        if rec.get("prev") != prev or record_hash(body) != rec.get("hash"):
            return False
        prev = rec["hash"]
    return True
