"""SecAgg+ over NATS: thin async adapters around the two machines (``fedbus secure-sum``).

One secure-aggregation round sums the workers' vectors; the server learns the sum of
the survivors' inputs and nothing about any single one. It is the bus half of secure
aggregation, usable on its own for federated statistics (counts, histograms, sums of
clipped vectors), and the piece a training round reuses.

Subjects (the job's ordinary streams, nothing new to provision):
- server -> workers: ``ctl.secagg.setup``, ``ctl.secagg.keys``, ``ctl.secagg.bundle.<worker>``,
  ``ctl.secagg.unmask`` (CTL stream, replayable);
- worker -> server: the worker's own update subject ``upd.<region>.<worker>`` (UPD stream),
  read by a pull consumer the server filters to the roster's subjects.
Every message is a signed envelope, verified in full before the machine sees it; a
masked input larger than the inline limit travels as a claim check like any update.

The server closes each phase when every expected worker answered or when the phase
timeout passes (dropouts cost one timeout per phase they miss). Services only
translate: every decision is the machines' (``client``, ``server``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from fedbus.bus import JOB_STREAMS_WAIT_S, NatsCredentials, Subjects, connect, publish_with_retry, wait_for_stream
from fedbus.bus.layout import ensure_job_infrastructure
from fedbus.crypto.envelopes import Rejection, now_ms
from fedbus.crypto.federation import Federation
from fedbus.crypto.keys import Identity
from fedbus.jobspec import JobSpec
from fedbus.messaging import Messenger, Received, nats_headers, verifier_for
from fedbus.protocol.secagg import SecAggSetup
from fedbus.rejections import RejectionLedger
from fedbus.secagg.errors import SecAggAbort, SecAggFailed
from fedbus.secagg.exchange import WORKER_TYPES, SecAggParticipant, ServerExchange
from fedbus.secagg.spec import SecureAggregationSpec, quantizer_of
from fedbus.registry.retention import stream_retention

log = structlog.get_logger(__name__)

DROPOUT_PHASES = ("advertise", "shares", "input", "unmask")
FETCH_BATCH = 64
MAX_TENSORS = 4  # a masked input has one


def _delivery_ms(msg) -> int | None:
    with contextlib.suppress(Exception):
        return int(msg.metadata.timestamp.timestamp() * 1000)
    return None


def _wire_bytes(msg, got: Received | None) -> int:
    """Bytes a message took: the NATS payload, plus the claim-checked body when there is one."""
    return len(msg.data) + (got.header.length if got is not None and got.header.blob is not None else 0)


@dataclass
class _Endpoint:
    """What both sides share: connection, signer/verifier, rejection ledger, byte counts."""

    job: JobSpec
    federation: Federation
    identity: Identity
    subjects: Subjects = field(init=False)
    bytes_in: int = 0
    bytes_out: int = 0

    def __post_init__(self):
        self.subjects = Subjects(self.job.job, prefix=self.job.transport.prefix)
        self.ledger = RejectionLedger(int(self.job.security.audit_interval_s * 1000),
                                      lambda sender: self.federation.get(sender) is not None)
        self.verifier = verifier_for(self.job, self.federation, max_tensors=MAX_TENSORS)

    async def open(self, nats_url: str, name: str, credentials: NatsCredentials | None = None, *,
                   creates_streams: bool) -> None:
        self.nc = await connect(nats_url, name=name, first_connect_timeout=30, credentials=credentials,
                                participant=self.identity.id)
        self.js = self.nc.jetstream()
        if creates_streams:  # the server, as the coordinator does; a secured server lets workers create nothing
            await ensure_job_infrastructure(self.js, self.subjects, replicas=self.job.transport.replicas,
                                            **stream_retention(self.job))
        else:
            await wait_for_stream(self.js, self.subjects.ctl_stream, JOB_STREAMS_WAIT_S)
            await wait_for_stream(self.js, self.subjects.upd_stream, JOB_STREAMS_WAIT_S)
        self.messenger = Messenger(self.nc, self.js, self.identity, self.subjects,
                                   inline_max_bytes=self.job.transport.inline_max_bytes)

    async def close(self) -> None:
        # Every publish was acknowledged already; drain() would wait on the pull consumer.
        with contextlib.suppress(Exception):
            await self.nc.close()

    async def publish(self, subject: str, body, tensors=None) -> None:
        wire, header = await self.messenger.seal(body, tensors, round=body.round)
        await publish_with_retry(self.js, subject, wire, headers=nats_headers(header), msg_id=header.nonce.hex())
        self.bytes_out += len(wire) + (header.length if header.blob is not None else 0)

    def rejected(self, reason: str, detail: str, sender: str | None) -> None:
        if self.ledger.record("secagg", sender, reason, detail, now_ms()):
            log.warning("secagg.rejected", reason=reason, detail=detail[:200], sender=(sender or "")[:64],
                        note="further ones this interval are aggregated")


class SecureSumServer(_Endpoint):
    """Runs one round of ``SecAggServer`` over the bus and writes ``result.json`` and ``sum.npy``."""

    def __init__(self, job: JobSpec, federation: Federation, identity: Identity, *, round: int, roster: list[str],
                 length: int, bound: float, spec: SecureAggregationSpec, phase_timeout_s: float, out_dir: Path,
                 join_timeout_s: float | None = None):
        super().__init__(job, federation, identity)
        federation.listed_as(identity, "coordinator")
        self.params = spec.round_params(job=job.job, round=round, roster=roster, seed=os.urandom(32), length=length,
                                        bound=bound)
        # The first phase also waits for workers to come online, so it may be given longer.
        self.exchange = ServerExchange(self.params, self._publish_ctl, self.rejected, phase_timeout_s,
                                       phase_timeout_s if join_timeout_s is None else join_timeout_s)
        self.out_dir = out_dir

    async def _publish_ctl(self, suffix: str, body) -> None:
        await self.publish(self.subjects.ctl(suffix), body)

    def _header_ok(self, header) -> bool:
        """The signed header's claims, before its body is fetched: this round, and a masked
        input no larger than the round's length makes it."""
        self.exchange.check_header(header)
        return header.round == self.params.round

    async def run(self, nats_url: str, credentials: NatsCredentials | None = None) -> int:
        await self.open(nats_url, f"secure-sum-server-{self.identity.id}", credentials, creates_streams=True)
        consumer = asyncio.create_task(self._consume())
        status, reason, result = "failed", "", None
        try:
            result = await self.exchange.run()
            status = "aggregated"
        except SecAggFailed as exc:
            reason = exc.reason
            await self.exchange.fail(exc)
        finally:
            consumer.cancel()
            with contextlib.suppress(BaseException):
                await consumer
            await self.close()
        self._write(status, reason, result)
        return 0 if status == "aggregated" else 3

    async def _consume(self) -> None:
        regions = [(self.federation.get(w).region, w) for w in self.params.roster]
        durable = f"secagg-{self.params.round}-{os.urandom(4).hex()}"
        config = ConsumerConfig(durable_name=durable, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
                                filter_subjects=self.subjects.upd_listed(regions))
        await self.js.add_consumer(self.subjects.upd_stream, config)
        psub = await self.js.pull_subscribe_bind(durable, self.subjects.upd_stream)
        try:
            while True:
                try:
                    msgs = await psub.fetch(batch=FETCH_BATCH, timeout=0.5)
                except (TimeoutError, asyncio.TimeoutError):
                    continue
                for msg in msgs:
                    await self._verify(msg)
                    with contextlib.suppress(Exception):
                        await msg.ack()
        finally:
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(self.subjects.upd_stream, durable)

    async def _verify(self, msg) -> None:
        parts = msg.subject.split(".")
        got = None
        try:
            got = await self.messenger.receive(self.verifier, msg.data, sender_token=parts[-1],
                                               stored_ms=_delivery_ms(msg), offload=True, round_ok=self._header_ok)
            if got.header.type not in WORKER_TYPES:
                raise Rejection("unknown_type", f"{got.header.type} in a secure-aggregation round", got.header)
            if self.federation.get(got.header.sender).region != parts[-2]:
                raise Rejection("subject_mismatch", f"region {parts[-2]}", got.header)
        except Rejection as rej:
            self.rejected(rej.reason, rej.detail, rej.header.sender if rej.header else None)
            return
        finally:
            self.bytes_in += _wire_bytes(msg, got)
        self.exchange.offer(got.header.sender, got.header.type, got.fields, got.tensors)

    def _write(self, status: str, reason: str, result) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        p = self.params
        summary = {"status": status, "reason": reason, "round": p.round, "workers": len(p.roster),
                   "degree": p.degree, "threshold": p.threshold, "bits": p.bits, "length": p.length,
                   "scale": p.scale, "bound": p.bound, "sum_error_bound": quantizer_of(p).sum_error_bound,
                   "phase_seconds": self.exchange.phase_seconds, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                   "rejections": dict(self.ledger.totals)}
        if result is not None:
            summary |= {"survivors": result.survivors, "dropped": result.dropped}
            np.save(self.out_dir / "sum.npy", quantizer_of(p).dequantize_sum(result.total))
        (self.out_dir / "result.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        log.info("secagg.done", status=status, reason=reason, survivors=len(summary.get("survivors", ())),
                 bytes_in=self.bytes_in, bytes_out=self.bytes_out)


