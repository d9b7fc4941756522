"""AuditQueue: records written in the background, in order, through a bounded queue.

A service hands a record over and goes on: the job never waits for the audit stream
(a slow or full one, or a leader election). A full queue drops the record, logs
``audit.queue_full`` and counts it, instead of growing: a rejection flood is audited in
aggregate (``fedbus.rejections``), so in a healthy service the queue stays nearly empty.
"""

from __future__ import annotations

import asyncio

import structlog

from fedbus.audit.trail import AuditTrail
from fedbus.rejections import RejectionReport

log = structlog.get_logger(__name__)

AUDIT_QUEUE_MAX = 1_000


class AuditQueue:
    def __init__(self, trail: AuditTrail, maxsize: int = AUDIT_QUEUE_MAX):
        self.trail = trail
        self.dropped = 0
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=maxsize)

    def submit(self, event: str, **fields) -> None:
        try:
            self._queue.put_nowait((event, fields))
        except asyncio.QueueFull:
            self.dropped += 1
            log.error("audit.queue_full", audit_event=event, dropped=self.dropped)

    async def run(self) -> None:
        """Write queued records one by one, for as long as the service runs."""
        while True:
            event, fields = await self._queue.get()
            await self.trail.publish(event, **fields)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """At shutdown: write what is queued, within ``timeout_s`` (call after ``run`` stopped)."""
        async def write_all() -> None:
            while not self._queue.empty():
                event, fields = self._queue.get_nowait()
                await self.trail.publish(event, **fields)

        try:
            await asyncio.wait_for(write_all(), timeout_s)
        except asyncio.TimeoutError:
            log.error("audit.drain_timeout", left=self._queue.qsize())


def rejection_fields(rep: RejectionReport) -> dict:
    """The audit record of one aggregated rejection report."""
    return {"kind": rep.kind, "sender": rep.sender, "reason": rep.reason, "count": rep.count,
            "detail": rep.first_detail, "since_ms": rep.since_ms, "until_ms": rep.until_ms}


def report_rejections(reports: list[RejectionReport], audit: AuditQueue | None) -> None:
    """Log each report that stands for more than one rejection (the first was logged when
    it happened) and queue its audit record."""
    for rep in reports:
        if rep.count > 1:
            log.warning(f"{rep.kind}.rejected.summary", reason=rep.reason, sender=rep.sender, count=rep.count)
        if audit is not None:
            audit.submit("rejections", **rejection_fields(rep))
