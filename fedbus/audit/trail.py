"""AuditTrail: one writer's signed, hash-chained audit records on its own subject.

Every participant (coordinator, aggregator, worker) writes its own chain on
``<prefix>.<job>.audit.<writer>`` (see ``fedbus.audit.records``). What makes the chain
hold across failures:

* A record joins the chain only once JetStream acknowledged it. It is published with
  ``Nats-Expected-Last-Subject-Sequence`` (the stream sequence of the writer's previous
  record), so the server appends it only right after that record: a publish built on a
  stale head is refused instead of forking the chain, and so is a retry whose first
  attempt was stored but whose ack was lost (nats-server checks the expected sequence
  before the ``Nats-Msg-Id`` de-duplication); the writer then finds that record as its
  head and takes it as stored. A failed
  publish leaves the head where it was; the next record links to the last one that is
  really in the stream.
* The head is persisted in the stream itself: a writer that starts again (a resumed
  coordinator, a restarted worker) reads the last message on its subject, checks that
  it is its own signed record, and continues from it. A message there that is not (a
  forgery by someone allowed to publish on the subject) is not built upon: the writer
  starts a new chain after it, and ``fedbus audit verify`` points at the forgery.
"""

from __future__ import annotations

import asyncio
import time

import nats.js.errors
import structlog

from fedbus.audit.records import GENESIS, RecordError, SealedRecord, open_record, seal_record
from fedbus.bus import Subjects, publish_with_retry
from fedbus.crypto.keys import Identity

log = structlog.get_logger(__name__)

RECENT_SCAN = 256  # messages looked back through by ``recent`` (bounded: a flood is audited in aggregate)
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
ERR_WRONG_LAST_SEQUENCE = 10071  # nats-server: JSStreamWrongLastSequenceErrF
ERR_NO_MESSAGE = 10037  # nats-server: JSNoMessageFoundErr
# A publish refused because the head moved is rebuilt on the new head this many times;
# only someone else writing on this writer's subject moves it.
HEAD_RETRIES = 3
# Publish attempts per record (the same bytes each time) before it is given up.
PUBLISH_ATTEMPTS = 10