class SecureSumWorker(_Endpoint):
    """Answers one secure-sum round with ``values`` (clamped to the round's bound)."""

    def __init__(self, job: JobSpec, federation: Federation, identity: Identity, *, round: int, values: np.ndarray,
                 timeout_s: float, dropout_before: str | None = None):
        super().__init__(job, federation, identity)
        self.region = federation.listed_as(identity, "worker").region
        self.round = round
        self.values = values
        self.timeout_s = timeout_s
        self.dropout_before = dropout_before
        self.participant: SecAggParticipant | None = None
        self.queue: asyncio.Queue = asyncio.Queue()

    async def run(self, nats_url: str, credentials: NatsCredentials | None = None) -> int:
        await self.open(nats_url, f"secure-sum-{self.identity.id}", credentials, creates_streams=False)
        sub = await self.js.subscribe(self.subjects.ctl_all, ordered_consumer=True, cb=self.queue.put,
                                      deliver_policy=DeliverPolicy.ALL)
        log.info("secagg.listening", round=self.round, values=self.values.size)
        try:
            return await asyncio.wait_for(self._answer(), self.timeout_s)
        except SecAggAbort as exc:
            log.error("secagg.aborted", reason=exc.reason, detail=exc.detail[:200])
            return 3
        except SecAggFailed as exc:
            log.error("secagg.round_failed", reason=exc.reason, detail=exc.detail[:200])
            return 5
        except (TimeoutError, asyncio.TimeoutError):
            log.error("secagg.timeout", seconds=self.timeout_s)
            return 4
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            await self.close()

    async def _send(self, phase: str, body, tensors=None) -> None:
        if self.dropout_before == phase:
            log.warning("secagg.simulated_dropout", phase=phase)
            os._exit(17)  # a crash: nothing flushed, nothing said goodbye
        await self.publish(self.subjects.upd(self.region, self.identity.id), body, tensors)

    async def _answer(self) -> int:
        """Act on the server's messages in stream order until the round asks for our shares."""
        while True:
            msg = await self.queue.get()
            try:
                got = await self.messenger.receive(self.verifier, msg.data, stored_ms=_delivery_ms(msg),
                                                   round_ok=lambda h: h.round == self.round)
                sender = self.federation.get(got.header.sender)
                if not got.header.type.startswith("secagg.") or got.fields.group != "":
                    continue  # other control traffic, or a region's round
                if sender.role != "coordinator":
                    raise Rejection("role_not_allowed", f"{sender.role} runs no whole-cohort round", got.header)
            except Rejection as rej:
                if rej.reason != "wrong_round":
                    self.rejected(rej.reason, rej.detail, rej.header.sender if rej.header else None)
                continue
            finally:
                self.bytes_in += len(msg.data)
            if await self._step(got.fields):
                return 0

    async def _step(self, body) -> bool:
        """One server message; True once our part of the round is done."""
        me = self.identity.id
        if isinstance(body, SecAggSetup):
            if self.participant is not None or me not in body.roster or body.job != self.job.job:
                return False
            if self.values.shape != (body.length,):
                raise SecAggAbort("malformed_setup", f"the round sums {body.length} values, we have {self.values.size}")
            self.participant = SecAggParticipant(me, body)
            log.info("secagg.joined", round=body.round, workers=len(body.roster), degree=body.degree)
            sends = self.participant.start() + self.participant.provide(self.values)
        elif self.participant is None:
            return False
        else:
            sends, rejections = self.participant.on_message(body)
            for bad in rejections:
                self.rejected(bad.reason, bad.detail, bad.worker)
        for send in sends:
            await self._send(send.phase, send.body, send.tensors)
        if self.participant.done:
            log.info("secagg.answered", round=self.round)
        return self.participant.done
