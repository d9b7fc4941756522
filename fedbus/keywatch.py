"""KeyWatch: a running process's live view of the job's key events (revocation, rotation).

Every process of a job (coordinator, aggregators, workers, `fedbus keys`) follows
``<prefix>.<job>.ctl.keys`` from the start of the control stream, verifies each event
like any control message (a current coordinator or operator signed it, fresh when the
stream stored it, nonce unseen, this job; ``KeyEvent`` bodies only) and applies it to the
federation's overlay (``Federation.apply_key_event``), which the process's envelope
verifier consults: a revoked sender is ``revoked_sender`` from the next message on, a
rotated one is checked against its new key. No restart is needed, and a restarted
process replays every past event before it trusts anything (``start`` returns only once
the events that were in the stream when it was called are applied).

Freshness is judged by when the stream stored an event, not by now: an event from last
week is still valid when replayed; one re-published today is stale by its own timestamp.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import nats.js.errors
import structlog

from fedbus.bus import Subjects, publish_with_retry
from fedbus.bus.follower import ControlFollower
from fedbus.crypto.envelopes import Rejection, now_ms, seal
from fedbus.crypto.federation import Federation
from fedbus.crypto.keyevents import KeyChange, KeyEventRefused
from fedbus.crypto.keys import Identity
from fedbus.jobspec import SecuritySpec
from fedbus.messaging import nats_headers, security_verifier
from fedbus.protocol.messages import KeyEvent, encode_body
from fedbus.rejections import RejectionLedger

log = structlog.get_logger("fedbus.keys")

# How long start() waits to have applied the events already in the stream.
CATCH_UP_TIMEOUT_S = 60.0
# Exit code of a process that stopped because its own key was revoked or rotated away.
REVOKED_EXIT_CODE = 4


def keys_subject(subjects: Subjects) -> str:
    return subjects.ctl(KeyEvent.TYPE)


async def publish_key_event(js, subjects: Subjects, signer: Identity, event: KeyEvent) -> int:
    """Sign and publish one key event; returns its stream sequence once JetStream acknowledged it."""
    wire, header = seal(signer, KeyEvent.TYPE, job=subjects.job, round=0, body=encode_body(event))
    ack = await publish_with_retry(js, keys_subject(subjects), wire, headers=nats_headers(header),
                                   msg_id=header.nonce.hex())
    return int(ack.seq)


def stored_ms_of(msg) -> tuple[int | None, int | None]:
    """(stream sequence, stored time in ms) of a JetStream message."""
    try:
        md = msg.metadata
        return int(md.sequence.stream), int(md.timestamp.timestamp() * 1000)
    except Exception:
        return None, None


class KeyWatch:
    def __init__(self, js, subjects: Subjects, federation: Federation, security: SecuritySpec, *,
                 on_change: Callable[[KeyChange], None] | None = None,
                 on_reject: Callable[[Rejection, str], None] | None = None):
        self.js = js
        self.subjects = subjects
        self.federation = federation
        self.subject = keys_subject(subjects)
        # Its own verifier (and replay guard): key events are verified against the overlay as
        # it stood before each of them, whatever else the process is verifying meanwhile.
        self.verifier = security_verifier(subjects.job, security, federation)
        self.on_change = on_change
        self.on_reject = on_reject or self._log_rejection
        self.ledger = RejectionLedger(int(security.audit_interval_s * 1000),
                                      lambda sender: federation.get(sender) is not None)
        self.handled_seq = 0  # stream sequence of the last event handled (applied or rejected)
        self.applied = 0
        self.synced = False  # every event that was in the stream at start() is applied
        self.follower = ControlFollower(js, self.subject, self._on_msg, stream=subjects.ctl_stream, from_start=True)
        self._progress = asyncio.Event()

    async def start(self, timeout_s: float = CATCH_UP_TIMEOUT_S) -> None:
        """Follow the key events; return once every event already in the stream is applied."""
        target = await self._last_seq()
        await self.follower.start()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while self.handled_seq < target:
            self._progress.clear()
            remaining = give_up - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"key events up to #{target} not replayed within {timeout_s:.0f} s "
                                   f"(at #{self.handled_seq})")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._progress.wait(), remaining)
        self.synced = True
        log.info("keys.synced", events=self.applied, through_seq=target)

    async def start_as(self, identity: Identity, timeout_s: float = CATCH_UP_TIMEOUT_S) -> bool:
        """``start``, then whether ``identity`` is still listed with its key; if not, says so
        (the stop line), stops following and returns False: the process must not run."""
        await self.start(timeout_s)
        problem = own_key_problem(self.federation, identity)
        if problem is None:
            return True
        stop_line(identity, problem)
        await self.stop()
        return False

    async def stop(self) -> None:
        await self.follower.stop()

    def on_reconnected(self) -> None:
        self.follower.on_reconnected()

    async def _last_seq(self) -> int:
        try:
            return int((await self.js.get_last_msg(self.subjects.ctl_stream, self.subject)).seq)
        except nats.js.errors.NotFoundError:
            return 0  # no key event yet

    async def _on_msg(self, msg) -> None:
        seq, stored_ms = stored_ms_of(msg)
        try:
            self.handle(bytes(msg.data), stored_ms=stored_ms, seq=seq)
        except Rejection as rej:
            self.on_reject(rej, msg.subject)
        except Exception as exc:  # a bug here must not stop the process from following key events
            log.exception("keys.handler_failed", error=repr(exc))
        finally:
            if seq is not None:
                self.handled_seq = max(self.handled_seq, seq)
            self._progress.set()

    def handle(self, wire: bytes, *, stored_ms: int | None, seq: int | None) -> KeyChange | None:
        """Verify and apply one key event (pure but for the federation it amends). Raises Rejection."""
        opened = self.verifier.open(wire, stored_ms=stored_ms)
        if opened.header.type != KeyEvent.TYPE:
            raise Rejection("unknown_type", f"{opened.header.type} on the key-event subject", opened.header)
        fields, _ = self.verifier.accept_body(opened, opened.inline_body)
        event: KeyEvent = fields  # type: ignore[assignment]
        try:
            change = self.federation.apply_key_event(event, opened.header.sender, seq=seq)
        except KeyEventRefused as exc:
            raise Rejection("invalid_key_event", str(exc), opened.header) from None
        if change is None:
            log.info("keys.unchanged", participant=event.participant, action=event.action, seq=seq)
            return None
        self.applied += 1
        # A live event is news; a replayed one (at start) is history.
        (log.warning if self.synced else log.info)(
            "keys.applied", participant=change.participant, action=change.action, signer=change.signer, seq=seq,
            reason=change.reason[:200], replayed=not self.synced)
        if self.on_change is not None:
            self.on_change(change)
        return change

    def _log_rejection(self, rej: Rejection, subject: str) -> None:
        """Junk on the key subject costs one log line per sender and reason per interval."""
        now = now_ms()
        if self.ledger.due(now):
            for rep in self.ledger.flush(now):
                if rep.count > 1:
                    log.warning("keys.rejected.summary", reason=rep.reason, sender=rep.sender, count=rep.count)
        sender = rej.header.sender if rej.header else None
        if self.ledger.record("keys", sender, rej.reason, rej.detail, now):
            log.warning("keys.rejected", reason=rej.reason, detail=rej.detail[:200], sender=(sender or "")[:64],
                        subject=subject[:200], note="further ones this interval are aggregated")


def own_key_problem(federation: Federation, identity: Identity) -> str | None:
    """None while this process's key is listed, unrevoked and current (key events included);
    else why not."""
    try:
        federation.listed_as(identity, identity.role)
    except ValueError as exc:
        return str(exc)
    return None


def own_key_lost(federation: Federation, identity: Identity, change: KeyChange) -> bool:
    """Whether ``change`` revoked this process's key or rotated it away (then logged with stop_line)."""
    problem = own_key_problem(federation, identity) if change.participant == identity.id else None
    if problem is not None:
        stop_line(identity, problem, change)
    return problem is not None


def stop_line(identity: Identity, problem: str, change: KeyChange | None = None) -> None:
    """The one clear log line of a process that stops because its key was revoked or rotated away."""
    rotated = change is not None and change.action == "rotate"
    log.error(f"{identity.role}.key_rotated" if rotated else f"{identity.role}.revoked", participant=identity.id,
              detail=problem, signer=change.signer if change else None, seq=change.seq if change else None,
              reason=(change.reason if change else "")[:200],
              note="stopping: a rotated participant restarts with its new key file; a revoked one is out for good")