class AuditTrail:
    def __init__(self, js, subjects: Subjects, identity: Identity, *, publish_attempts: int = PUBLISH_ATTEMPTS):
        self.js = js
        self.job = subjects.job
        self.subject = subjects.audit_of(identity.id)
        self.stream = subjects.audit_stream
        self.identity = identity
        self.publish_attempts = publish_attempts
        self.seq = 0  # the head: the writer's last acknowledged record
        self.prev = GENESIS
        self.subject_seq = 0  # its stream sequence (0: nothing on the subject)
        self.failed = 0
        self._synced = False
        # One record in flight at a time: two publishers building on the same head would fork the chain.
        self._lock = asyncio.Lock()

    async def resume(self) -> None:
        """Continue after the last message on the writer's subject, if it is the writer's
        own valid record. Stays unsynced (and retries at the next publish) when the stream
        cannot be asked."""
        try:
            last = await self.js.get_last_msg(self.stream, self.subject)
        except nats.js.errors.NotFoundError:
            self.seq, self.prev, self.subject_seq, self._synced = 0, GENESIS, 0, True
            return
        except nats.js.errors.APIError as exc:
            if exc.err_code != ERR_NO_MESSAGE:
                log.warning("audit.head_unknown", error=repr(exc))
                return
            self.seq, self.prev, self.subject_seq, self._synced = 0, GENESIS, 0, True
            return
        except Exception as exc:  # not reachable now: the next publish asks again
            log.warning("audit.head_unknown", error=repr(exc))
            return
        try:
            opened = open_record(last.data, job=self.job, writer=self.identity.id, key=self.identity.public_key)
        except RecordError as err:
            # Not ours: never link to it. A new chain starts after it; the verifier names it.
            log.error("audit.head_untrusted", reason=err.reason, stream_seq=last.seq, subject=self.subject)
            self.seq, self.prev = 0, GENESIS
        else:
            self.seq, self.prev = opened.record["seq"], opened.hash
        self.subject_seq, self._synced = int(last.seq), True

    def chain(self, event: str, fields: dict, *, ts_ms: int | None = None) -> SealedRecord:
        """The next record on the current head (pure: the head moves only in ``advance``)."""
        return seal_record(self.identity, self.job, seq=self.seq + 1, prev=self.prev, event=event, fields=fields,
                           ts_ms=time.time_ns() // 1_000_000 if ts_ms is None else ts_ms)

    def advance(self, sealed: SealedRecord, subject_seq: int) -> None:
        self.seq, self.prev, self.subject_seq = sealed.record["seq"], sealed.hash, subject_seq

    async def publish(self, event: str, **fields) -> bool:
        """Append one record; True once JetStream acknowledged it. Never raises: auditing
        must not take the service down (a failure is logged and counted in ``failed``)."""
        async with self._lock:
            ok = await self._publish(event, fields)
        if not ok:
            self.failed += 1
        return ok

    async def _publish(self, event: str, fields: dict) -> bool:
        for _ in range(HEAD_RETRIES):
            if not self._synced:
                await self.resume()
                if not self._synced:
                    log.error("audit.publish_failed", audit_event=event, error="the chain's head cannot be read")
                    return False
            try:
                sealed = self.chain(event, fields)
            except ValueError as exc:
                log.error("audit.record_refused", audit_event=event, error=str(exc)[:200])
                return False
            outcome = await self.append(sealed)
            if outcome != "moved":
                return outcome == "stored"
        log.error("audit.publish_failed", audit_event=event, error="the head kept moving")
        return False

    async def append(self, sealed: SealedRecord) -> str:
        """Publish a record built on the current head: "stored" (the head advanced),
        "moved" (the subject's last message is not the head: re-read, rebuild) or "failed"."""
        event, seq = sealed.record["event"], sealed.record["seq"]
        try:
            ack = await publish_with_retry(self.js, self.subject, sealed.wire, msg_id=sealed.msg_id,
                                           headers={EXPECTED_LAST_SUBJECT_SEQ: str(self.subject_seq)},
                                           attempts=self.publish_attempts)
        except nats.js.errors.APIError as exc:
            if exc.err_code != ERR_WRONG_LAST_SEQUENCE:
                log.error("audit.publish_failed", audit_event=event, seq=seq, error=repr(exc))
                return "failed"
            # The server checks the expected sequence before de-duplicating: a retry whose
            # first attempt was stored (its ack lost) lands here too, and finds itself as the head.
            self._synced = False
            await self.resume()
            if self._synced and self.prev == sealed.hash:
                return "stored"
            log.warning("audit.head_moved", audit_event=event, seq=seq)
            return "moved"
        except Exception as exc:
            log.error("audit.publish_failed", audit_event=event, seq=seq, error=repr(exc))
            return "failed"
        self.advance(sealed, int(ack.seq))
        return "stored"

    async def recent(self, event: str, limit: int = RECENT_SCAN, **match) -> dict | None:
        """The newest of the writer's own records among the stream's last ``limit``
        messages that is ``event`` with these field values, or None. A resumed service
        asks before it records something a dead predecessor may already have recorded
        just before it was killed."""
        try:
            last_seq = (await self.js.stream_info(self.stream)).state.last_seq
        except Exception as exc:
            log.warning("audit.scan_failed", error=repr(exc))
            return None
        for seq in range(last_seq, max(0, last_seq - limit), -1):
            try:
                msg = await self.js.get_msg(self.stream, seq=seq)
                if msg.subject != self.subject:
                    continue
                record = open_record(msg.data, job=self.job, writer=self.identity.id,
                                     key=self.identity.public_key).record
            except Exception:  # deleted, someone else's, or not a valid record: keep looking
                continue
            if record.get("event") == event and all(record.get(k) == v for k, v in match.items()):
                return record
        return None
